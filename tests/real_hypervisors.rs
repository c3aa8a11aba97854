//! The VM lifecycle against the real Firecracker (plain, and jailed under a
//! non-root uid) and Cloud Hypervisor of `../shared/hypervisors/` (issue
//! 18), at the API and process level: guests do not boot under these
//! machines' KVM, so the VM runs the halting kernel of `support::saves` and
//! nothing waits for guest output. Each suite creates a VM with a disk and a
//! NIC (a TAP the test makes), boots, pauses, resumes, reads info with
//! metrics, reboots, shuts down gracefully and forced, boots again, restarts
//! metald with the VM running (it reattaches), and deletes; then no process,
//! socket, VM directory, jail or cgroup is left and the asset files are
//! unchanged (owner, mode, content). Where a binary is absent the suite says
//! so on stderr and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use connectrpc::ErrorCode;
use metald::pb::vmprovisioner::v1 as pb;
use support::{
    KillOnDrop, TOKEN_A, TestDaemon, create, halting_vm_config, info, process_alive, processes_under, real_hypervisor,
    vm_dir, wait_until,
};

const WAIT: Duration = Duration::from_secs(20);

/// A TAP device the test owns (deleted on drop), optionally owned by `user`
/// (a jailed Firecracker runs as that uid and must be allowed to open it).
struct Tap(String);

impl Tap {
    fn new(tag: &str, user: Option<u32>) -> Tap {
        let name = format!("mtr{}{tag}", std::process::id() % 100_000);
        let _ =
            std::process::Command::new("ip").args(["link", "del", &name]).stderr(std::process::Stdio::null()).status();
        let mut args: Vec<String> = ["tuntap", "add", "dev", &name, "mode", "tap"].map(String::from).into();
        if let Some(u) = user {
            args.extend(["user".to_string(), u.to_string()]);
        }
        let ok = std::process::Command::new("ip").args(&args).status().unwrap().success();
        assert!(ok, "ip {args:?}");
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// Owner, mode and content of each asset file, to compare after the run.
fn asset_state(dir: &Path) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, m.uid(), m.gid(), m.mode(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Every cgroup directory named `id` under the cgroup mounts of this host
/// (v1 controllers and v2), found from `/proc/mounts`.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let mut found = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 3 || !(f[2] == "cgroup" || f[2] == "cgroup2") {
            continue;
        }
        for parent in std::fs::read_dir(f[1]).into_iter().flatten().flatten() {
            let d = parent.path().join(id);
            if d.is_dir() {
                found.push(d);
            }
        }
    }
    found
}

fn state(i: &pb::GetVmInfoResponse) -> Option<pb::VmState> {
    i.state.as_known()
}

fn stop_reason(i: &pb::GetVmInfoResponse) -> Option<pb::StopReason> {
    i.stop.as_option().and_then(|s| s.reason.as_known())
}

fn pid(i: &pb::GetVmInfoResponse) -> i32 {
    i.backend_info["pid"].parse().unwrap()
}

async fn wait_state(t: &TestDaemon, id: &str, want: pb::VmState) {
    wait_until(&format!("{id} {want:?}"), WAIT, || async { state(&info(t, id).await) == Some(want) }).await;
}

/// The lifecycle every real hypervisor goes through; `sockets` are the API
/// socket paths of the VM (checked gone at the end), `jail` its jail dir.
async fn lifecycle(mut t: TestDaemon, id: &str, tap: &Tap, jail: Option<&Path>) -> TestDaemon {
    let mut config = halting_vm_config(&t);
    // No MAC given: metald generates one (locally administered) and reports it.
    config.network = vec![pb::NetworkInterface { id: "eth0".into(), tap_device: tap.0.clone(), ..Default::default() }];
    let assets_before = asset_state(&t.assets());
    let c = t.client(TOKEN_A);
    create(&t, id, config).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_CREATED));
    let mac = &i.network_interfaces[0].mac_address;
    assert!(mac.starts_with("02:") && mac.len() == 17, "a generated MAC: {mac:?}");

    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    let first = pid(&i);
    assert!(process_alive(first));
    // The TAP is the one given, attached by the hypervisor (it holds it open).
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{first}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(fds.iter().any(|p| p == "/dev/net/tun"), "the VMM has the TAP open: {fds:?}");
    // The console holds the guest's output only, none of the VMM's own log lines.
    let console = std::fs::read_to_string(&i.backend_info["console_log"]).unwrap_or_default();
    assert!(!console.contains("Running Firecracker") && !console.contains("API server"), "{console}");

    // Another VM on the same TAP: the device is busy, said as such (Firecracker's at create,
    // Cloud Hypervisor's at boot: it opens TAPs only then), naming the device and its holder.
    let other = format!("{id}-2");
    let mut second = halting_vm_config(&t);
    second.network = vec![pb::NetworkInterface { id: "eth0".into(), tap_device: tap.0.clone(), ..Default::default() }];
    let busy = match create(&t, &other, second).await {
        Err(e) => e,
        Ok(_) => c.boot_vm(pb::BootVmRequest { vm_id: other.clone(), ..Default::default() }).await.unwrap_err(),
    };
    assert_eq!(busy.code, ErrorCode::FailedPrecondition, "{busy:?}");
    let msg = busy.message.unwrap_or_default();
    assert!(msg.contains(&tap.0) && msg.contains(&format!("in use by process {first}")), "{msg}");
    let _ = c.delete_vm(pb::DeleteVmRequest { vm_id: other.clone(), force: true, ..Default::default() }).await;

    c.pause_vm(pb::PauseVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    assert_eq!(state(&info(&t, id).await), Some(pb::VmState::VM_STATE_PAUSED));
    c.resume_vm(pb::ResumeVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    let m = i.metrics.as_option().expect("metrics of a running VM");
    assert!(m.memory_usage_bytes > 0, "the VMM's resident memory: {m:?}");
    if let Some(fifo) = i.backend_info.get("metrics_fifo") {
        // Firecracker's metrics went through its FIFO (read out, totals kept), not into a file.
        assert_eq!(std::fs::metadata(fifo).unwrap().len(), 0);
        assert!(vm_dir(&t, id).join("metrics-totals.json").is_file(), "totals read from the FIFO");
    }

    c.reboot_vm(pb::RebootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(process_alive(pid(&i)));

    // Graceful: the halting guest never answers, so the timeout ends it.
    let req = pb::ShutdownVmRequest { vm_id: id.into(), timeout_seconds: 2, ..Default::default() };
    c.shutdown_vm(req).await.unwrap();
    let last = pid(&i);
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_SHUTDOWN));
    assert_eq!(stop_reason(&i), Some(pb::StopReason::STOP_REASON_REQUESTED));
    wait_until("the VMM gone", WAIT, || async { !process_alive(last) }).await;

    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING));
    let req = pb::ShutdownVmRequest { vm_id: id.into(), force: true, ..Default::default() };
    c.shutdown_vm(req).await.unwrap();
    assert_eq!(state(&info(&t, id).await), Some(pb::VmState::VM_STATE_SHUTDOWN));
    wait_until("the VMM gone", WAIT, || async { !process_alive(pid(&i)) }).await;

    // Killed from outside: SHUTDOWN, and the reason says so.
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let i = info(&t, id).await;
    assert_eq!(i.stop.as_option(), None, "a running VM has no stop reason");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid(&i)), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_state(&t, id, pb::VmState::VM_STATE_SHUTDOWN).await;
    let i = info(&t, id).await;
    assert_eq!(stop_reason(&i), Some(pb::StopReason::STOP_REASON_KILLED), "{:?}", i.stop);

    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let running = pid(&info(&t, id).await);
    t.restart().await;
    let c = t.client(TOKEN_A);
    let i = info(&t, id).await;
    assert_eq!(state(&i), Some(pb::VmState::VM_STATE_RUNNING), "reattached");
    assert_eq!(pid(&i), running, "the same process");
    c.pause_vm(pb::PauseVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    wait_state(&t, id, pb::VmState::VM_STATE_PAUSED).await;

    c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
    let e = c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(!process_alive(running));
    assert!(!vm_dir(&t, id).exists(), "VM directory removed");
    if let Some(j) = jail {
        assert!(!j.exists(), "jail {} removed", j.display());
    }
    assert!(processes_under(t.tmp.path()).is_empty(), "no process left");
    assert_eq!(cgroup_dirs(id), Vec::<PathBuf>::new(), "no cgroup left");
    assert!(asset_state(&t.assets()) == assets_before, "asset files unchanged (owner, mode, content)");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firecracker_lifecycle() {
    let Some(fc) = real_hypervisor("firecracker") else { return };
    let tap = Tap::new("f", None);
    let (t, _g) =
        support::start_with(&[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", fc.to_str().unwrap())], &[]).await;
    lifecycle(t, "rfl", &tap, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_jailed_firecracker_lifecycle_as_a_non_root_user() {
    let (Some(fc), Some(jailer)) = (real_hypervisor("firecracker"), real_hypervisor("jailer")) else { return };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("note: not root; skipping the jailer test (the jailer needs root)");
        return;
    }
    let tap = Tap::new("j", Some(4711));
    let jails = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(jails.path().to_path_buf());
    let base = jails.path().display().to_string();
    let (t, _g2) = support::start_with(
        &[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", fc.to_str().unwrap())],
        &[
            ("JAILER_ENABLED", "true"),
            ("JAILER_BINARY", jailer.to_str().unwrap()),
            ("JAILER_UID", "4711"),
            ("JAILER_GID", "4711"),
            ("JAILER_CHROOT_DIR", &base),
        ],
    )
    .await;
    // The operator gave the jail's uid write access to the disk; metald changes nothing.
    let _ = halting_vm_config(&t);
    std::os::unix::fs::chown(t.assets().join("real.ext4"), Some(4711), Some(4711)).unwrap();
    let jail = jails.path().join("firecracker").join("rjl");
    let mut t = lifecycle(t, "rjl", &tap, Some(&jail)).await;
    assert!(processes_under(jails.path()).is_empty());

    // What a metald killed mid-cleanup leaves (a jail, cgroups with a process in them) goes at
    // the next start: the process is killed, the cgroups and the jail removed.
    let ghost = jails.path().join("firecracker").join("ghost");
    std::fs::create_dir_all(ghost.join("root")).unwrap();
    let mut sleeper = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let roots: Vec<PathBuf> = ["cpu", "memory"].iter().map(|c| cgroup_mount(c)).collect();
    for r in &roots {
        let d = r.join("firecracker").join("ghost");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    }
    t.restart().await;
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the ghost's process was killed: {status:?}");
    assert_eq!(cgroup_dirs("ghost"), Vec::<PathBuf>::new(), "its cgroups removed");
    assert!(!ghost.exists(), "its jail removed");
}

/// The mount point of cgroup v1 controller `name` (from `/proc/mounts`).
fn cgroup_mount(name: &str) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f[2] == "cgroup" && f[3].split(',').any(|o| o == name))
        .map(|f| PathBuf::from(f[1]))
        .unwrap_or_else(|| panic!("no cgroup v1 mount of {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_hypervisor_lifecycle() {
    let Some(ch) = real_hypervisor("cloud-hypervisor") else { return };
    let tap = Tap::new("c", None);
    let (t, _g) =
        support::start_with(&[("BACKEND", "cloudhypervisor"), ("CLOUD_HYPERVISOR_BINARY", ch.to_str().unwrap())], &[])
            .await;
    lifecycle(t, "rch", &tap, None).await;
}

/// A real guest kernel does not run on these machines' KVM: the vCPU fails
/// with an internal error and the VMM ends (Firecracker with status 1,
/// Cloud Hypervisor with status 0). metald reports `CRASHED` with the
/// VMM's error line, not a clean stop. On a host where the guest boots, the
/// test says so and checks nothing more.
async fn a_guest_crash_is_reported(t: TestDaemon, id: &str, marker: &str) {
    let image = support::guest_image();
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        std::fs::copy(image.join(f), t.assets().join(f)).unwrap();
    }
    let mut config = t.config(&t.assets().join("vmlinux").display().to_string());
    config.memory = pb::MemoryConfig { size_bytes: 256 << 20, ..Default::default() }.into();
    config.boot = pb::BootConfig {
        kernel_path: t.assets().join("vmlinux").display().to_string(),
        initrd_path: t.assets().join("initramfs.cpio.gz").display().to_string(),
        kernel_args: "console=ttyS0".into(),
        ..Default::default()
    }
    .into();
    create(&t, id, config).await.unwrap();
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let console = std::path::PathBuf::from(&info(&t, id).await.backend_info["console_log"]);
    let done = || async {
        let booted = std::fs::read_to_string(&console).unwrap_or_default().contains("METALD_GUEST_READY");
        booted || state(&info(&t, id).await) == Some(pb::VmState::VM_STATE_SHUTDOWN)
    };
    wait_until("the guest to boot or crash", Duration::from_secs(150), done).await;
    let i = info(&t, id).await;
    if state(&i) != Some(pb::VmState::VM_STATE_SHUTDOWN) {
        eprintln!("note: the guest booted on this host's KVM; no crash to report");
    } else {
        let s = i.stop.as_option().expect("a stop reason");
        assert_eq!(s.reason.as_known(), Some(pb::StopReason::STOP_REASON_CRASHED), "{s:?}");
        assert!(s.detail.contains(marker), "the VMM's error line: {s:?}");
        assert!(s.stopped_timestamp > 0);
    }
    c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firecracker_guest_crash_is_reported_as_crashed() {
    let Some(fc) = real_hypervisor("firecracker") else { return };
    let (t, _g) =
        support::start_with(&[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", fc.to_str().unwrap())], &[]).await;
    a_guest_crash_is_reported(t, "rfx", "KVM_EXIT_INTERNAL_ERROR").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_hypervisor_guest_crash_with_status_0_is_reported_as_crashed() {
    let Some(ch) = real_hypervisor("cloud-hypervisor") else { return };
    let (t, _g) =
        support::start_with(&[("BACKEND", "cloudhypervisor"), ("CLOUD_HYPERVISOR_BINARY", ch.to_str().unwrap())], &[])
            .await;
    a_guest_crash_is_reported(t, "rcx", "VCPU generated error").await;
}
