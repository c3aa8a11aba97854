//! Manager tests against the fake backend and a temporary store.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::backend::fake::{FakeBackend, FakeControl};
use crate::model::Code;
use crate::model::{BootSpec, CpuSpec, MemorySpec, VmSpec};

struct Env {
    _tmp: tempfile::TempDir,
    mgr: Manager,
    fake: FakeControl,
    events: Arc<Recorder>,
}

type Transition = (String, Option<VmState>, Option<VmState>);

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Transition>>);

impl Observer for Recorder {
    fn on_event(&self, e: &VmEvent) {
        self.0.lock().unwrap().push((e.vm_id.to_string(), e.from, e.to));
    }
}

async fn env_with(max_vms: usize) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = FakeBackend::new(tx);
    let fake = backend.control();
    let store = Store::open(&tmp.path().join("db")).unwrap();
    let mgr = Manager::open(
        ManagerConfig {
            snapshot_max_bytes: 1 << 40,
            vm_log_max_bytes: super::logs::DEFAULT_VM_LOG_MAX_BYTES,
            data_dir: tmp.path().to_path_buf(),
            limits: Limits { max_vcpus: 8, max_memory_mb: 1024, asset_dirs: vec![assets] },
            max_vms,
            net: Default::default(),
            images: Default::default(),
        },
        Arc::new(backend),
        store,
        rx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let events = Arc::new(Recorder::default());
    mgr.add_observer(events.clone());
    Env { _tmp: tmp, mgr, fake, events }
}

fn spec(env: &Env) -> VmSpec {
    VmSpec {
        cpu: CpuSpec { vcpus: 1, ..Default::default() },
        memory: MemorySpec { size_bytes: 64 << 20, ..Default::default() },
        boot: BootSpec { kernel: env.mgr.inner.cfg.limits.asset_dirs[0].join("vmlinux"), ..Default::default() },
        ..Default::default()
    }
}

fn c(s: &str) -> CustomerId {
    CustomerId(s.into())
}

#[tokio::test]
async fn lifecycle_commits_each_state_and_publishes_it() {
    let env = env_with(10).await;
    let a = c("a");
    let vm = env.mgr.create(&a, None, spec(&env)).await.unwrap();
    let id = vm.id.clone();
    assert_eq!(vm.state(), VmState::Created);
    assert_eq!(env.mgr.boot(&a, &id).await.unwrap(), VmState::Running);
    assert_eq!(env.mgr.pause(&a, &id).await.unwrap(), VmState::Paused);
    assert_eq!(env.mgr.resume(&a, &id).await.unwrap(), VmState::Running);
    assert_eq!(env.mgr.reboot(&a, &id, false).await.unwrap(), VmState::Running);
    assert_eq!(env.mgr.shutdown(&a, &id, StopMode::Force).await.unwrap(), VmState::Shutdown);
    assert!(!env.fake.is_alive(&id), "shutdown releases the process");
    assert_eq!(env.mgr.boot(&a, &id).await.unwrap(), VmState::Running);
    assert!(env.fake.is_alive(&id), "boot from shutdown starts a new process");
    let row = env.mgr.store().get(&id).unwrap().unwrap();
    assert_eq!(row.state, VmState::Running);
    env.mgr.delete(&a, &id, true).await.unwrap();
    assert!(env.mgr.store().get(&id).unwrap().is_none());
    assert!(!env.fake.is_alive(&id));
    assert_eq!(env.mgr.get(&a, &id).unwrap_err().code(), Code::NotFound);
    let ev = env.events.0.lock().unwrap().clone();
    let states: Vec<_> = ev.iter().map(|(_, f, t)| (*f, *t)).collect();
    use VmState::*;
    assert_eq!(
        states,
        vec![
            (None, Some(Created)),
            (Some(Created), Some(Running)),
            (Some(Running), Some(Paused)),
            (Some(Paused), Some(Running)),
            (Some(Running), Some(Running)),
            (Some(Running), Some(Shutdown)),
            (Some(Shutdown), Some(Running)),
            (Some(Running), None),
        ]
    );
}

#[tokio::test]
async fn wrong_state_is_failed_precondition_and_changes_nothing() {
    let env = env_with(10).await;
    let a = c("a");
    let id = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    let e = env.mgr.pause(&a, &id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.chain().contains("created"), "{}", e.chain());
    env.mgr.boot(&a, &id).await.unwrap();
    let e = env.mgr.delete(&a, &id, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(env.mgr.get(&a, &id).unwrap().state(), VmState::Running);
    // No backend call was made for the refused operations.
    let ops: Vec<_> = env.fake.calls().into_iter().map(|(_, op)| op).collect();
    assert_eq!(ops, vec!["create", "boot"]);
}

#[tokio::test]
async fn backend_failure_keeps_the_previous_state() {
    let env = env_with(10).await;
    let a = c("a");
    let id = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    env.fake.fail_next("boot", "kvm exploded");
    let e = env.mgr.boot(&a, &id).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.chain().contains("kvm exploded"));
    assert_eq!(env.mgr.get(&a, &id).unwrap().state(), VmState::Created);
    assert_eq!(env.mgr.store().get(&id).unwrap().unwrap().state, VmState::Created);
}

#[tokio::test]
async fn failed_create_leaves_nothing_behind() {
    let env = env_with(10).await;
    let a = c("a");
    env.fake.fail_next("create", "no memory");
    let id = VmId::parse("x").unwrap();
    assert!(env.mgr.create(&a, Some(id.clone()), spec(&env)).await.is_err());
    assert!(env.mgr.store().load_all().unwrap().is_empty());
    assert!(!env.mgr.vm_dir(&id).exists());
    // The id is free again.
    env.mgr.create(&a, Some(id), spec(&env)).await.unwrap();
}

#[tokio::test]
async fn ids_are_per_customer_and_max_vms_is_enforced() {
    let env = env_with(3).await;
    let (a, b) = (c("a"), c("b"));
    let id = VmId::parse("same").unwrap();
    let va = env.mgr.create(&a, Some(id.clone()), spec(&env)).await.unwrap();
    let e = env.mgr.create(&a, Some(id.clone()), spec(&env)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "a customer's own id is taken");
    // Another customer's use of an id is invisible: the same id is free.
    let vb = env.mgr.create(&b, Some(id.clone()), spec(&env)).await.unwrap();
    assert_eq!((va.id.as_str(), vb.id.as_str()), ("same", "same"));
    assert_eq!(va.host_id.as_str(), "same");
    assert!(vb.host_id.as_str().starts_with("same-"), "{}", vb.host_id);
    assert!(env.mgr.inner.cfg.data_dir.join("vms").join(vb.host_id.as_str()).is_dir());
    // Each customer acts on their own VM only.
    env.mgr.boot(&b, &id).await.unwrap();
    assert_eq!(env.mgr.get(&a, &id).unwrap().state(), VmState::Created);
    assert_eq!(env.mgr.get(&b, &id).unwrap().state(), VmState::Running);
    env.mgr.create(&a, None, spec(&env)).await.unwrap();
    let e = env.mgr.create(&a, None, spec(&env)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    env.mgr.delete(&a, &id, true).await.unwrap();
    assert_eq!(env.mgr.get(&b, &id).unwrap().state(), VmState::Running, "b's VM is untouched");
}

#[tokio::test]
async fn other_customers_vms_are_not_found() {
    let env = env_with(10).await;
    let id = env.mgr.create(&c("a"), None, spec(&env)).await.unwrap().id;
    let b = c("b");
    assert_eq!(env.mgr.get(&b, &id).unwrap_err().code(), Code::NotFound);
    assert_eq!(env.mgr.boot(&b, &id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(env.mgr.delete(&b, &id, true).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(env.mgr.list(&b, &ListQuery { page_size: 10, ..Default::default() }).total, 0);
}

#[tokio::test]
async fn guest_exit_moves_to_shutdown_and_stale_exits_are_ignored() {
    let env = env_with(10).await;
    let a = c("a");
    let id = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    env.mgr.boot(&a, &id).await.unwrap();
    assert!(env.fake.simulate_exit(&id));
    for _ in 0..100 {
        if env.mgr.get(&a, &id).unwrap().state() == VmState::Shutdown {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.mgr.get(&a, &id).unwrap().state(), VmState::Shutdown);
    let row = env.mgr.store().get(&id).unwrap().unwrap();
    assert_eq!(row.state, VmState::Shutdown);
    // The exit's reason is the VM's, stored with the state.
    let stopped = env.mgr.get(&a, &id).unwrap().stopped.unwrap();
    assert_eq!((stopped.reason, stopped.detail.as_str()), (crate::model::StopReason::GuestPowerOff, "simulated exit"));
    assert_eq!(row.stopped, Some(stopped));
    // A requested stop says so; a boot clears the reason.
    env.mgr.boot(&a, &id).await.unwrap();
    assert_eq!(env.mgr.get(&a, &id).unwrap().stopped, None);
    env.mgr.shutdown(&a, &id, StopMode::Force).await.unwrap();
    let stopped = env.mgr.get(&a, &id).unwrap().stopped.unwrap();
    assert_eq!((stopped.reason, stopped.detail.as_str()), (crate::model::StopReason::Requested, "ShutdownVm (forced)"));
    // Boot again: a new process; an exit event naming the old pid changes nothing.
    env.mgr.boot(&a, &id).await.unwrap();
    env.mgr
        .handle_exit(ExitEvent {
            vm_id: id.clone(),
            pid: Some(1),
            reason: crate::model::StopReason::Crashed,
            detail: "stale".into(),
            rebooted: false,
        })
        .await;
    assert_eq!(env.mgr.get(&a, &id).unwrap().state(), VmState::Running);
}

#[tokio::test]
async fn list_pages_are_stable_and_filtered() {
    let env = env_with(100).await;
    let a = c("a");
    for i in 0..25 {
        let id = VmId::parse(&format!("vm-{i:02}")).unwrap();
        env.mgr.create(&a, Some(id.clone()), spec(&env)).await.unwrap();
        if i % 5 == 0 {
            env.mgr.boot(&a, &id).await.unwrap();
        }
    }
    env.mgr.create(&c("b"), None, spec(&env)).await.unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = env.mgr.list(&a, &ListQuery { states: vec![], page_size: 10, after: after.clone() });
        assert_eq!(p.total, 25);
        seen.extend(p.vms.iter().map(|v| v.id.to_string()));
        match p.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("vm-{i:02}")).collect();
    assert_eq!(seen, expected);
    let p = env.mgr.list(&a, &ListQuery { states: vec![VmState::Running], page_size: 3, after: None });
    assert_eq!(p.total, 5);
    assert_eq!(p.vms.len(), 3);
    assert!(p.next_after.is_some());
    let p = env.mgr.list(&a, &ListQuery { states: vec![VmState::Running], page_size: 5, after: None });
    assert!(p.next_after.is_none(), "exactly one full page has no next token");
}

#[tokio::test]
async fn operations_on_one_vm_are_serialised() {
    let env = env_with(10).await;
    let a = c("a");
    let id = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    env.fake.set_delay(Duration::from_millis(50));
    // Two boots race: exactly one wins, the other sees RUNNING.
    let (r1, r2) = tokio::join!(env.mgr.boot(&a, &id), env.mgr.boot(&a, &id));
    assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
    let err = r1.err().or(r2.err()).unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn operations_on_different_vms_overlap() {
    let env = env_with(10).await;
    let a = c("a");
    let x = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    let y = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    // Each boot waits inside the backend until the other one is there too:
    // if the manager serialised them (a global lock across backend calls),
    // this would never finish.
    env.fake.set_barrier(Some(2));
    let both = async { tokio::join!(env.mgr.boot(&a, &x), env.mgr.boot(&a, &y)) };
    let (r1, r2) = tokio::time::timeout(Duration::from_secs(30), both).await.expect("boots of two VMs overlap");
    r1.unwrap();
    r2.unwrap();
}

#[tokio::test]
async fn info_reports_live_metrics_for_running_vms_only() {
    let env = env_with(10).await;
    let a = c("a");
    let id = env.mgr.create(&a, None, spec(&env)).await.unwrap().id;
    let d = env.mgr.info(&a, &id).await.unwrap();
    assert!(d.metrics.is_none());
    assert_eq!(d.backend_info.get("backend").map(String::as_str), Some("fake"));
    assert!(d.backend_info.contains_key("pid"));
    assert!(d.backend_info.contains_key("console_log"));
    env.mgr.boot(&a, &id).await.unwrap();
    let d = env.mgr.info(&a, &id).await.unwrap();
    let m = d.metrics.unwrap();
    assert_eq!(m.usage.memory_bytes, (64 << 20) / 4);
}
