//! The fault-injection harness: the real `metald` binary is killed with
//! SIGKILL at random instants while a client drives random mutating
//! operations (create, boot, pause, resume, shutdown, delete), then started
//! again on the same data directory. After each restart:
//!
//! - no operation is left half-done (the store holds no intent once the VMs
//!   are settled, and no VM is still marked reconciling);
//! - `<data>/vms/` holds exactly the directories of the VMs metald reports;
//! - every live hypervisor process naming a VM directory is the recorded
//!   VMM of a VM that owns one (created, running or paused), one per VM;
//! - every VM's reported state is the hypervisor's own (asked through its
//!   API socket for Firecracker; through QMP for QEMU once metald has let go);
//! - every id can be deleted and created again, cleanly.
//!
//! With host networking on (fake backend, real kernel objects, in a network
//! namespace of the test's own), every VM has a managed NIC with a port
//! mapping, and after each restart the kernel holds exactly what the
//! store leased: the TAPs (by alias), the table's `vm_taps` elements and
//! its port mappings, none missing, none left over.
//!
//! With images (fake backend, a real registry), VMs are created from
//! several images, so kills land in pulls, base builds and writable
//! disks; after each restart the cache holds no pull work and only
//! published bases, and every image VM has its base and writable disk.
//!
//! Backends: the in-process fake (many iterations: store, intents,
//! directories), the fake Firecracker (real processes, many iterations) and
//! QEMU with the real guest image (a few iterations). `METALD_CRASH_SEED`
//! replays a run; `METALD_CRASH_ITERATIONS` runs longer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;

const TOKEN: &str = "dev_customer_acme";
const IDS: [&str; 4] = ["crash-0", "crash-1", "crash-2", "crash-3"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Fake,
    FakeNet,
    FakeFirecracker,
    Qemu,
    /// The fake backend creating image VMs from a real registry: kills land
    /// in pulls, base builds and writable-disk creation.
    FakeImages,
}

/// Distinct images the image harness creates from (each pulled once).
const IMAGES: usize = 6;

/// One data directory and the `metald` binary serving it, restarted at will.
struct Host {
    kind: Kind,
    tmp: tempfile::TempDir,
    env: std::collections::HashMap<String, String>,
    port: u16,
    log: PathBuf,
    kernel: String,
    metald: Option<MetaldProcess>,
    /// The registry of `Kind::FakeImages` (killed on drop).
    registry: Option<support::registry::Registry>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.metald.take();
        kill_processes_under(self.tmp.path());
    }
}

impl Host {
    fn new(kind: Kind) -> Host {
        let tmp = tempfile::Builder::new().prefix("metald-crash-").tempdir().unwrap();
        let assets = tmp.path().join("assets");
        std::fs::create_dir_all(&assets).unwrap();
        let port = free_port();
        let mut vars = vec![
            ("ADDRESS", "127.0.0.1".to_owned()),
            ("PORT", port.to_string()),
            ("DATA_DIR", tmp.path().join("data").display().to_string()),
            ("AUTH_DEV_TOKENS", "true".to_owned()),
            ("LOG_LEVEL", "debug".to_owned()),
        ];
        let kernel = match kind {
            Kind::Fake | Kind::FakeNet | Kind::FakeFirecracker | Kind::FakeImages => {
                std::fs::write(assets.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
                vars.push(("ASSET_DIRS", assets.display().to_string()));
                assets.join("vmlinux")
            }
            Kind::Qemu => {
                let image = guest_image();
                vars.push(("ASSET_DIRS", image.display().to_string()));
                vars.push(("QEMU_ACCEL", "tcg".to_owned()));
                image.join("vmlinux")
            }
        };
        match kind {
            Kind::Fake => vars.push(("BACKEND", "fake".to_owned())),
            Kind::FakeNet => {
                vars.push(("BACKEND", "fake".to_owned()));
                vars.push(("NETWORK_ENABLED", "true".to_owned()));
            }
            Kind::FakeFirecracker => {
                vars.push(("BACKEND", "firecracker".to_owned()));
                vars.push(("FIRECRACKER_BINARY", env!("CARGO_BIN_EXE_metald-fake-firecracker").to_owned()));
            }
            Kind::Qemu => vars.push(("BACKEND", "qemu".to_owned())),
            Kind::FakeImages => vars.push(("BACKEND", "fake".to_owned())),
        }
        let registry = (kind == Kind::FakeImages).then(|| {
            let registry = support::registry::Registry::start(None);
            // Several images, each with ~2 MiB of random bytes: pulls and
            // base builds long enough for kills to land in them.
            for i in 0..IMAGES {
                let img = support::registry::ImageBuilder::new(tmp.path(), &format!("v{i}"));
                img.layer(|root| {
                    let data: Vec<u8> = (0..2 << 20).map(|_| rand::random::<u8>()).collect();
                    std::fs::write(root.join("data"), data).unwrap();
                });
                img.config(&["--config.cmd=/data"]);
                registry.push(&img.layout, &format!("v{i}"), "crash");
            }
            std::fs::write(assets.join("initrd"), b"fake initramfs").unwrap();
            vars.push(("GUEST_KERNEL", assets.join("vmlinux").display().to_string()));
            vars.push(("GUEST_INITRD", assets.join("initrd").display().to_string()));
            vars.push(("IMAGE_INSECURE_REGISTRIES", registry.host.clone()));
            vars.push(("IMAGE_WRITABLE_MB", "16".to_owned()));
            registry
        });
        let env = metald_env(vars);
        let log = tmp.path().join("metald.log");
        Host { kind, kernel: kernel.display().to_string(), tmp, env, port, log, metald: None, registry }
    }

    fn vms_dir(&self) -> PathBuf {
        self.tmp.path().join("data").join("vms")
    }

    fn client(&self) -> VmClient {
        vm_client(
            &format!("http://127.0.0.1:{}", self.port),
            TOKEN,
            WireProtocol::ConnectProto,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    async fn up(&mut self) {
        self.metald = Some(spawn_metald(&self.env, &self.log));
        wait_serving(&self.client(), Duration::from_secs(60), &self.log).await;
    }

    fn kill9(&mut self) {
        // MetaldProcess sends SIGKILL and reaps when dropped.
        self.metald.take();
    }

    /// SIGTERM: metald stops and lets go of its VMMs (they keep running).
    fn stop(&mut self) {
        if let Some(mut p) = self.metald.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(p.pid()).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            p.0.wait().unwrap();
        }
    }

    fn config(&self) -> pb::VmConfig {
        if let Some(registry) = &self.registry {
            let mut c = vm_config(&self.kernel);
            c.boot = Default::default();
            c.storage.clear();
            let tag = rand::random_range(0..IMAGES);
            c.image = pb::ContainerImage { reference: format!("{}/crash:v{tag}", registry.host), ..Default::default() }
                .into();
            return c;
        }
        let mut c = vm_config(&self.kernel);
        if self.kind == Kind::Qemu {
            c.memory = pb::MemoryConfig { size_bytes: 64 << 20, ..Default::default() }.into();
        }
        if self.kind == Kind::FakeNet {
            c.network = vec![pb::NetworkInterface {
                port_mappings: vec![pb::PortMapping { guest_port: 80, ..Default::default() }],
                ..Default::default()
            }];
        }
        c
    }
}

/// One random mutating call (its outcome does not matter: the harness
/// checks the state metald reports after the crash, not this call).
async fn random_op(c: &VmClient, host: &Host, rng: &mut StdRng) {
    let id = IDS[rng.random_range(0..IDS.len())].to_owned();
    let _ = match rng.random_range(0..7) {
        0 | 1 => c
            .create_vm(pb::CreateVmRequest { vm_id: id, config: host.config().into(), ..Default::default() })
            .await
            .map(|_| ()),
        2 => c.boot_vm(pb::BootVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        3 => c.pause_vm(pb::PauseVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        4 => c.resume_vm(pb::ResumeVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        5 => c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id, force: true, ..Default::default() }).await.map(|_| ()),
        _ => c.delete_vm(pb::DeleteVmRequest { vm_id: id, force: true, ..Default::default() }).await.map(|_| ()),
    };
}

/// The VMs metald reports, once none is reconciling: id → (state, pid).
async fn settled_vms(c: &VmClient) -> BTreeMap<String, (pb::VmState, Option<i32>)> {
    'poll: for _ in 0..600 {
        let mut out = BTreeMap::new();
        let list = c.list_vms(pb::ListVmsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_owned();
        for vm in list.vms {
            let info = c
                .get_vm_info(pb::GetVmInfoRequest { vm_id: vm.vm_id.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            if info.state_reconciling || !info.operation_in_progress.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'poll;
            }
            let pid = info.backend_info.get("pid").map(|p| p.parse().unwrap());
            out.insert(vm.vm_id, (info.state.as_known().unwrap(), pid));
        }
        return out;
    }
    panic!("VMs still reconciling after 60 s");
}

/// Live processes naming a directory under `vms` (command line or working
/// directory), by that directory's name.
fn vmm_processes(vms: &Path) -> BTreeMap<String, Vec<i32>> {
    let prefix = format!("{}/", vms.display());
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for pid in processes_under(vms) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let text = format!("{} {}/", String::from_utf8_lossy(&cmdline).replace('\0', " "), cwd.display());
        let Some(at) = text.find(&prefix) else { continue };
        let rest = &text[at + prefix.len()..];
        let name: String = rest.chars().take_while(|c| !matches!(c, '/' | ',' | ' ' | ':' | '=')).collect();
        out.entry(name).or_default().push(pid);
    }
    out
}

/// `GET /` on a Firecracker API socket: its `state`.
async fn firecracker_state(socket: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let body = &out[out.find('{').unwrap()..=out.rfind('}').unwrap()];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["state"].as_str().unwrap().to_owned()
}

/// `query-status` over a QMP socket (metald must have let go of it).
async fn qmp_status(socket: &Path) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    lines.next_line().await.unwrap(); // greeting
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n").await.unwrap();
    loop {
        let line = lines.next_line().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(status) = v["return"]["status"].as_str() {
            return status.to_owned();
        }
    }
}

fn intents(host: &Host) -> usize {
    let db = rusqlite::Connection::open(host.tmp.path().join("data").join("metald.db")).unwrap();
    usize::try_from(db.query_row("SELECT count(*) FROM intents", [], |r| r.get::<_, i64>(0)).unwrap()).unwrap()
}

/// Every invariant of the module doc, after a restart.
async fn check(host: &Host, round: usize) -> BTreeMap<String, (pb::VmState, Option<i32>)> {
    let c = host.client();
    let vms = settled_vms(&c).await;
    let ctx = format!("round {round}, VMs {vms:?}, log {}", host.log.display());
    assert_eq!(intents(host), 0, "an operation was left half-done: {ctx}");
    let dirs: BTreeSet<String> =
        std::fs::read_dir(host.vms_dir()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(dirs, vms.keys().cloned().collect::<BTreeSet<_>>(), "VM directories: {ctx}");
    if host.kind == Kind::FakeNet {
        check_network(host, &vms, &ctx);
    }
    if host.kind == Kind::FakeImages {
        check_images(host, &vms, &ctx).await;
    }
    if matches!(host.kind, Kind::Fake | Kind::FakeNet | Kind::FakeImages) {
        return vms;
    }
    let procs = vmm_processes(&host.vms_dir());
    for (id, pids) in &procs {
        let (state, pid) = vms.get(id).unwrap_or_else(|| panic!("process {pids:?} of unknown VM {id}: {ctx}"));
        assert_ne!(*state, pb::VmState::VM_STATE_SHUTDOWN, "a shut-down VM {id} has processes {pids:?}: {ctx}");
        assert_eq!(pids, &vec![pid.unwrap()], "VM {id}'s processes: {ctx}");
    }
    for (id, (state, _)) in &vms {
        let has_process = *state != pb::VmState::VM_STATE_SHUTDOWN;
        assert_eq!(procs.contains_key(id), has_process, "VM {id} in {state:?}: {ctx}");
        if host.kind == Kind::FakeFirecracker && has_process {
            let info = c
                .get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            let hv = firecracker_state(&info.backend_info["api_socket"]).await;
            let want = match state {
                pb::VmState::VM_STATE_CREATED => "Not started",
                pb::VmState::VM_STATE_RUNNING => "Running",
                pb::VmState::VM_STATE_PAUSED => "Paused",
                _ => "none",
            };
            assert_eq!(hv, want, "VM {id}: reported {state:?}, Firecracker says {hv}: {ctx}");
        }
    }
    vms
}

/// The image cache holds no work of an interrupted pull and only
/// published bases; every image VM has its writable disk and its base.
async fn check_images(host: &Host, vms: &BTreeMap<String, (pb::VmState, Option<i32>)>, ctx: &str) {
    let cache = host.tmp.path().join("data").join("images");
    let work: Vec<_> = std::fs::read_dir(cache.join("work")).unwrap().collect();
    assert!(work.is_empty(), "pull work left in the cache: {work:?}: {ctx}");
    for base in std::fs::read_dir(cache.join("bases")).unwrap() {
        let base = base.unwrap().path();
        assert!(base.join("image.json").is_file() && base.join("base.ext4").is_file(), "{base:?}: {ctx}");
    }
    let c = host.client();
    for id in vms.keys() {
        let info =
            c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        let cfg = info.config.as_option().unwrap();
        assert!(cfg.image.digest.starts_with("sha256:"), "VM {id} has no digest: {ctx}");
        assert!(Path::new(&cfg.storage[0].path).is_file(), "VM {id}'s base: {ctx}");
        assert!(host.vms_dir().join(id).join("writable.ext4").is_file(), "VM {id}'s writable disk: {ctx}");
    }
}

/// The kernel holds exactly the store's leases, and the store leases
/// exactly for the VMs metald reports.
fn check_network(host: &Host, vms: &BTreeMap<String, (pb::VmState, Option<i32>)>, ctx: &str) {
    let db = rusqlite::Connection::open(host.tmp.path().join("data").join("metald.db")).unwrap();
    let column = |sql: &str| -> BTreeSet<String> {
        let mut stmt = db.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
    };
    let leased_vms = column("SELECT DISTINCT vm_id FROM net_nics");
    assert_eq!(leased_vms, vms.keys().cloned().collect::<BTreeSet<_>>(), "leases: {ctx}");
    let taps = column("SELECT tap FROM net_nics");
    let ports: i64 = db.query_row("SELECT count(*) FROM net_ports", [], |r| r.get(0)).unwrap();
    let kernel_taps = || -> BTreeSet<String> {
        let out = std::process::Command::new("ip").args(["-j", "link", "show"]).output().unwrap();
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["ifalias"].as_str().is_some_and(|a| a.starts_with("metald:")))
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    };
    // A deleted VM's TAP goes right after its DeleteVm returned (off the
    // call's path); after a restart the rebuild removed every stray.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = kernel_taps();
    while now != taps && now.is_superset(&taps) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = kernel_taps();
    }
    assert_eq!(now, taps, "TAPs in the kernel vs leased: {ctx}");
    let nft = |set: &str| -> Vec<serde_json::Value> {
        let out =
            std::process::Command::new("nft").args(["-j", "list", "set", "inet", "metald", set]).output().unwrap();
        if !out.status.success() {
            // A map is listed with `list map`.
            let out =
                std::process::Command::new("nft").args(["-j", "list", "map", "inet", "metald", set]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            return v["nftables"][1]["map"]["elem"].as_array().cloned().unwrap_or_default();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"][1]["set"]["elem"].as_array().cloned().unwrap_or_default()
    };
    let elems: BTreeSet<String> = nft("vm_taps").iter().map(|e| e.as_str().unwrap().to_owned()).collect();
    assert_eq!(elems, taps, "vm_taps elements vs leased: {ctx}");
    assert_eq!(nft("ports4").len(), usize::try_from(ports).unwrap(), "port mappings in the table vs leased: {ctx}");
}

async fn run(kind: Kind, iterations: usize, ops: usize, max_kill_ms: u64) {
    let seed: u64 = std::env::var("METALD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let iterations = std::env::var("METALD_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(iterations);
    eprintln!("crash harness {kind:?}: seed {seed} (METALD_CRASH_SEED), {iterations} iterations");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut host = Host::new(kind);
    host.up().await;
    for round in 0..iterations {
        let c = host.client();
        let mut op_rng = StdRng::seed_from_u64(rng.random());
        let h = &host;
        let ops_task = async {
            for _ in 0..ops {
                random_op(&c, h, &mut op_rng).await;
            }
        };
        let kill_after = Duration::from_millis(rng.random_range(0..max_kill_ms));
        // Drive operations until the kill instant (or until they are done).
        let _ = tokio::time::timeout(kill_after, ops_task).await;
        host.kill9();
        host.up().await;
        let vms = check(&host, round).await;
        eprintln!("round {round}: killed after {kill_after:?}; then {vms:?}");
    }
    // What the restarts found and repaired (the log's summary lines).
    let log = std::fs::read_to_string(&host.log).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("state recovered from the store")).skip(1) {
        eprintln!("{}", &line[line.find("vms").unwrap_or(0)..]);
    }
    // Every id can be used again, cleanly; then nothing is left at all.
    let c = host.client();
    for id in IDS {
        let _ = c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await;
        c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: host.config().into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("re-creating {id}: {e:?}"));
        c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    }
    let vms = check(&host, iterations).await;
    assert_eq!(vms.len(), IDS.len());
    if kind == Kind::Qemu {
        // QEMU serves one QMP client: ask it once metald has let go.
        c.pause_vm(pb::PauseVmRequest { vm_id: IDS[0].into(), ..Default::default() }).await.unwrap();
        host.stop();
        for id in IDS {
            let status = qmp_status(&host.vms_dir().join(id).join("qmp.sock")).await;
            let want = if id == IDS[0] { "paused" } else { "running" };
            assert_eq!(status, want, "VM {id}");
        }
        host.up().await;
    }
    let c = host.client();
    for id in IDS {
        c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await.unwrap();
    }
    assert!(check(&host, iterations + 1).await.is_empty());
    assert!(vmm_processes(&host.vms_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_fake_backend() {
    run(Kind::Fake, 40, 12, 40).await;
}

#[test]
fn kill_9_at_random_instants_fake_backend_with_host_networking() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        let lo = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
        assert!(lo.success());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(Kind::FakeNet, 25, 12, 60));
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_during_image_pulls() {
    run(Kind::FakeImages, 15, 8, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_fake_firecracker() {
    run(Kind::FakeFirecracker, 30, 12, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_qemu_real_guests() {
    run(Kind::Qemu, 8, 10, 800).await;
}
