//! Property test of the VM lifecycle: random sequences of operations by two
//! customers on a few VM ids, against the real `Manager` with the fake
//! backend and a SQLite store on disk, checked step by step against an
//! independent model written here (not `metald::model::plan`): each call's
//! result code, each VM's state, each customer's list (after every step), and that one
//! customer never sees the other's VMs. Injected faults are part of the
//! sequences: a backend call that fails before acting, one that times out
//! after acting, a guest that exits on its own. At the end the manager is
//! opened again on the same store and data directory: every VM and state
//! survived, and `<data>/vms/` holds one directory per VM.
//!
//! `PROPTEST_CASES` runs more cases (default 24, of up to 40 steps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metald::backend::fake::{FakeBackend, FakeControl};
use metald::core::{ListQuery, Manager, ManagerConfig};
use metald::model::{BootSpec, Code, CpuSpec, CustomerId, Limits, MemorySpec, StopMode, VmId, VmSpec, VmState};
use metald::store::Store;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

const CUSTOMERS: [&str; 2] = ["cust-a", "cust-b"];
const NAMES: [&str; 3] = ["x", "y", "z"];

/// One step of a sequence: (customer, name) index pairs and arguments.
#[derive(Debug, Clone)]
enum Cmd {
    Create {
        c: usize,
        n: usize,
        valid: bool,
    },
    Boot {
        c: usize,
        n: usize,
    },
    Pause {
        c: usize,
        n: usize,
    },
    Resume {
        c: usize,
        n: usize,
    },
    Reboot {
        c: usize,
        n: usize,
        force: bool,
    },
    Shutdown {
        c: usize,
        n: usize,
    },
    Delete {
        c: usize,
        n: usize,
        force: bool,
    },
    Suspend {
        c: usize,
        n: usize,
    },
    /// The guest powers off (or its VMM dies).
    Exit {
        c: usize,
        n: usize,
    },
    /// The next backend call of the VM's next allowed operation fails
    /// before acting.
    FailNext {
        c: usize,
        n: usize,
    },
    /// Boot, pause or resume takes effect, then its reply is lost.
    TimeOutAfter {
        c: usize,
        n: usize,
    },
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let cn = (0..CUSTOMERS.len(), 0..NAMES.len());
    prop_oneof![
        3 => (cn.clone(), prop::bool::weighted(0.9)).prop_map(|((c, n), valid)| Cmd::Create { c, n, valid }),
        3 => cn.clone().prop_map(|(c, n)| Cmd::Boot { c, n }),
        2 => cn.clone().prop_map(|(c, n)| Cmd::Pause { c, n }),
        2 => cn.clone().prop_map(|(c, n)| Cmd::Resume { c, n }),
        2 => cn.clone().prop_map(|(c, n)| Cmd::Suspend { c, n }),
        1 => (cn.clone(), any::<bool>()).prop_map(|((c, n), force)| Cmd::Reboot { c, n, force }),
        2 => cn.clone().prop_map(|(c, n)| Cmd::Shutdown { c, n }),
        2 => (cn.clone(), any::<bool>()).prop_map(|((c, n), force)| Cmd::Delete { c, n, force }),
        1 => cn.clone().prop_map(|(c, n)| Cmd::Exit { c, n }),
        1 => cn.clone().prop_map(|(c, n)| Cmd::FailNext { c, n }),
        1 => cn.clone().prop_map(|(c, n)| Cmd::TimeOutAfter { c, n }),
    ]
}

/// The model's lifecycle, written out on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum S {
    Created,
    Running,
    Paused,
    Shutdown,
    Suspended,
}

impl S {
    fn of(s: VmState) -> S {
        match s {
            VmState::Created => S::Created,
            VmState::Running => S::Running,
            VmState::Paused => S::Paused,
            VmState::Shutdown => S::Shutdown,
            VmState::Suspended => S::Suspended,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Boot,
    Pause,
    Resume,
    Reboot { force: bool },
    Shutdown,
    Delete { force: bool },
    Suspend,
}

/// Where `action` takes a VM in state `s`: `Some(None)` = deleted,
/// `None` = refused (FailedPrecondition).
fn next(s: S, action: Action) -> Option<Option<S>> {
    use S::*;
    match (action, s) {
        (Action::Boot, Created | Shutdown) => Some(Some(Running)),
        (Action::Pause, Running) => Some(Some(Paused)),
        (Action::Resume, Paused | Suspended) => Some(Some(Running)),
        (Action::Suspend, Running | Paused) => Some(Some(Suspended)),
        (Action::Shutdown, Suspended) => Some(Some(Shutdown)),
        (Action::Delete { .. }, Suspended) => Some(None),
        (Action::Reboot { .. }, Running) => Some(Some(Running)),
        (Action::Shutdown, Running | Paused) => Some(Some(Shutdown)),
        (Action::Delete { .. }, Created | Shutdown) => Some(None),
        (Action::Delete { force: true }, Running | Paused) => Some(None),
        _ => None,
    }
}

/// The fake backend's name of the call that carries `action` out in `s`.
fn backend_call(s: S, action: Action) -> &'static str {
    match (action, s) {
        (Action::Boot, _) => "boot",
        (Action::Pause, _) => "pause",
        (Action::Resume, S::Suspended) => "restore",
        (Action::Resume, _) => "resume",
        (Action::Suspend, _) => "save",
        (Action::Reboot { .. }, _) => "reboot",
        (Action::Shutdown, _) => "shutdown",
        (Action::Delete { .. }, _) => "delete",
    }
}

struct Harness {
    mgr: Manager,
    fake: FakeControl,
    stop: CancellationToken,
    kernel: std::path::PathBuf,
}

async fn open(dir: &Path) -> Harness {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("vmlinux"), b"k").unwrap();
    let assets = std::fs::canonicalize(assets).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = FakeBackend::new(tx);
    let fake = backend.control();
    let stop = CancellationToken::new();
    let mgr = Manager::open(
        ManagerConfig {
            snapshot_max_bytes: 1 << 40,
            vm_log_max_bytes: metald::core::logs::DEFAULT_VM_LOG_MAX_BYTES,
            data_dir: dir.to_path_buf(),
            limits: Limits { max_vcpus: 4, max_memory_mb: 512, asset_dirs: vec![assets.clone()] },
            max_vms: 100,
            net: Default::default(),
            images: Default::default(),
        },
        Arc::new(backend),
        Store::open(&dir.join("metald.db")).unwrap(),
        rx,
        stop.clone(),
    )
    .await
    .unwrap();
    Harness { mgr, fake, stop, kernel: assets.join("vmlinux") }
}

fn spec(h: &Harness, valid: bool) -> VmSpec {
    VmSpec {
        cpu: CpuSpec { vcpus: if valid { 1 } else { 0 }, ..Default::default() },
        memory: MemorySpec { size_bytes: 64 << 20, ..Default::default() },
        boot: BootSpec { kernel: h.kernel.clone(), ..Default::default() },
        ..Default::default()
    }
}

type Model = BTreeMap<(usize, usize), S>;

fn cust(c: usize) -> CustomerId {
    CustomerId(CUSTOMERS[c].into())
}

fn name(n: usize) -> VmId {
    VmId::parse(NAMES[n]).unwrap()
}

/// Runs `action` on (c, n) and checks the code and the new state.
async fn act(h: &Harness, model: &mut Model, c: usize, n: usize, action: Action, fault: Option<&str>) {
    let (caller, id) = (cust(c), name(n));
    let r = match action {
        Action::Boot => h.mgr.boot(&caller, &id).await.map(|_| ()),
        Action::Pause => h.mgr.pause(&caller, &id).await.map(|_| ()),
        Action::Resume => h.mgr.resume(&caller, &id).await.map(|_| ()),
        Action::Reboot { force } => h.mgr.reboot(&caller, &id, force).await.map(|_| ()),
        Action::Shutdown => h.mgr.shutdown(&caller, &id, StopMode::Force).await.map(|_| ()),
        Action::Delete { force } => h.mgr.delete(&caller, &id, force).await,
        Action::Suspend => h.mgr.suspend(&caller, &id).await.map(|_| ()),
    };
    let code = r.as_ref().err().map(|e| e.code());
    let ctx = format!("{action:?} on {:?} with fault {fault:?}: {r:?}", (c, n));
    let Some(&s) = model.get(&(c, n)) else {
        assert_eq!(code, Some(Code::NotFound), "{ctx}");
        return;
    };
    match (next(s, action), fault) {
        (None, _) => assert_eq!(code, Some(Code::FailedPrecondition), "{ctx}"),
        (Some(_), Some("fail")) => assert_eq!(code, Some(Code::Internal), "{ctx}"),
        (Some(to), Some("timeout")) => {
            assert_eq!(code, Some(Code::DeadlineExceeded), "{ctx}");
            // Boot of a shut-down VM starts a new VMM; a failed boot
            // releases it again, so the VM stays shut down.
            // Likewise a resume from disk whose restored VMM is released.
            let to = if matches!(s, S::Shutdown | S::Suspended) { Some(s) } else { to };
            set(model, c, n, to);
        }
        (Some(to), _) => {
            assert_eq!(code, None, "{ctx}");
            set(model, c, n, to);
        }
    }
}

fn set(model: &mut Model, c: usize, n: usize, to: Option<S>) {
    match to {
        Some(s) => model.insert((c, n), s),
        None => model.remove(&(c, n)),
    };
}

/// Every VM of the model as the manager reports it, and nothing else.
fn check_all(h: &Harness, model: &Model, step: &str) {
    for c in 0..CUSTOMERS.len() {
        let page = h.mgr.list(&cust(c), &ListQuery { page_size: 100, ..Default::default() });
        let got: Vec<(String, S)> = page.vms.iter().map(|v| (v.id.to_string(), S::of(v.state()))).collect();
        let want: Vec<(String, S)> =
            model.iter().filter(|((mc, _), _)| *mc == c).map(|((_, n), s)| (NAMES[*n].to_owned(), *s)).collect();
        assert_eq!(got, want, "{step}: customer {c}'s VMs");
        assert_eq!(page.total, want.len());
        assert!(page.vms.iter().all(|v| v.customer == cust(c)), "{step}: another customer's VM listed");
    }
}

async fn run(cmds: Vec<Cmd>) {
    let tmp = tempfile::tempdir().unwrap();
    let h = open(tmp.path()).await;
    let mut model = Model::new();
    for (k, cmd) in cmds.iter().enumerate() {
        let step = format!("step {k} {cmd:?}");
        match *cmd {
            Cmd::Create { c, n, valid } => {
                let r = h.mgr.create(&cust(c), Some(name(n)), spec(&h, valid)).await;
                let code = r.as_ref().err().map(|e| e.code());
                if !valid {
                    assert_eq!(code, Some(Code::InvalidArgument), "{step}");
                } else if let std::collections::btree_map::Entry::Vacant(e) = model.entry((c, n)) {
                    assert_eq!(code, None, "{step}: {r:?}");
                    e.insert(S::Created);
                } else {
                    assert_eq!(code, Some(Code::AlreadyExists), "{step}");
                }
            }
            Cmd::Boot { c, n } => act(&h, &mut model, c, n, Action::Boot, None).await,
            Cmd::Pause { c, n } => act(&h, &mut model, c, n, Action::Pause, None).await,
            Cmd::Resume { c, n } => act(&h, &mut model, c, n, Action::Resume, None).await,
            Cmd::Reboot { c, n, force } => act(&h, &mut model, c, n, Action::Reboot { force }, None).await,
            Cmd::Shutdown { c, n } => act(&h, &mut model, c, n, Action::Shutdown, None).await,
            Cmd::Delete { c, n, force } => act(&h, &mut model, c, n, Action::Delete { force }, None).await,
            Cmd::Suspend { c, n } => act(&h, &mut model, c, n, Action::Suspend, None).await,
            Cmd::Exit { c, n } => {
                let Some(&s) = model.get(&(c, n)) else { continue };
                if matches!(s, S::Shutdown | S::Suspended) {
                    continue;
                }
                let host = h.mgr.get(&cust(c), &name(n)).unwrap().host_id;
                assert!(h.fake.simulate_exit(&host), "{step}: the VM has a VMM");
                for _ in 0..500 {
                    if h.mgr.get(&cust(c), &name(n)).unwrap().state() == VmState::Shutdown {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                model.insert((c, n), S::Shutdown);
            }
            Cmd::FailNext { c, n } | Cmd::TimeOutAfter { c, n } => {
                let Some(&s) = model.get(&(c, n)) else { continue };
                let timeout = matches!(cmd, Cmd::TimeOutAfter { .. });
                // The first action the model allows; its backend call is armed.
                let candidates: &[Action] = if timeout {
                    &[Action::Boot, Action::Pause, Action::Resume]
                } else {
                    &[
                        Action::Boot,
                        Action::Pause,
                        Action::Resume,
                        Action::Reboot { force: false },
                        Action::Shutdown,
                        Action::Suspend,
                    ]
                };
                let Some(&action) = candidates.iter().find(|a| next(s, **a).is_some()) else { continue };
                let call = backend_call(s, action);
                if timeout {
                    h.fake.time_out_after_next(call);
                } else {
                    h.fake.fail_next(call, "injected");
                }
                act(&h, &mut model, c, n, action, Some(if timeout { "timeout" } else { "fail" })).await;
            }
        }
        // Nothing is left reconciling, and the manager agrees with the model.
        for ((c, n), _) in model.iter() {
            let v = h.mgr.get(&cust(*c), &name(*n)).unwrap();
            assert!(!v.reconciling && v.pending.is_none(), "{step}: {v:?}");
        }
        check_all(&h, &model, &step);
    }
    assert!(h.mgr.store().intents().unwrap().is_empty(), "no intent outlives its operation");
    h.stop.cancel();
    drop(h);
    // A restart keeps every VM and state, one directory per VM.
    let h = open(tmp.path()).await;
    check_all(&h, &model, "after reopening");
    let dirs = std::fs::read_dir(tmp.path().join("vms")).unwrap().count();
    assert_eq!(dirs, model.len(), "one directory per VM");
    h.stop.cancel();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_follow_the_model(cmds in prop::collection::vec(cmd(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(cmds));
    }
}
