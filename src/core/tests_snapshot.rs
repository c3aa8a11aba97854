//! Suspend, resume, named snapshots and clones against the fake backend:
//! the states and files each leaves, what a failing save, restore or
//! continue leaves, the events observers see, the space saves may take,
//! and what a start after a crash makes of half-done saves
//! (`core/recover_saves.rs`). The fake's save is `fake-state.json` (the
//! guest's CPU time and boot count), so a restored guest's usage continues.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::snapshot::{CONT_PENDING, SUSPENDED_DIR, SUSPENDING_DIR};
use super::*;
use crate::backend::Observed;
use crate::backend::fake::{FakeBackend, FakeControl};
use crate::model::{
    BootSpec, Code, CpuSpec, DiskSpec, META_FILE, MemorySpec, PortSpec, SavedMeta, SnapshotRecord, VmSpec,
};

const FAKE_STATE: &str = "fake-state.json";
const PLENTY: u64 = 1 << 40;
const MEMORY: i64 = 64 << 20;

/// (host id, cause, from, to, whether a runtime came with it)
type Event = (String, Cause, Option<VmState>, Option<VmState>, bool);

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Event>>);

impl Observer for Recorder {
    fn on_event(&self, e: &VmEvent) {
        self.0.lock().unwrap().push((e.vm_id.to_string(), e.cause, e.from, e.to, e.runtime.is_some()));
    }
}

impl Recorder {
    fn of(&self, vm: &VmView) -> Vec<(Cause, Option<VmState>, Option<VmState>, bool)> {
        let events = self.0.lock().unwrap();
        events.iter().filter(|e| e.0 == vm.host_id.as_str()).map(|e| (e.1, e.2, e.3, e.4)).collect()
    }
}

struct Env {
    dir: PathBuf,
    mgr: Manager,
    fake: FakeControl,
    stop: CancellationToken,
    events: Arc<Recorder>,
}

/// A manager over the store and data directory in `dir` with a new fake,
/// which `prime` may steer before the manager's start uses it.
async fn open_with(dir: &Path, snapshot_max_bytes: u64, prime: impl FnOnce(&FakeControl)) -> Env {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = FakeBackend::new(tx);
    let fake = backend.control();
    prime(&fake);
    let store = Store::open(&dir.join("db")).unwrap();
    let stop = CancellationToken::new();
    let cfg = ManagerConfig {
        snapshot_max_bytes,
        vm_log_max_bytes: super::logs::DEFAULT_VM_LOG_MAX_BYTES,
        data_dir: dir.to_path_buf(),
        limits: Limits { max_vcpus: 8, max_memory_mb: 1024, asset_dirs: vec![assets] },
        max_vms: 100,
        net: Default::default(),
        images: Default::default(),
    };
    let mgr = Manager::open(cfg, Arc::new(backend), store, rx, stop.clone()).await.unwrap();
    let events = Arc::new(Recorder::default());
    mgr.add_observer(events.clone());
    Env { dir: dir.to_path_buf(), mgr, fake, stop, events }
}

async fn open(dir: &Path) -> Env {
    open_with(dir, PLENTY, |_| {}).await
}

fn a() -> CustomerId {
    CustomerId("a".into())
}

fn b() -> CustomerId {
    CustomerId("b".into())
}

fn name(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

/// The CPU time a fake save in `dir` recorded.
fn saved_cpu_ns(dir: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(FAKE_STATE)).unwrap()).unwrap();
    v["cpu_ns"].as_u64().unwrap()
}

impl Env {
    /// What a crash and a start make of this: a new manager (and fake, whose
    /// "processes" are recreated at reattach) over the same store and files.
    async fn restart_with(self, prime: impl FnOnce(&FakeControl)) -> Env {
        self.stop.cancel();
        let dir = self.dir.clone();
        drop(self);
        open_with(&dir, PLENTY, prime).await
    }

    async fn restart(self) -> Env {
        self.restart_with(|_| {}).await
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            cpu: CpuSpec { vcpus: 1, ..Default::default() },
            memory: MemorySpec { size_bytes: MEMORY, ..Default::default() },
            boot: BootSpec { kernel: self.mgr.inner.cfg.limits.asset_dirs[0].join("vmlinux"), ..Default::default() },
            ..Default::default()
        }
    }

    /// A spec with a writable disk `data`: an asset file holding `bytes`.
    fn spec_with_disk(&self, bytes: &[u8]) -> VmSpec {
        let path = self.mgr.inner.cfg.limits.asset_dirs[0].join("data.img");
        std::fs::write(&path, bytes).unwrap();
        let mut spec = self.spec();
        spec.storage.push(DiskSpec { id: "data".into(), path, ..Default::default() });
        spec
    }

    async fn running(&self, who: &CustomerId, spec: VmSpec) -> VmView {
        let vm = self.mgr.create(who, None, spec).await.unwrap();
        assert_eq!(self.mgr.boot(who, &vm.id).await.unwrap(), VmState::Running);
        self.mgr.get(who, &vm.id).unwrap()
    }

    fn state(&self, vm: &VmView) -> VmState {
        self.mgr.get(&vm.customer, &vm.id).unwrap().state()
    }

    fn dir(&self, vm: &VmView) -> PathBuf {
        self.mgr.vm_dir(&vm.host_id)
    }

    fn saved(&self, vm: &VmView) -> PathBuf {
        self.dir(vm).join(SUSPENDED_DIR)
    }

    fn snapshot_dir(&self, rec: &SnapshotRecord) -> PathBuf {
        self.dir.join("snapshots").join(&rec.id)
    }

    /// The entries of `<data dir>/snapshots/`, sorted.
    fn snapshot_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.join("vms")).unwrap().count()
    }

    fn intents(&self) -> Vec<Intent> {
        self.mgr.store().intents().unwrap()
    }

    async fn cpu_ns(&self, vm: &VmView) -> u64 {
        self.mgr.info(&vm.customer, &vm.id).await.unwrap().metrics.unwrap().usage.cpu_time_ns
    }

    /// The backend calls made for `vm` since call number `from`.
    fn calls_since(&self, vm: &VmView, from: usize) -> Vec<&'static str> {
        self.fake.calls().into_iter().skip(from).filter(|(id, _)| id == vm.host_id.as_str()).map(|(_, op)| op).collect()
    }

    /// What the fake says `vm`'s guest does.
    async fn observed(&self, vm: &VmView) -> Observed {
        let slot = self.mgr.index().by_id.get(&vm.host_id).cloned().unwrap();
        let rt = slot.cell().status.runtime().cloned().unwrap();
        self.mgr.backend().observe(&self.mgr.ctx(&slot), &rt).await.unwrap()
    }

    /// What a suspend leaves before a crash ends it: the guest paused and
    /// saved into `into` (with its `meta.json` when `complete`).
    async fn save_by_hand(&self, vm: &VmView, into: &Path, complete: bool) {
        let slot = self.mgr.index().by_id.get(&vm.host_id).cloned().unwrap();
        let mut rt = slot.cell().status.runtime().cloned().unwrap();
        let ctx = self.mgr.ctx(&slot);
        let backend = self.mgr.backend();
        backend.pause(&ctx, &mut rt).await.unwrap();
        std::fs::create_dir_all(into).unwrap();
        backend.save(&ctx, &rt, into).await.unwrap();
        if complete {
            let meta = SavedMeta {
                compat: backend.compat(&slot.spec),
                created_at: unix_now(),
                booted_at: rt.booted_at,
                disks: Vec::new(),
            };
            std::fs::write(into.join(META_FILE), serde_json::to_vec(&meta).unwrap()).unwrap();
        }
    }

    fn begin_intent(&self, vm: &VmView, op: &str) {
        let intent =
            Intent { vm_id: vm.host_id.clone(), customer: vm.customer.clone(), op: op.into(), started_at: unix_now() };
        self.mgr.store().begin(&intent).unwrap();
    }
}

// ---- suspend and resume ----------------------------------------------------

#[tokio::test]
async fn suspend_saves_the_guest_and_releases_its_process_and_resume_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = env.cpu_ns(&vm).await;
    assert!(before > 0);
    let n = env.fake.calls().len();
    assert_eq!(env.mgr.suspend(&a(), &vm.id).await.unwrap(), VmState::Suspended);
    assert_eq!(env.state(&vm), VmState::Suspended);
    assert!(!env.fake.is_alive(&vm.host_id), "the VMM is let go once the save is published");
    assert_eq!(env.calls_since(&vm, n), ["pause", "save", "shutdown"]);
    let saved = env.saved(&vm);
    assert!(saved.join(META_FILE).is_file() && saved.join(FAKE_STATE).is_file());
    assert!(!env.dir(&vm).join(SUSPENDING_DIR).exists());
    assert!(saved_cpu_ns(&saved) >= before, "the save holds the guest's CPU time");
    let meta = super::snapshot::read_meta(&saved).unwrap();
    assert_eq!(meta.compat, env.mgr.backend().compat(&vm.spec));
    let row = env.mgr.store().get(&vm.host_id).unwrap().unwrap();
    assert_eq!((row.state, row.runtime), (VmState::Suspended, None));
    assert!(env.intents().is_empty());
    let d = env.mgr.info(&a(), &vm.id).await.unwrap();
    assert!(d.saved_bytes > 0);
    assert!(d.metrics.is_none());

    let n = env.fake.calls().len();
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap(), VmState::Running);
    assert_eq!(env.calls_since(&vm, n), ["restore", "create", "resume"]);
    assert!(env.fake.is_alive(&vm.host_id));
    assert_eq!(env.observed(&vm).await, Observed::Running);
    let after = env.cpu_ns(&vm).await;
    assert!(after >= before, "usage continues from the save ({after} < {before})");
    assert!(!saved.exists(), "the save goes once the guest runs");
    assert!(!env.dir(&vm).join(CONT_PENDING).exists());
    assert_eq!(env.mgr.info(&a(), &vm.id).await.unwrap().saved_bytes, 0);
    let row = env.mgr.store().get(&vm.host_id).unwrap().unwrap();
    assert_eq!(row.state, VmState::Running);
    assert!(row.runtime.is_some_and(|rt| rt.pid.is_some()));
    assert!(env.intents().is_empty());
}

#[tokio::test]
async fn a_paused_vm_suspends_without_another_pause_and_resumes_running() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.mgr.pause(&a(), &vm.id).await.unwrap();
    let n = env.fake.calls().len();
    assert_eq!(env.mgr.suspend(&a(), &vm.id).await.unwrap(), VmState::Suspended);
    assert_eq!(env.calls_since(&vm, n), ["save", "shutdown"]);
    assert!(!env.fake.is_alive(&vm.host_id));
    assert!(env.saved(&vm).join(META_FILE).is_file());
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap(), VmState::Running);
    assert_eq!(env.observed(&vm).await, Observed::Running);
}

#[tokio::test]
async fn suspend_and_boot_are_refused_where_they_make_no_sense() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let created = env.mgr.create(&a(), None, env.spec()).await.unwrap();
    let down = env.running(&a(), env.spec()).await;
    env.mgr.shutdown(&a(), &down.id, StopMode::Force).await.unwrap();
    let suspended = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &suspended.id).await.unwrap();
    let n = env.fake.calls().len();
    let refused = |e: Error, says: &str| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.chain());
        assert!(e.chain().contains(says), "{}", e.chain());
    };
    let save_what = "only a running or paused guest can be saved";
    refused(env.mgr.suspend(&a(), &created.id).await.unwrap_err(), save_what);
    refused(env.mgr.suspend(&a(), &down.id).await.unwrap_err(), save_what);
    refused(env.mgr.suspend(&a(), &suspended.id).await.unwrap_err(), "already suspended");
    refused(env.mgr.boot(&a(), &suspended.id).await.unwrap_err(), "resume it instead");
    refused(env.mgr.pause(&a(), &suspended.id).await.unwrap_err(), "resume it first");
    refused(env.mgr.snapshot(&a(), &created.id, name("s")).await.unwrap_err(), save_what);
    refused(env.mgr.snapshot(&a(), &suspended.id, name("s")).await.unwrap_err(), "resume it first");
    assert_eq!(env.fake.calls().len(), n, "no backend call for a refused operation");
    assert_eq!(env.state(&created), VmState::Created);
    assert_eq!(env.state(&down), VmState::Shutdown);
    assert_eq!(env.state(&suspended), VmState::Suspended);
    assert!(env.saved(&suspended).join(META_FILE).is_file());
    assert!(env.intents().is_empty());
    assert!(env.mgr.snapshots(&a()).await.unwrap().is_empty());
}

#[tokio::test]
async fn shutdown_discards_the_save_and_delete_removes_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    assert_eq!(env.mgr.shutdown(&a(), &vm.id, StopMode::Force).await.unwrap(), VmState::Shutdown);
    assert!(!env.saved(&vm).exists());
    assert!(env.dir(&vm).is_dir());
    assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Shutdown);
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap_err().code(), Code::FailedPrecondition);
    // A fresh boot, not a restore.
    assert_eq!(env.mgr.boot(&a(), &vm.id).await.unwrap(), VmState::Running);

    let other = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &other.id).await.unwrap();
    env.mgr.delete(&a(), &other.id, false).await.unwrap();
    assert!(!env.dir(&other).exists());
    assert!(env.mgr.store().get(&other.host_id).unwrap().is_none());
    assert_eq!(env.mgr.get(&a(), &other.id).unwrap_err().code(), Code::NotFound);
    assert!(env.intents().is_empty());
}

#[tokio::test]
async fn a_failing_save_runs_the_guest_on_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    let seen = env.events.of(&vm).len();
    for op in ["save", "pause"] {
        env.fake.fail_next(op, "disk on fire");
        let e = env.mgr.suspend(&a(), &vm.id).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(e.chain().contains("disk on fire"), "{}", e.chain());
        assert_eq!(env.state(&vm), VmState::Running, "after a failing {op}");
        assert_eq!(env.observed(&vm).await, Observed::Running, "the guest runs on after a failing {op}");
        assert!(env.fake.is_alive(&vm.host_id));
        assert!(!env.saved(&vm).exists() && !env.dir(&vm).join(SUSPENDING_DIR).exists());
        assert!(env.intents().is_empty());
        assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Running);
    }
    assert_eq!(env.events.of(&vm).len(), seen, "a failed suspend changes no state");
    assert_eq!(env.mgr.suspend(&a(), &vm.id).await.unwrap(), VmState::Suspended);
}

#[tokio::test]
async fn a_failing_restore_keeps_the_save_and_can_be_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    let meta = env.saved(&vm).join(META_FILE);
    let kept = std::fs::read(&meta).unwrap();
    env.fake.fail_next("restore", "no memory");
    let e = env.mgr.resume(&a(), &vm.id).await.unwrap_err();
    assert!(e.chain().contains("no memory"), "{}", e.chain());
    // A restore whose reply was lost: the fake releases its VMM, as real ones do.
    env.fake.time_out_after_next("restore");
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap_err().code(), Code::DeadlineExceeded);
    std::fs::rename(&meta, env.dir(&vm).join("meta.away")).unwrap();
    let e = env.mgr.resume(&a(), &vm.id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.chain().contains("missing or damaged"), "{}", e.chain());
    std::fs::rename(env.dir(&vm).join("meta.away"), &meta).unwrap();
    let mut other: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    other["compat"]["vcpus"] = "4".into();
    std::fs::write(&meta, serde_json::to_vec(&other).unwrap()).unwrap();
    let e = env.mgr.resume(&a(), &vm.id).await.unwrap_err();
    assert!(e.code() == Code::FailedPrecondition && e.chain().contains("vcpus"), "{}", e.chain());
    std::fs::write(&meta, &kept).unwrap();
    assert_eq!(env.state(&vm), VmState::Suspended);
    assert!(!env.fake.is_alive(&vm.host_id));
    assert_eq!(std::fs::read(&meta).unwrap(), kept, "the save is intact");
    assert!(env.saved(&vm).join(FAKE_STATE).is_file());
    assert!(!env.dir(&vm).join(CONT_PENDING).exists());
    assert!(env.intents().is_empty());
    assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Suspended);
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap(), VmState::Running);
    assert_eq!(env.observed(&vm).await, Observed::Running);
}

#[tokio::test]
async fn a_restored_guest_that_did_not_continue_is_reported_as_the_hypervisor_has_it() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    env.fake.fail_next("resume", "stuck");
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap(), VmState::Paused);
    assert_eq!(env.observed(&vm).await, Observed::Paused);
    assert!(!env.saved(&vm).exists() && !env.dir(&vm).join(CONT_PENDING).exists());
    assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Paused);
    assert_eq!(env.mgr.resume(&a(), &vm.id).await.unwrap(), VmState::Running);

    // The continue acted, but its reply was lost: the record follows the guest.
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    env.fake.time_out_after_next("resume");
    env.mgr.resume(&a(), &vm.id).await.unwrap();
    assert_eq!(env.observed(&vm).await, Observed::Running);
    assert_eq!(env.state(&vm), VmState::Running);
    assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Running);
}

#[tokio::test]
async fn observers_see_the_guest_leave_and_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    env.mgr.resume(&a(), &vm.id).await.unwrap();
    env.mgr.pause(&a(), &vm.id).await.unwrap();
    env.mgr.suspend(&a(), &vm.id).await.unwrap();
    env.mgr.shutdown(&a(), &vm.id, StopMode::Force).await.unwrap();
    use VmState::*;
    assert_eq!(
        env.events.of(&vm),
        [
            (Cause::Created, None, Some(Created), true),
            (Cause::Op(Op::Boot), Some(Created), Some(Running), true),
            (Cause::Op(Op::Suspend), Some(Running), Some(Suspended), false),
            (Cause::Op(Op::Resume), Some(Suspended), Some(Running), true),
            (Cause::Op(Op::Pause), Some(Running), Some(Paused), true),
            (Cause::Op(Op::Suspend), Some(Paused), Some(Suspended), false),
            (Cause::Op(Op::Shutdown { mode: StopMode::Force }), Some(Suspended), Some(Shutdown), false),
        ]
    );
}

// ---- named snapshots and clones ---------------------------------------------

#[tokio::test]
async fn a_snapshot_is_its_customers_only_and_the_vm_goes_on_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    let n = env.fake.calls().len();
    let rec = env.mgr.snapshot(&a(), &vm.id, name("base")).await.unwrap();
    assert_eq!((rec.name.as_str(), &rec.source, &rec.customer, rec.backend.as_str()), ("base", &vm.id, &a(), "fake"));
    assert!(rec.size_bytes > 0);
    assert_eq!(env.calls_since(&vm, n), ["pause", "save", "resume"]);
    assert_eq!(env.state(&vm), VmState::Running);
    assert_eq!(env.observed(&vm).await, Observed::Running);
    let dir = env.snapshot_dir(&rec);
    assert!(dir.join(META_FILE).is_file() && dir.join(FAKE_STATE).is_file());
    assert_eq!(env.snapshot_files(), std::slice::from_ref(&rec.id), "no temporary directory is left");
    assert_eq!(env.mgr.snapshots(&a()).await.unwrap(), std::slice::from_ref(&rec));
    assert!(env.intents().is_empty());

    // Another customer sees nothing of it, nor of the VM.
    assert!(env.mgr.snapshots(&b()).await.unwrap().is_empty());
    let e = env.mgr.clone_vm(&b(), None, name("base"), Vec::new()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(env.mgr.delete_snapshot(&b(), &name("base")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(env.mgr.snapshot(&b(), &vm.id, name("mine")).await.unwrap_err().code(), Code::NotFound);
    assert!(dir.join(META_FILE).is_file());
    assert_eq!(env.mgr.list(&b(), &ListQuery { page_size: 10, ..Default::default() }).total, 0);
    // Names are per customer: b may use the same one for its own VM.
    let theirs = env.running(&b(), env.spec()).await;
    let brec = env.mgr.snapshot(&b(), &theirs.id, name("base")).await.unwrap();
    assert_ne!(brec.id, rec.id);
    assert_eq!(env.mgr.snapshots(&a()).await.unwrap(), std::slice::from_ref(&rec));

    // The same name again is taken; nothing is written for it.
    let e = env.mgr.snapshot(&a(), &vm.id, name("base")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.chain());
    assert_eq!(env.snapshot_files().len(), 2);
    assert_eq!(env.mgr.store().all_snapshots().unwrap().len(), 2);

    // A paused VM stays paused: no pause, no resume, only the save.
    env.mgr.pause(&a(), &vm.id).await.unwrap();
    let n = env.fake.calls().len();
    env.mgr.snapshot(&a(), &vm.id, name("paused")).await.unwrap();
    assert_eq!(env.calls_since(&vm, n), ["save"]);
    assert_eq!(env.state(&vm), VmState::Paused);
    assert_eq!(env.observed(&vm).await, Observed::Paused);
    let names: Vec<String> = env.mgr.snapshots(&a()).await.unwrap().iter().map(|r| r.name.to_string()).collect();
    assert_eq!(names, ["base", "paused"]);
    assert!(env.intents().is_empty());
}

#[tokio::test]
async fn clones_get_their_own_disks_and_outlive_their_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let original = b"the disk as it was".to_vec();
    let vm = env.running(&a(), env.spec_with_disk(&original)).await;
    let source_disk = vm.spec.storage[0].path.clone();
    let rec = env.mgr.snapshot(&a(), &vm.id, name("golden")).await.unwrap();
    let snap = env.snapshot_dir(&rec);
    let meta = super::snapshot::read_meta(&snap).unwrap();
    assert_eq!(meta.disks.len(), 1);
    assert_eq!((meta.disks[0].id.as_str(), meta.disks[0].file.as_str()), ("data", "disk-data.img"));
    let snap_disk = snap.join("disk-data.img");
    assert_eq!(std::fs::read(&snap_disk).unwrap(), original);
    let saved_cpu = saved_cpu_ns(&snap);

    let mut clones = Vec::new();
    let n = env.fake.calls().len();
    for _ in 0..3 {
        let c = env.mgr.clone_vm(&a(), None, name("golden"), Vec::new()).await.unwrap();
        assert_eq!(c.state(), VmState::Running);
        clones.push(c);
    }
    let hosts: HashSet<&VmId> = clones.iter().map(|c| &c.host_id).chain([&vm.host_id]).collect();
    assert_eq!(hosts.len(), 4, "every clone has its own host id");
    for c in &clones {
        // Fresh randomness: a new generation while the guest is paused, then it runs.
        assert_eq!(env.calls_since(c, n), ["restore", "create", "new_generation", "resume"]);
        assert!(env.fake.is_alive(&c.host_id));
        assert_eq!(env.observed(c).await, Observed::Running);
        let disk = env.dir(c).join("disk-data.img");
        assert_eq!(c.spec.storage[0].path, disk, "the clone's disk is its own copy");
        assert_eq!(std::fs::read(&disk).unwrap(), original);
        assert!(!env.dir(c).join(CONT_PENDING).exists());
        assert!(env.cpu_ns(c).await >= saved_cpu, "a clone's guest continues the snapshot's");
        assert_eq!(env.mgr.store().get(&c.host_id).unwrap().unwrap().state, VmState::Running);
        assert_eq!(env.events.of(c), [(Cause::Created, None, Some(VmState::Running), true)]);
    }
    std::fs::write(&clones[0].spec.storage[0].path, b"written by clone 0").unwrap();
    for c in &clones[1..] {
        assert_eq!(std::fs::read(&c.spec.storage[0].path).unwrap(), original);
    }
    assert_eq!(std::fs::read(&snap_disk).unwrap(), original);
    assert_eq!(std::fs::read(&source_disk).unwrap(), original);
    assert_eq!(env.state(&vm), VmState::Running);
    assert!(env.fake.is_alive(&vm.host_id));
    assert_eq!(env.mgr.list(&a(), &ListQuery { page_size: 10, ..Default::default() }).total, 4);
    assert!(env.intents().is_empty());

    env.mgr.delete_snapshot(&a(), &name("golden")).await.unwrap();
    assert!(!snap.exists());
    assert!(env.mgr.snapshots(&a()).await.unwrap().is_empty());
    assert!(env.mgr.store().all_snapshots().unwrap().is_empty());
    let e = env.mgr.clone_vm(&a(), None, name("golden"), Vec::new()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(env.mgr.delete_snapshot(&a(), &name("golden")).await.unwrap_err().code(), Code::NotFound);
    for c in &clones {
        assert_eq!(env.state(c), VmState::Running);
        assert!(env.fake.is_alive(&c.host_id));
        assert!(c.spec.storage[0].path.is_file());
    }
    // A clone is a VM like any other.
    assert_eq!(env.mgr.suspend(&a(), &clones[1].id).await.unwrap(), VmState::Suspended);
    assert_eq!(env.mgr.resume(&a(), &clones[1].id).await.unwrap(), VmState::Running);
    env.mgr.delete(&a(), &clones[2].id, true).await.unwrap();
    assert!(!env.dir(&clones[2]).exists());
}

#[tokio::test]
async fn a_clone_that_cannot_be_made_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec_with_disk(b"data")).await;
    env.mgr.snapshot(&a(), &vm.id, name("good")).await.unwrap();
    let bad = env.mgr.snapshot(&a(), &vm.id, name("tampered")).await.unwrap();
    let path = env.snapshot_dir(&bad).join(META_FILE);
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    meta["compat"]["hypervisor_version"] = "fake 0.1".into();
    std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let (vms, dirs) = (env.mgr.store().load_all().unwrap().len(), env.vm_dirs());
    let nothing_left = |what: &str| {
        assert_eq!(env.mgr.store().load_all().unwrap().len(), vms, "{what}");
        assert_eq!(env.vm_dirs(), dirs, "{what}");
        assert_eq!(env.fake.live_count(), 1, "{what}");
        assert!(env.intents().is_empty(), "{what}");
        assert_eq!(env.mgr.list(&a(), &ListQuery { page_size: 10, ..Default::default() }).total, 1, "{what}");
    };

    let e = env.mgr.clone_vm(&a(), None, name("tampered"), Vec::new()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.chain().contains("hypervisor_version"), "{}", e.chain());
    assert!(!e.chain().contains("memory_bytes"), "only the differing key: {}", e.chain());
    nothing_left("a tampered snapshot");

    let ports = vec![PortSpec { protocol: "tcp".into(), host_port: 0, guest_port: 80 }];
    let e = env.mgr.clone_vm(&a(), None, name("good"), ports).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.chain());
    assert!(e.chain().contains("port_mappings"), "{}", e.chain());
    nothing_left("port mappings without a NIC");

    env.fake.fail_next("restore", "no memory");
    let id = name("wanted");
    let e = env.mgr.clone_vm(&a(), Some(id.clone()), name("good"), Vec::new()).await.unwrap_err();
    assert!(e.chain().contains("no memory"), "{}", e.chain());
    nothing_left("a failing restore");

    let e = env.mgr.clone_vm(&a(), Some(vm.id.clone()), name("good"), Vec::new()).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    nothing_left("a taken id");
    // The id the failed clone asked for is free.
    let c = env.mgr.clone_vm(&a(), Some(id.clone()), name("good"), Vec::new()).await.unwrap();
    assert_eq!((&c.id, c.state()), (&id, VmState::Running));
}

#[tokio::test]
async fn a_failing_snapshot_leaves_the_vm_as_it_was_and_no_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    env.fake.fail_next("save", "disk on fire");
    let e = env.mgr.snapshot(&a(), &vm.id, name("s")).await.unwrap_err();
    assert!(e.chain().contains("disk on fire"), "{}", e.chain());
    assert_eq!(env.state(&vm), VmState::Running);
    assert_eq!(env.observed(&vm).await, Observed::Running, "the guest runs on");
    assert!(env.snapshot_files().is_empty());
    assert!(env.mgr.store().all_snapshots().unwrap().is_empty());
    assert!(env.intents().is_empty());

    // A pause that acted but whose reply was lost: the record follows the
    // guest, as after any operation that failed.
    env.fake.time_out_after_next("pause");
    let e = env.mgr.snapshot(&a(), &vm.id, name("s")).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert_eq!((env.observed(&vm).await, env.state(&vm)), (Observed::Paused, VmState::Paused));
    assert!(env.snapshot_files().is_empty());
    assert!(env.mgr.store().all_snapshots().unwrap().is_empty());
    assert!(env.intents().is_empty());
    env.mgr.resume(&a(), &vm.id).await.unwrap();
    env.mgr.snapshot(&a(), &vm.id, name("s")).await.unwrap();
}

// ---- the space saves may take --------------------------------------------------

#[tokio::test]
async fn saves_past_the_limit_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open_with(tmp.path(), 1, |_| {}).await;
    let vm = env.running(&a(), env.spec()).await;
    let n = env.fake.calls().len();
    for e in
        [env.mgr.suspend(&a(), &vm.id).await.unwrap_err(), env.mgr.snapshot(&a(), &vm.id, name("s")).await.unwrap_err()]
    {
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.chain());
        assert!(e.chain().contains("UNKEY_METALD_SNAPSHOT_MAX_GB"), "{}", e.chain());
    }
    assert!(env.calls_since(&vm, n).is_empty(), "the guest was not even paused");
    assert_eq!(env.state(&vm), VmState::Running);
    assert!(env.fake.is_alive(&vm.host_id));
    assert!(!env.saved(&vm).exists() && !env.dir(&vm).join(SUSPENDING_DIR).exists());
    assert!(env.snapshot_files().is_empty());
    assert!(env.mgr.store().all_snapshots().unwrap().is_empty());
    assert!(env.mgr.snapshots(&a()).await.unwrap().is_empty());
    assert!(env.intents().is_empty());
}

#[tokio::test]
async fn saves_already_on_the_host_count_against_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for exactly one guest's memory.
    let env = open_with(tmp.path(), MEMORY.unsigned_abs(), |_| {}).await;
    let first = env.running(&a(), env.spec()).await;
    let second = env.running(&a(), env.spec()).await;
    env.mgr.suspend(&a(), &first.id).await.unwrap();
    let e = env.mgr.suspend(&a(), &second.id).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(env.state(&second), VmState::Running);
    assert_eq!(env.mgr.snapshot(&a(), &second.id, name("s")).await.unwrap_err().code(), Code::ResourceExhausted);
    // Discarding the first save makes room.
    env.mgr.shutdown(&a(), &first.id, StopMode::Force).await.unwrap();
    assert_eq!(env.mgr.suspend(&a(), &second.id).await.unwrap(), VmState::Suspended);
}

// ---- a start after a crash --------------------------------------------------

#[tokio::test]
async fn a_start_finishes_a_published_suspend_and_rolls_back_an_unpublished_one() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let done = env.running(&a(), env.spec()).await;
    let half = env.running(&a(), env.spec()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = env.cpu_ns(&done).await;
    // Both crashed mid-suspend: one after its save was published, one before.
    env.save_by_hand(&done, &env.saved(&done), true).await;
    env.begin_intent(&done, "suspend");
    env.save_by_hand(&half, &env.dir(&half).join(SUSPENDING_DIR), false).await;
    env.begin_intent(&half, "suspend");
    let env = env.restart().await;

    assert_eq!(env.state(&done), VmState::Suspended);
    assert!(!env.fake.is_alive(&done.host_id));
    assert!(env.saved(&done).join(META_FILE).is_file());
    let row = env.mgr.store().get(&done.host_id).unwrap().unwrap();
    assert_eq!((row.state, row.runtime), (VmState::Suspended, None));
    assert_eq!(env.state(&half), VmState::Running);
    assert!(env.fake.is_alive(&half.host_id));
    assert_eq!(env.observed(&half).await, Observed::Running);
    assert!(!env.dir(&half).join(SUSPENDING_DIR).exists() && !env.saved(&half).exists());
    assert!(env.intents().is_empty());

    assert_eq!(env.mgr.resume(&a(), &done.id).await.unwrap(), VmState::Running);
    assert!(env.cpu_ns(&done).await >= before, "the finished suspend's save is the guest");
    assert_eq!(env.mgr.suspend(&a(), &half.id).await.unwrap(), VmState::Suspended);
}

#[tokio::test]
async fn a_start_continues_a_restored_guest_its_record_names() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    // A resume that crashed after its record named the new process: the
    // guest is not continued yet and the save not yet dropped.
    std::fs::write(env.dir(&vm).join(CONT_PENDING), b"").unwrap();
    env.save_by_hand(&vm, &env.saved(&vm), true).await;
    let env = env.restart().await;
    assert_eq!(env.state(&vm), VmState::Running);
    assert!(env.fake.calls().iter().any(|(id, op)| id == vm.host_id.as_str() && *op == "resume"));
    assert!(!env.dir(&vm).join(CONT_PENDING).exists());
    assert!(!env.saved(&vm).exists(), "the save of a guest that ran on is stale");
    assert!(env.intents().is_empty());

    // The same, but the continue fails: the record says what the
    // hypervisor does (the fake's reattached guest runs).
    std::fs::write(env.dir(&vm).join(CONT_PENDING), b"").unwrap();
    let env = env.restart_with(|f| f.fail_next("resume", "stuck")).await;
    assert!(env.fake.calls().iter().any(|(id, op)| id == vm.host_id.as_str() && *op == "resume"));
    assert_eq!(env.observed(&vm).await, Observed::Running);
    assert_eq!(env.state(&vm), VmState::Running);
    assert_eq!(env.mgr.store().get(&vm.host_id).unwrap().unwrap().state, VmState::Running);
    assert!(!env.dir(&vm).join(CONT_PENDING).exists());
    assert!(!env.fake.calls().iter().any(|(_, op)| *op == "new_generation"), "only clones get one");

    // An interrupted clone's guest gets its new generation before it runs.
    std::fs::write(env.dir(&vm).join(CONT_PENDING), super::snapshot::CLONE_MARK).unwrap();
    let env = env.restart().await;
    let ops: Vec<&str> =
        env.fake.calls().into_iter().filter(|(id, _)| id == vm.host_id.as_str()).map(|(_, op)| op).collect();
    let g = ops.iter().position(|op| *op == "new_generation").expect("a new generation");
    assert!(ops[g..].contains(&"resume"), "{ops:?}");
    assert!(!env.dir(&vm).join(CONT_PENDING).exists());
    assert_eq!(env.mgr.suspend(&a(), &vm.id).await.unwrap(), VmState::Suspended);
}

#[tokio::test]
async fn a_start_removes_unfinished_and_unowned_snapshots_and_keeps_ready_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let vm = env.running(&a(), env.spec()).await;
    let kept = env.mgr.snapshot(&a(), &vm.id, name("kept")).await.unwrap();
    // A snapshot a crash interrupted: its row not ready, its files half
    // written, its VM's intent still there; and files no row names.
    let half = SnapshotRecord {
        id: "00000000deadbeef".into(),
        customer: a(),
        name: name("half"),
        source: vm.id.clone(),
        spec: (*vm.spec).clone(),
        backend: "fake".into(),
        size_bytes: 0,
        created_at: unix_now(),
    };
    assert!(env.mgr.store().begin_snapshot(&half).unwrap());
    let root = env.dir.join("snapshots");
    std::fs::create_dir_all(root.join(".tmp-00000000deadbeef")).unwrap();
    std::fs::write(root.join(".tmp-00000000deadbeef").join(FAKE_STATE), b"{").unwrap();
    std::fs::create_dir_all(root.join("0123456789abcdef")).unwrap();
    std::fs::write(root.join("0123456789abcdef").join(META_FILE), b"{}").unwrap();
    env.begin_intent(&vm, "snapshot");
    let env = env.restart().await;

    assert_eq!(env.snapshot_files(), std::slice::from_ref(&kept.id));
    let rows = env.mgr.store().all_snapshots().unwrap();
    assert_eq!(rows, [(kept.clone(), true)]);
    assert_eq!(env.mgr.snapshots(&a()).await.unwrap(), std::slice::from_ref(&kept));
    assert_eq!(env.state(&vm), VmState::Running);
    assert!(env.intents().is_empty());
    // The kept one clones; the name of the removed one is free.
    let c = env.mgr.clone_vm(&a(), None, name("kept"), Vec::new()).await.unwrap();
    assert_eq!(c.state(), VmState::Running);
    env.mgr.snapshot(&a(), &vm.id, name("half")).await.unwrap();
}

#[tokio::test]
async fn a_start_settles_suspended_vms_by_their_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let mut vms = Vec::new();
    for _ in 0..3 {
        let vm = env.running(&a(), env.spec()).await;
        env.mgr.suspend(&a(), &vm.id).await.unwrap();
        vms.push(vm);
    }
    let (quiet, lost, interrupted) = (&vms[0], &vms[1], &vms[2]);
    // Its save deleted behind metald's back.
    std::fs::remove_dir_all(env.saved(lost)).unwrap();
    // A resume that crashed before its record named the new process.
    env.begin_intent(interrupted, "resume");
    std::fs::write(env.dir(interrupted).join(CONT_PENDING), b"").unwrap();
    let env = env.restart().await;

    assert_eq!(env.state(quiet), VmState::Suspended);
    assert_eq!(env.state(lost), VmState::Shutdown);
    assert_eq!(env.mgr.store().get(&lost.host_id).unwrap().unwrap().state, VmState::Shutdown);
    assert_eq!(env.state(interrupted), VmState::Suspended);
    assert!(env.saved(interrupted).join(META_FILE).is_file());
    assert!(!env.dir(interrupted).join(CONT_PENDING).exists());
    assert!(env.intents().is_empty());
    for vm in &vms {
        assert!(!env.fake.is_alive(&vm.host_id));
    }
    assert_eq!(env.mgr.resume(&a(), &quiet.id).await.unwrap(), VmState::Running);
    assert_eq!(env.mgr.resume(&a(), &interrupted.id).await.unwrap(), VmState::Running);
    assert_eq!(env.mgr.resume(&a(), &lost.id).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(env.mgr.boot(&a(), &lost.id).await.unwrap(), VmState::Running);
}
