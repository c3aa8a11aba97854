//! Reconciliation tests: calls that time out after acting, a hypervisor
//! that does not answer, a store that refuses writes, and starts after a
//! crash left intents, directories and records behind.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use super::*;
use crate::backend::fake::{FakeBackend, FakeControl};
use crate::model::Code;
use crate::model::{BootSpec, CpuSpec, MemorySpec, VmSpec};

struct Env {
    tmp: PathBuf,
    mgr: Manager,
    fake: FakeControl,
    stop: CancellationToken,
}

/// A manager over the store and data directory in `dir`, with a new fake.
async fn open(dir: &Path) -> Env {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = FakeBackend::new(tx);
    let fake = backend.control();
    let store = Store::open(&dir.join("db")).unwrap();
    let stop = CancellationToken::new();
    let mgr = Manager::open(
        ManagerConfig {
            snapshot_max_bytes: 1 << 40,
            vm_log_max_bytes: super::logs::DEFAULT_VM_LOG_MAX_BYTES,
            data_dir: dir.to_path_buf(),
            limits: Limits { max_vcpus: 8, max_memory_mb: 1024, asset_dirs: vec![assets] },
            max_vms: 100,
            net: Default::default(),
            images: Default::default(),
        },
        Arc::new(backend),
        store,
        rx,
        stop.clone(),
    )
    .await
    .unwrap();
    Env { tmp: dir.to_path_buf(), mgr, fake, stop }
}

fn spec(env: &Env) -> VmSpec {
    VmSpec {
        cpu: CpuSpec { vcpus: 1, ..Default::default() },
        memory: MemorySpec { size_bytes: 64 << 20, ..Default::default() },
        boot: BootSpec { kernel: env.mgr.inner.cfg.limits.asset_dirs[0].join("vmlinux"), ..Default::default() },
        ..Default::default()
    }
}

fn a() -> CustomerId {
    CustomerId("a".into())
}

/// Polls `f` every 20 ms for up to 20 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_timed_out_call_that_took_effect_is_committed_as_the_hypervisor_says() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let id = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    env.mgr.boot(&a(), &id).await.unwrap();
    env.fake.time_out_after_next("pause");
    let e = env.mgr.pause(&a(), &id).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    // The guest is paused, and so is the record: resume is allowed.
    let view = env.mgr.get(&a(), &id).unwrap();
    assert_eq!(view.state(), VmState::Paused);
    assert!(!view.reconciling && view.pending.is_none());
    assert_eq!(env.mgr.store().get(&id).unwrap().unwrap().state, VmState::Paused);
    assert!(env.mgr.store().intents().unwrap().is_empty());
    assert_eq!(env.mgr.resume(&a(), &id).await.unwrap(), VmState::Running);
}

#[tokio::test]
async fn a_hypervisor_that_does_not_answer_is_asked_until_it_does() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let id = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    env.mgr.boot(&a(), &id).await.unwrap();
    env.fake.set_unresponsive(true);
    env.fake.time_out_after_next("pause");
    assert_eq!(env.mgr.pause(&a(), &id).await.unwrap_err().code(), Code::DeadlineExceeded);
    let view = env.mgr.get(&a(), &id).unwrap();
    assert!(view.reconciling, "the state is unconfirmed while the hypervisor is silent");
    // The intent stays: a crash now is settled from the hypervisor at start.
    assert_eq!(env.mgr.store().intents().unwrap().len(), 1);
    env.fake.set_unresponsive(false);
    eventually("the paused state to be adopted", || {
        let v = env.mgr.get(&a(), &id).unwrap();
        v.state() == VmState::Paused && !v.reconciling
    })
    .await;
    assert_eq!(env.mgr.store().get(&id).unwrap().unwrap().state, VmState::Paused);
    assert!(env.mgr.store().intents().unwrap().is_empty());
}

#[tokio::test]
async fn an_operation_whose_intent_cannot_be_written_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let id = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    env.mgr.store().inject_write_failure(true);
    let e = env.mgr.boot(&a(), &id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.chain().contains("UNKEY_METALD_DATA_DIR"), "{}", e.chain());
    let e = env.mgr.create(&a(), None, spec(&env)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let ops: Vec<_> = env.fake.calls().into_iter().map(|(_, op)| op).collect();
    assert_eq!(ops, ["create"], "no backend call after the refused intents");
    assert_eq!(env.mgr.get(&a(), &id).unwrap().state(), VmState::Created);
    assert!(env.mgr.store().write_health().failing_since.is_some());
    env.mgr.store().inject_write_failure(false);
    assert_eq!(env.mgr.boot(&a(), &id).await.unwrap(), VmState::Running);
    assert!(env.mgr.store().write_health().failing_since.is_none());
}

#[tokio::test]
async fn a_state_the_store_refused_is_kept_in_memory_and_written_once_it_can_be() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let id = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    env.fake.set_delay(Duration::from_millis(300));
    let boot = tokio::spawn({
        let (mgr, id) = (env.mgr.clone(), id.clone());
        async move { mgr.boot(&a(), &id).await }
    });
    // The intent is written before the backend call; the disk fills during it.
    eventually("the boot to be in progress", || env.mgr.get(&a(), &id).unwrap().pending.is_some()).await;
    assert_eq!(env.mgr.get(&a(), &id).unwrap().pending.map(|p| p.op), Some("boot"));
    env.mgr.store().inject_write_failure(true);
    assert_eq!(boot.await.unwrap().unwrap(), VmState::Running);
    let view = env.mgr.get(&a(), &id).unwrap();
    assert_eq!(view.state(), VmState::Running, "memory follows the guest");
    assert!(view.reconciling);
    assert_eq!(env.mgr.unsaved_count(), 1);
    env.mgr.store().inject_write_failure(false);
    eventually("the flusher to write the state", || env.mgr.unsaved_count() == 0).await;
    assert_eq!(env.mgr.store().get(&id).unwrap().unwrap().state, VmState::Running);
    assert!(env.mgr.store().intents().unwrap().is_empty());
    assert!(!env.mgr.get(&a(), &id).unwrap().reconciling);
}

#[tokio::test]
async fn a_start_finishes_interrupted_deletes_rolls_back_creates_and_removes_strays() {
    let tmp = tempfile::tempdir().unwrap();
    let env = open(tmp.path()).await;
    let del = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    let keep = env.mgr.create(&a(), None, spec(&env)).await.unwrap().id;
    env.mgr.boot(&a(), &keep).await.unwrap();
    env.stop.cancel();
    // What a crash at the right instants leaves behind.
    let store = env.mgr.store().clone();
    let intent = |id: &str, op: &str| Intent {
        vm_id: VmId::parse(id).unwrap(),
        customer: a(),
        op: op.into(),
        started_at: unix_now(),
    };
    store.begin(&intent(del.as_str(), "delete")).unwrap();
    store.begin(&intent("half-made", "create")).unwrap();
    store.begin(&intent(keep.as_str(), "pause")).unwrap();
    let vms = env.tmp.join("vms");
    std::fs::create_dir_all(vms.join("half-made")).unwrap();
    std::fs::create_dir_all(vms.join("nobody")).unwrap();
    std::fs::write(vms.join("nobody").join("disk"), b"x").unwrap();
    drop(env);

    let env = open(tmp.path()).await;
    assert_eq!(env.mgr.get(&a(), &del).unwrap_err().code(), Code::NotFound);
    assert!(env.mgr.store().get(&del).unwrap().is_none());
    assert!(env.mgr.store().intents().unwrap().is_empty());
    let mut dirs: Vec<_> = std::fs::read_dir(&vms).unwrap().map(|e| e.unwrap().file_name()).collect();
    dirs.sort();
    assert_eq!(dirs, [keep.as_str()], "only the surviving VM's directory is left");
    // The interrupted pause was settled from the hypervisor (still running).
    assert_eq!(env.mgr.get(&a(), &keep).unwrap().state(), VmState::Running);
    // The ids can be used again.
    env.mgr.create(&a(), Some(del.clone()), spec(&env)).await.unwrap();
    env.mgr.create(&a(), Some(VmId::parse("half-made").unwrap()), spec(&env)).await.unwrap();
}
