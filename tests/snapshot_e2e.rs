//! Suspend, snapshot and clone with real guests: metald in-process with the
//! QEMU backend under TCG, inside a network namespace of the test's own
//! (host networking on, so a suspended VM keeps its address and port
//! mapping). The guests boot the project's guest image with an ext4 root
//! (a private copy each) and `metald.tickfile=`: every second the guest
//! prints `METALD_TICK <n>`, appends `n` to `/ticks.log` on its disk
//! (synced) and prints how many lines that file holds. After the guests are
//! shut down, `debugfs` reads each disk's `/ticks.log` from the host.
//! Clones must also get fresh randomness: each prints `METALD_RESEED <hex>`
//! (its generator's output after metald's new generation), all different.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;
use support::{console_text, guest_image, in_netns, metald_env, proc_entry_exists, wait_until};

const BOOT: Duration = Duration::from_secs(150);
const TOKEN: &str = "dev_customer_acme";

fn ticks(console: &Path) -> Vec<u64> {
    console_text(console).lines().filter_map(|l| l.trim().strip_prefix("METALD_TICK ")?.parse().ok()).collect()
}

fn last_tickfile(console: &Path) -> Option<u64> {
    console_text(console).lines().filter_map(|l| l.trim().strip_prefix("METALD_TICKFILE ")?.parse().ok()).next_back()
}

/// Waits until the console shows more than `n` ticks in all.
async fn wait_ticks(console: &Path, n: usize) {
    wait_until(&format!("{} ticks in {}", n + 1, console.display()), BOOT, || {
        let ok = ticks(console).len() > n;
        async move { ok }
    })
    .await;
}

/// `/ticks.log` of an ext4 image, read from the host (the guest is off).
fn disk_ticks(disk: &Path) -> Vec<u64> {
    let out = std::process::Command::new("debugfs").args(["-R", "cat /ticks.log"]).arg(disk).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// What a guest's random number generator said right after it took a new
/// generation (`METALD_RESEED <hex>`); a failed reseed fails the test.
fn reseed(console: &Path) -> Option<String> {
    let text = std::fs::read_to_string(console).ok()?;
    assert!(!text.contains("METALD_RESEED_FAILED"), "{}: {text}", console.display());
    text.lines().find_map(|l| l.strip_prefix("METALD_RESEED ").map(|s| s.trim().to_owned()))
}

/// 1, 2, ..., n with nothing missing or repeated.
fn assert_consecutive(what: &str, v: &[u64]) {
    assert!(!v.is_empty(), "{what}: empty");
    for (i, t) in v.iter().enumerate() {
        assert_eq!(*t, i as u64 + 1, "{what}: {v:?}");
    }
}

async fn http_body(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.ok()?.ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned())
}

struct Host {
    daemon: metald::daemon::Daemon,
    tmp: tempfile::TempDir,
    _kill: support::KillOnDrop,
}

impl Host {
    async fn start() -> Host {
        let tmp = tempfile::Builder::new().prefix("metald-snap-").tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("assets")).unwrap();
        let env = metald_env([
            ("BACKEND", "qemu".to_owned()),
            ("QEMU_ACCEL", "tcg".to_owned()),
            ("AUTH_DEV_TOKENS", "true".to_owned()),
            ("ADDRESS", "127.0.0.1".to_owned()),
            ("PORT", "0".to_owned()),
            ("DATA_DIR", tmp.path().join("data").display().to_string()),
            ("ASSET_DIRS", format!("{}:{}", tmp.path().join("assets").display(), guest_image().display())),
            ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
            ("NETWORK_ENABLED", "true".to_owned()),
        ]);
        let _kill = support::KillOnDrop(tmp.path().to_path_buf());
        let daemon =
            metald::daemon::start(metald::daemon::Config::from_source(&env).unwrap()).await.expect("metald starts");
        Host { daemon, tmp, _kill }
    }

    fn client(&self) -> VmClient {
        vm_client(&format!("http://{}", self.daemon.addr), TOKEN, WireProtocol::ConnectProto, Duration::from_secs(300))
            .unwrap()
    }

    fn rootfs_copy(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join("assets").join(format!("{name}.ext4"));
        std::fs::copy(guest_image().join("rootfs.ext4"), &p).unwrap();
        p
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }
}

fn config(rootfs: &Path, ports: &[(i32, i32)]) -> pb::VmConfig {
    let network = if ports.is_empty() {
        Vec::new()
    } else {
        vec![pb::NetworkInterface {
            port_mappings: ports
                .iter()
                .map(|&(h, g)| pb::PortMapping { host_port: h, guest_port: g, ..Default::default() })
                .collect(),
            ..Default::default()
        }]
    };
    let httpd = if ports.is_empty() { "" } else { " metald.httpd=80" };
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: guest_image().join("vmlinux").display().to_string(),
            initrd_path: guest_image().join("initramfs.cpio.gz").display().to_string(),
            kernel_args: format!("console=ttyS0 quiet metald.root=/dev/vda rw metald.tickfile=/ticks.log{httpd}"),
            ..Default::default()
        }
        .into(),
        storage: vec![pb::StorageDevice {
            id: "root".into(),
            path: rootfs.display().to_string(),
            is_root_device: true,
            ..Default::default()
        }],
        network,
        ..Default::default()
    }
}

async fn info(c: &VmClient, id: &str) -> pb::GetVmInfoResponse {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("info {id}: {e:?}"))
        .into_owned()
}

async fn pid(c: &VmClient, id: &str) -> i32 {
    info(c, id).await.backend_info["pid"].parse().unwrap()
}

async fn console(c: &VmClient, id: &str) -> PathBuf {
    PathBuf::from(&info(c, id).await.backend_info["console_log"])
}

async fn shutdown(c: &VmClient, id: &str) {
    let r = c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id.into(), timeout_seconds: 60, ..Default::default() }).await;
    assert_eq!(r.unwrap().into_owned().state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN), "shutdown {id}");
}

#[test]
fn a_suspended_guest_resumes_where_it_was_with_its_disk_address_and_port() {
    guest_image();
    in_netns(|| async {
        let host = Host::start().await;
        let c = host.client();
        let disk = host.rootfs_copy("sleeper");
        let r = c
            .create_vm(pb::CreateVmRequest {
                vm_id: "sleeper".into(),
                config: config(&disk, &[(0, 80)]).into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_CREATED));
        c.boot_vm(pb::BootVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap();
        let con = console(&c, "sleeper").await;
        let net = info(&c, "sleeper").await.network_info.as_option().cloned().expect("network_info");
        let mapped: SocketAddr = format!("127.0.0.1:{}", net.port_mappings[0].host_port).parse().unwrap();
        wait_ticks(&con, 3).await;
        wait_until("the guest's HTTP server through its port mapping", BOOT, || async {
            http_body(mapped).await.as_deref() == Some("metald-guest")
        })
        .await;
        let first_pid = pid(&c, "sleeper").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let uptime = info(&c, "sleeper").await.metrics.uptime_seconds;
        assert!(uptime >= 1, "uptime {uptime}");

        // Suspend: the QEMU process ends, the save is on disk.
        let r = c
            .suspend_vm(pb::SuspendVmRequest { vm_id: "sleeper".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
        assert!(r.snapshot_size_bytes > 0, "{r:?}");
        wait_until("the suspended VM's QEMU to be gone", Duration::from_secs(10), || async {
            !proc_entry_exists(first_pid)
        })
        .await;
        let before = ticks(&con);
        let last = *before.last().unwrap();
        let file_lines = last_tickfile(&con).unwrap();
        let i = info(&c, "sleeper").await;
        assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
        assert_eq!(i.snapshot_size_bytes, r.snapshot_size_bytes);
        assert!(!i.backend_info.contains_key("pid"), "a suspended VM has no process: {:?}", i.backend_info);
        let host_id = &i.backend_info["host_id"];
        let saved = host.data().join("vms").join(host_id).join("suspended");
        assert!(saved.join("memory").is_file() && saved.join("meta.json").is_file(), "save in {}", saved.display());
        // A cold-started guest's RAM is saved as a sparse file beside the
        // (small) device state.
        assert!(saved.join("guest.ram").is_file());
        assert!(http_body(mapped).await.is_none(), "a suspended VM answered");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ticks(&con).len(), before.len(), "ticks while suspended");
        // Boot is refused: a suspended VM resumes.
        let e = c.boot_vm(pb::BootVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::FailedPrecondition, "{e:?}");

        // Resume: a new process; the guest continues where it stopped.
        let r = c.resume_vm(pb::ResumeVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap();
        assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
        assert_ne!(pid(&c, "sleeper").await, first_pid);
        assert!(!saved.exists(), "the save outlived the resume");
        wait_ticks(&con, before.len() + 2).await;
        let after = &ticks(&con)[before.len()..];
        assert_eq!(after[0], last + 1, "the counter continues (ticks after resume: {after:?})");
        assert!(last_tickfile(&con).unwrap() > file_lines, "the file on its disk grew on");
        wait_until("the port mapping to answer again", BOOT, || async {
            http_body(mapped).await.as_deref() == Some("metald-guest")
        })
        .await;
        let i = info(&c, "sleeper").await;
        assert_eq!(i.network_info.as_option().unwrap().ip_address, net.ip_address, "same address");
        assert_eq!(i.snapshot_size_bytes, 0);
        assert!(i.metrics.uptime_seconds > uptime, "uptime goes on: {} after {uptime}", i.metrics.uptime_seconds);

        // Again: the resumed guest's RAM is its save's file mapped
        // copy-on-write, so this save streams it (no guest.ram).
        let r = c.suspend_vm(pb::SuspendVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap();
        assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_SUSPENDED));
        assert!(saved.join("memory").is_file() && !saved.join("guest.ram").exists());
        let seen = ticks(&con);
        c.resume_vm(pb::ResumeVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap();
        wait_ticks(&con, seen.len() + 1).await;
        assert_eq!(ticks(&con)[seen.len()], seen.last().unwrap() + 1, "the counter continues after a second resume");

        // Off: the disk holds every tick, before and after the suspend.
        shutdown(&c, "sleeper").await;
        let on_disk = disk_ticks(&disk);
        assert_consecutive("ticks on the disk", &on_disk);
        assert!(on_disk.len() as u64 > last, "{} ticks on disk, {last} before the suspend", on_disk.len());
        c.delete_vm(pb::DeleteVmRequest { vm_id: "sleeper".into(), ..Default::default() }).await.unwrap();
        host.daemon.shutdown();
    });
}

#[test]
fn three_clones_of_a_snapshot_start_at_its_tick_with_their_own_disks() {
    guest_image();
    in_netns(|| async {
        let host = Host::start().await;
        let c = host.client();
        let disk = host.rootfs_copy("origin");
        c.create_vm(pb::CreateVmRequest {
            vm_id: "origin".into(),
            config: config(&disk, &[(0, 80)]).into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.boot_vm(pb::BootVmRequest { vm_id: "origin".into(), ..Default::default() }).await.unwrap();
        let con = console(&c, "origin").await;
        wait_ticks(&con, 3).await;
        let origin_net = info(&c, "origin").await.network_info.as_option().cloned().unwrap();
        let origin_port: SocketAddr = format!("127.0.0.1:{}", origin_net.port_mappings[0].host_port).parse().unwrap();
        wait_until("the source's HTTP server", BOOT, || async {
            http_body(origin_port).await.as_deref() == Some("metald-guest")
        })
        .await;

        let snap = c
            .snapshot_vm(pb::SnapshotVmRequest { vm_id: "origin".into(), name: "warm".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        let at = *ticks(&con).last().unwrap();
        let s = snap.snapshot.as_option().unwrap();
        assert_eq!((s.name.as_str(), s.source_vm_id.as_str(), s.hypervisor.as_str()), ("warm", "origin", "qemu"));
        assert!(s.size_bytes > 0);
        let listed = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned();
        assert_eq!(listed.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["warm"]);
        // Another customer sees nothing and cannot clone it.
        let other = vm_client(
            &format!("http://{}", host.daemon.addr),
            "dev_customer_other",
            WireProtocol::ConnectProto,
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(
            other.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned().snapshots.is_empty()
        );
        let e = other
            .create_vm(pb::CreateVmRequest { from_snapshot: "warm".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::NotFound, "{e:?}");
        // The source runs on.
        assert_eq!(info(&c, "origin").await.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
        let origin_ticks = ticks(&con).len();

        let mut clones = Vec::new();
        for k in 0..3 {
            let id = format!("clone-{k}");
            let r = c
                .create_vm(pb::CreateVmRequest {
                    vm_id: id.clone(),
                    from_snapshot: "warm".into(),
                    port_mappings: vec![pb::PortMapping { guest_port: 80, ..Default::default() }],
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("clone {id}: {e:?}"))
                .into_owned();
            assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
            clones.push(id);
        }
        let mut pids = vec![pid(&c, "origin").await];
        for id in &clones {
            let con = console(&c, id).await;
            wait_ticks(&con, 1).await;
            let t = ticks(&con);
            assert_eq!(t[0], at + 1, "{id} starts at the snapshot's tick {at}: {t:?}");
            let p = pid(&c, id).await;
            assert!(!pids.contains(&p), "{id} has its own QEMU");
            pids.push(p);
        }
        wait_ticks(&con, origin_ticks + 2).await;

        // Fresh randomness: each clone's guest took its own new generation
        // (metald's generation port, metald-init's watcher; the reseed
        // ioctls succeeded) and its generator said something else than every
        // other clone's after it. (A guest this young also reseeds by itself
        // within seconds, from interrupt timings, so the differing outputs
        // alone would not prove the generation arrived; the line does.)
        let mut seen: Vec<String> = Vec::new();
        for id in &clones {
            let con = console(&c, id).await;
            wait_until(&format!("{id}'s guest to reseed"), BOOT, || async { reseed(&con).is_some() }).await;
            let r = reseed(&con).unwrap();
            assert!(
                !seen.contains(&r),
                "{id}'s generator after its reseed ({r}) says what another clone's did: {seen:?}"
            );
            seen.push(r);
        }
        assert_eq!(reseed(&con), None, "the source is no clone: it gets no new generation");

        // Each clone has its own address and its own port mapping, both
        // answered by its own guest (which kept the source's in-guest
        // address: the host maps them); the source still answers on its own.
        let mut addrs = vec![origin_net.ip_address.clone()];
        for id in &clones {
            let n = info(&c, id).await.network_info.as_option().cloned().expect("a clone's network_info");
            assert!(!addrs.contains(&n.ip_address), "{id} has its own address: {} in {addrs:?}", n.ip_address);
            assert_ne!(n.tap_device, origin_net.tap_device);
            assert_ne!(n.port_mappings[0].host_port, origin_net.port_mappings[0].host_port);
            let mapped: SocketAddr = format!("127.0.0.1:{}", n.port_mappings[0].host_port).parse().unwrap();
            let direct: SocketAddr = format!("{}:80", n.ip_address).parse().unwrap();
            for (what, addr) in [("port mapping", mapped), ("address", direct)] {
                wait_until(&format!("{id}'s {what} {addr} to answer"), BOOT, || async {
                    http_body(addr).await.as_deref() == Some("metald-guest")
                })
                .await;
            }
            addrs.push(n.ip_address.clone());
        }
        assert_eq!(http_body(origin_port).await.as_deref(), Some("metald-guest"));

        // A tampered compatibility record is refused, saying what differs.
        let snapshots = host.data().join("snapshots");
        let dir = std::fs::read_dir(&snapshots).unwrap().flatten().next().unwrap().path();
        let meta_path = dir.join("meta.json");
        let meta = std::fs::read_to_string(&meta_path).unwrap();
        std::fs::write(&meta_path, meta.replace("\"microvm\"", "\"q35\"")).unwrap();
        let e = c
            .create_vm(pb::CreateVmRequest {
                vm_id: "clone-x".into(),
                from_snapshot: "warm".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::FailedPrecondition, "{e:?}");
        assert!(e.message.as_deref().unwrap_or("").contains("machine"), "{e:?}");
        std::fs::write(&meta_path, meta).unwrap();

        // Deleting the snapshot leaves the clones running.
        c.delete_snapshot(pb::DeleteSnapshotRequest { name: "warm".into(), ..Default::default() }).await.unwrap();
        assert!(!dir.exists());

        // Each disk holds its own guest's ticks only: the clones' copies
        // start with the source's first ticks and go on independently.
        let mut disks = vec![("origin".to_owned(), disk.clone(), con.clone())];
        for id in &clones {
            let i = info(&c, id).await;
            assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "{id}");
            let root = i.config.as_option().unwrap().storage[0].path.clone();
            assert_ne!(PathBuf::from(&root), disk, "{id} has its own disk");
            disks.push((id.clone(), PathBuf::from(root), console(&c, id).await));
        }
        for (id, _, _) in &disks {
            shutdown(&c, id).await;
        }
        for (id, d, con) in &disks {
            let t = disk_ticks(d);
            assert_consecutive(&format!("{id}'s disk"), &t);
            let printed = *ticks(con).last().unwrap();
            // Each tick is on the disk before it is printed.
            assert!(t.len() as u64 >= printed, "{id}: {} ticks on its disk, printed up to {printed}", t.len());
        }
        host.daemon.shutdown();
    });
}
