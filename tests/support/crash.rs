//! The crash harnesses' host (`tests/crash.rs`, `tests/crash_saves.rs`):
//! a data directory and the real `metald` binary serving it, killed with
//! SIGKILL and started again at will; and the invariants that hold after
//! every restart, whatever the kill interrupted:
//!
//! - no operation is left half-done (no intent once the VMs are settled);
//! - `<data>/vms/` holds exactly the directories of the VMs metald reports;
//! - saves ([`check_saves`]): a SUSPENDED VM has a complete save
//!   (`suspended/meta.json` and the backend's file) and no process; no VM
//!   has a half-written save (`suspended.tmp/`), a stale one, or a
//!   `cont-pending` marker; `<data>/snapshots/` holds exactly the
//!   directories of the snapshots `ListSnapshots` reports, each complete;
//! - processes (real VMMs, [`check_processes`]): every live process naming
//!   a VM directory is the recorded VMM of a VM that owns one (created,
//!   running or paused), one per VM.
//!
//! Also the guest's `METALD_TICK <n>` lines of a console log ([`ticks`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::pb::vmprovisioner::v1 as pb;

use super::daemon::{MetaldProcess, metald_env, spawn_metald, vm_config, wait_serving};
use super::guest::{console_text, guest_image};
use super::net::free_port;
use super::process::{kill_processes_under, processes_under};

pub const TOKEN: &str = "dev_customer_acme";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Fake,
    FakeNet,
    FakeFirecracker,
    Qemu,
    /// The fake backend creating image VMs from a real registry: kills land
    /// in pulls, base builds and writable-disk creation.
    FakeImages,
}

impl Kind {
    /// Whether the backend suspends, snapshots and clones (Firecracker
    /// does not yet: its calls would only be refused).
    pub fn saves(self) -> bool {
        matches!(self, Kind::Fake | Kind::FakeNet | Kind::Qemu | Kind::FakeFirecracker)
    }

    /// The backend's own file in a complete save, beside `meta.json`.
    pub fn saved_file(self) -> &'static str {
        match self {
            Kind::Qemu => "memory",
            Kind::FakeFirecracker => "vmstate",
            _ => "fake-state.json",
        }
    }

    fn real_vmm(self) -> bool {
        matches!(self, Kind::FakeFirecracker | Kind::Qemu)
    }
}

/// Distinct images the image harness creates from (each pulled once).
pub const IMAGES: usize = 6;

/// id → (state, pid) of the VMs metald reports.
pub type Vms = BTreeMap<String, (pb::VmState, Option<i32>)>;

/// One data directory and the `metald` binary serving it, restarted at will.
pub struct Host {
    pub kind: Kind,
    pub tmp: tempfile::TempDir,
    pub env: HashMap<String, String>,
    pub port: u16,
    pub log: PathBuf,
    pub kernel: String,
    pub metald: Option<MetaldProcess>,
    /// The registry of `Kind::FakeImages` (killed on drop).
    pub registry: Option<super::registry::Registry>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.metald.take();
        kill_processes_under(self.tmp.path());
    }
}

impl Host {
    pub fn new(kind: Kind) -> Host {
        // METALD_CRASH_KEEP=1 keeps the directory (data, metald.log) for a look.
        let keep = std::env::var_os("METALD_CRASH_KEEP").is_some();
        let tmp = tempfile::Builder::new().prefix("metald-crash-").disable_cleanup(keep).tempdir().unwrap();
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
                // The image, and the test's own disks.
                vars.push(("ASSET_DIRS", format!("{}:{}", image.display(), assets.display())));
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
            let registry = super::registry::Registry::start(None);
            // Several images, each with ~2 MiB of random bytes: pulls and
            // base builds long enough for kills to land in them.
            for i in 0..IMAGES {
                let img = super::registry::ImageBuilder::new(tmp.path(), &format!("v{i}"));
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

    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir().join("vms")
    }

    pub fn assets(&self) -> PathBuf {
        self.tmp.path().join("assets")
    }

    /// A VM's console log (its directory is named by its id here: the
    /// harness has one customer, so host ids are the VMs' names).
    pub fn console(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id).join("console.log")
    }

    pub fn client(&self) -> VmClient {
        vm_client(
            &format!("http://127.0.0.1:{}", self.port),
            TOKEN,
            WireProtocol::ConnectProto,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    pub async fn up(&mut self) {
        self.spawn();
        self.wait_up().await;
    }

    /// Starts metald (without waiting for it to serve).
    pub fn spawn(&mut self) {
        self.metald = Some(spawn_metald(&self.env, &self.log));
    }

    /// Waits until the metald just spawned serves.
    pub async fn wait_up(&self) {
        wait_serving(&self.client(), Duration::from_secs(60), &self.log).await;
    }

    pub fn kill9(&mut self) {
        // MetaldProcess sends SIGKILL and reaps when dropped.
        self.metald.take();
    }

    /// SIGTERM: metald stops and lets go of its VMMs (they keep running).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.metald.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(p.pid()).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            p.0.wait().unwrap();
        }
    }

    /// The configuration of a new VM of this kind. QEMU guests boot the
    /// guest image's initramfs to its ticker (`METALD_TICK <n>` each second).
    pub fn config(&self) -> pb::VmConfig {
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
            let boot = c.boot.get_or_insert_default();
            boot.initrd_path = guest_image().join("initramfs.cpio.gz").display().to_string();
            boot.kernel_args = "console=ttyS0 quiet".into();
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

/// The VMs metald reports, once none is reconciling.
pub async fn settled_vms(c: &VmClient) -> Vms {
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
pub fn vmm_processes(vms: &Path) -> BTreeMap<String, Vec<i32>> {
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

/// `query-status` over a QMP socket (metald must have let go of it).
pub async fn qmp_status(socket: &Path) -> String {
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

fn store(host: &Host) -> rusqlite::Connection {
    rusqlite::Connection::open(host.data_dir().join("metald.db")).unwrap()
}

pub fn intents(host: &Host) -> usize {
    let n: i64 = store(host).query_row("SELECT count(*) FROM intents", [], |r| r.get(0)).unwrap();
    usize::try_from(n).unwrap()
}

/// The invariants every kind shares (module doc), after a restart; the
/// settled VMs and a context for failure messages.
pub async fn check_common(host: &Host, round: usize) -> (Vms, String) {
    let c = host.client();
    let vms = settled_vms(&c).await;
    let ctx = format!("round {round}, VMs {vms:?}, log {}", host.log.display());
    assert_eq!(intents(host), 0, "an operation was left half-done: {ctx}");
    let dirs: BTreeSet<String> =
        std::fs::read_dir(host.vms_dir()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(dirs, vms.keys().cloned().collect::<BTreeSet<_>>(), "VM directories: {ctx}");
    check_saves(host, &vms, &ctx).await;
    if host.kind.real_vmm() {
        check_processes(host, &vms, &ctx);
    }
    (vms, ctx)
}

/// Saves are complete or absent: see the module doc.
pub async fn check_saves(host: &Host, vms: &Vms, ctx: &str) {
    for (id, (state, pid)) in vms {
        let dir = host.vms_dir().join(id);
        for leftover in ["suspended.tmp", "cont-pending"] {
            assert!(!dir.join(leftover).exists(), "VM {id} in {state:?} has {leftover}: {ctx}");
        }
        let saved = dir.join("suspended");
        if *state == pb::VmState::VM_STATE_SUSPENDED {
            for file in ["meta.json", host.kind.saved_file()] {
                assert!(saved.join(file).is_file(), "suspended VM {id} has no {file} in its save: {ctx}");
            }
            assert_eq!(*pid, None, "suspended VM {id} reports a process: {ctx}");
        } else {
            assert!(!saved.exists(), "VM {id} in {state:?} keeps a save: {ctx}");
        }
    }
    // Snapshots: the store's rows are all ready and are what the API lists;
    // the directory holds exactly theirs, each complete.
    let listed: BTreeSet<String> = host
        .client()
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_owned()
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect();
    let db = store(host);
    let mut stmt = db.prepare("SELECT id, name, ready FROM snapshots").unwrap();
    let rows: Vec<(String, String, i64)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect();
    assert!(rows.iter().all(|r| r.2 == 1), "snapshot rows not ready: {rows:?}: {ctx}");
    assert_eq!(rows.iter().map(|r| r.1.clone()).collect::<BTreeSet<_>>(), listed, "snapshot rows: {ctx}");
    let root = host.data_dir().join("snapshots");
    let dirs: BTreeSet<String> =
        std::fs::read_dir(&root).into_iter().flatten().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let ids: BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(dirs, ids, "snapshot directories vs snapshots {listed:?}: {ctx}");
    for id in &ids {
        for file in ["meta.json", host.kind.saved_file()] {
            assert!(root.join(id).join(file).is_file(), "snapshot {id} has no {file}: {ctx}");
        }
    }
}

/// Live VMM processes are exactly the recorded ones: one per VM that owns
/// a process, none for a shut-down or suspended VM.
pub fn check_processes(host: &Host, vms: &Vms, ctx: &str) {
    let procs = vmm_processes(&host.vms_dir());
    let owns = |state: &pb::VmState| !matches!(state, pb::VmState::VM_STATE_SHUTDOWN | pb::VmState::VM_STATE_SUSPENDED);
    for (id, pids) in &procs {
        let (state, pid) = vms.get(id).unwrap_or_else(|| panic!("process {pids:?} of unknown VM {id}: {ctx}"));
        assert!(owns(state), "VM {id} in {state:?} has processes {pids:?}: {ctx}");
        assert_eq!(pids, &vec![pid.unwrap()], "VM {id}'s processes: {ctx}");
    }
    for (id, (state, _)) in vms {
        assert_eq!(procs.contains_key(id), owns(state), "VM {id} in {state:?}: {ctx}");
    }
}

/// The `METALD_TICK <n>` numbers of a console log, in order.
pub fn ticks(console: &Path) -> Vec<u64> {
    console_text(console).lines().filter_map(|l| l.trim().strip_prefix("METALD_TICK ")?.parse().ok()).collect()
}

/// Waits (bounded) until `console` shows more than `n` ticks; all of them.
pub async fn wait_ticks(console: &Path, n: usize) -> Vec<u64> {
    let what = format!("{} ticks in {}", n + 1, console.display());
    super::wait::wait_for(&what, Duration::from_secs(150), || ticks(console).len() > n).await;
    ticks(console)
}
