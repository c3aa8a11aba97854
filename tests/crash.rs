//! The fault-injection harness: the real `metald` binary is killed with
//! SIGKILL at random instants while a client drives random mutating
//! operations (create, boot, pause, resume, shutdown, delete; where the
//! backend saves guests also suspend, resume from suspended, snapshot,
//! clone and snapshot delete), then started again on the same data
//! directory. After each restart (`tests/support/crash.rs` has the shared
//! invariants):
//!
//! - no operation is left half-done (the store holds no intent once the VMs
//!   are settled, and no VM is still marked reconciling);
//! - `<data>/vms/` holds exactly the directories of the VMs metald reports;
//! - a SUSPENDED VM has a complete save and no process; no half-written or
//!   stale save, no `cont-pending` marker; `<data>/snapshots/` holds
//!   exactly the listed snapshots' directories (no `.tmp-*`);
//! - every live hypervisor process naming a VM directory is the recorded
//!   VMM of a VM that owns one (created, running or paused), one per VM;
//! - every VM's reported state is the hypervisor's own (asked through its
//!   API socket for Firecracker; through QMP for QEMU once metald has let go);
//! - a suspended VM resumes (about half of them after each restart, all
//!   at the end): it reaches RUNNING, and a QEMU guest's console counts on
//!   where it stopped; at the end every id can be deleted and created again.
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
//! directories), the fake Firecracker (real processes, many iterations; no
//! saves yet) and QEMU with the real guest image (a few iterations).
//! `tests/crash_saves.rs` kills metald in one real guest's suspends and
//! resumes. `METALD_CRASH_SEED` replays a run; `METALD_CRASH_ITERATIONS`
//! runs longer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use metald::client::VmClient;
use metald::pb::vmprovisioner::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::crash::{Host, Kind, Vms, check_common, qmp_status, settled_vms, ticks, vmm_processes, wait_ticks};

const IDS: [&str; 4] = ["crash-0", "crash-1", "crash-2", "crash-3"];
const SNAPSHOTS: [&str; 2] = ["snap-0", "snap-1"];

/// Per id, how many guests may have started in its directory: reset only
/// by a create (0) or clone (1) whose answer arrived (a new directory),
/// raised by every boot sent but not refused. A guest that resumes counts on from its last
/// tick only where this is at most 1 (else an earlier guest's ticks may
/// precede a new boot's in the same console log).
type Boots = BTreeMap<String, u32>;

/// One random mutating call (its outcome does not matter: the harness
/// checks the state metald reports after the crash, not this call).
async fn random_op(c: &VmClient, host: &Host, rng: &mut StdRng, boots: &mut Boots) {
    let id = IDS[rng.random_range(0..IDS.len())].to_owned();
    let snapshot = SNAPSHOTS[rng.random_range(0..SNAPSHOTS.len())].to_owned();
    let ops = if host.kind.saves() { 14 } else { 7 };
    let _ = match rng.random_range(0..ops) {
        0 | 1 => {
            let r = c
                .create_vm(pb::CreateVmRequest {
                    vm_id: id.clone(),
                    config: host.config().into(),
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                boots.insert(id, 0);
            }
            r.map(|_| ())
        }
        2 | 13 => {
            // Counted before the call (a kill may cut it), taken back when
            // it was refused (the VM was not shut down or created).
            *boots.entry(id.clone()).or_default() += 1;
            let r = c.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.map(|_| ());
            if let Err(e) = &r
                && matches!(e.code, connectrpc::ErrorCode::FailedPrecondition | connectrpc::ErrorCode::NotFound)
            {
                *boots.entry(id).or_default() -= 1;
            }
            r
        }
        3 => c.pause_vm(pb::PauseVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        // Resumes a paused VM, or restores a suspended one.
        4 | 7 => c.resume_vm(pb::ResumeVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        5 => c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id, force: true, ..Default::default() }).await.map(|_| ()),
        6 => c.delete_vm(pb::DeleteVmRequest { vm_id: id, force: true, ..Default::default() }).await.map(|_| ()),
        8 | 9 => c.suspend_vm(pb::SuspendVmRequest { vm_id: id, ..Default::default() }).await.map(|_| ()),
        10 => {
            c.snapshot_vm(pb::SnapshotVmRequest { vm_id: id, name: snapshot, ..Default::default() }).await.map(|_| ())
        }
        11 => {
            let r = c
                .create_vm(pb::CreateVmRequest { vm_id: id.clone(), from_snapshot: snapshot, ..Default::default() })
                .await;
            if r.is_ok() {
                boots.insert(id, 1);
            }
            r.map(|_| ())
        }
        _ => c.delete_snapshot(pb::DeleteSnapshotRequest { name: snapshot, ..Default::default() }).await.map(|_| ()),
    };
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

/// Every invariant of the module doc, after a restart.
async fn check(host: &Host, round: usize) -> Vms {
    let (vms, ctx) = check_common(host, round).await;
    if host.kind == Kind::FakeNet {
        check_network(host, &vms, &ctx);
    }
    if host.kind == Kind::FakeImages {
        check_images(host, &vms, &ctx).await;
    }
    if host.kind != Kind::FakeFirecracker {
        return vms;
    }
    let c = host.client();
    for (id, (state, _)) in &vms {
        let want = match state {
            pb::VmState::VM_STATE_CREATED => "Not started",
            pb::VmState::VM_STATE_RUNNING => "Running",
            pb::VmState::VM_STATE_PAUSED => "Paused",
            _ => continue,
        };
        let info =
            c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        let hv = firecracker_state(&info.backend_info["api_socket"]).await;
        assert_eq!(hv, want, "VM {id}: reported {state:?}, Firecracker says {hv}: {ctx}");
    }
    vms
}

/// Resumes every suspended VM: each reaches RUNNING, and a QEMU guest
/// ticks again, its first tick after the resume the one after its last
/// (where [`Boots`] tells which guest that last tick was from).
async fn resume_suspended(host: &Host, vms: &Vms, boots: &Boots) {
    let c = host.client();
    for (id, (state, _)) in vms.iter().filter(|(_, (s, _))| *s == pb::VmState::VM_STATE_SUSPENDED) {
        let console = host.console(id);
        let before = ticks(&console);
        let r = c
            .resume_vm(pb::ResumeVmRequest { vm_id: id.clone(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("resuming suspended VM {id}: {e:?} (log {})", host.log.display()));
        assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "VM {id} was {state:?}");
        if host.kind != Kind::Qemu {
            continue;
        }
        let after = wait_ticks(&console, before.len()).await;
        let first = after[before.len()];
        let booted_once = boots.get(id).is_some_and(|&n| n <= 1);
        if let Some(last) = before.last()
            && booted_once
        {
            assert_eq!(first, last + 1, "VM {id}'s guest after its resume: ticks {before:?} then {first}");
        }
        let checked = if booted_once { "" } else { " (not compared: more than one boot in its directory)" };
        eprintln!("resumed {id}: ticks {:?} → {first}{checked}", before.last());
    }
}

/// The image cache holds no work of an interrupted pull and only
/// published bases; every image VM has its writable disk and its base.
async fn check_images(host: &Host, vms: &Vms, ctx: &str) {
    let cache = host.data_dir().join("images");
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
fn check_network(host: &Host, vms: &Vms, ctx: &str) {
    let db = rusqlite::Connection::open(host.data_dir().join("metald.db")).unwrap();
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
    let mut boots = Boots::new();
    for round in 0..iterations {
        let c = host.client();
        let mut op_rng = StdRng::seed_from_u64(rng.random());
        let h = &host;
        let b = &mut boots;
        let ops_task = async {
            for _ in 0..ops {
                random_op(&c, h, &mut op_rng, b).await;
            }
        };
        let kill_after = Duration::from_millis(rng.random_range(0..max_kill_ms));
        // Drive operations until the kill instant (or until they are done).
        let _ = tokio::time::timeout(kill_after, ops_task).await;
        host.kill9();
        host.up().await;
        let vms = check(&host, round).await;
        eprintln!("round {round}: killed after {kill_after:?}; then {vms:?}");
        // Suspended VMs resume (about half of them now, to keep others
        // suspended across restarts; all of them at the end).
        let now: Vms = vms.into_iter().filter(|_| rng.random_bool(0.5)).collect();
        resume_suspended(&host, &now, &boots).await;
    }
    // What the restarts found and repaired (the log's summary lines).
    let log = std::fs::read_to_string(&host.log).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("state recovered from the store")).skip(1) {
        eprintln!("{}", &line[line.find("vms").unwrap_or(0)..]);
    }
    // Every suspended VM resumes; every snapshot can be deleted.
    let c = host.client();
    resume_suspended(&host, &settled_vms(&c).await, &boots).await;
    for s in c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned().snapshots {
        c.delete_snapshot(pb::DeleteSnapshotRequest { name: s.name, ..Default::default() }).await.unwrap();
    }
    check(&host, iterations).await;
    // Every id can be used again, cleanly; then nothing is left at all.
    for id in IDS {
        let _ = c.delete_vm(pb::DeleteVmRequest { vm_id: id.into(), force: true, ..Default::default() }).await;
        c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: host.config().into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("re-creating {id}: {e:?}"));
        c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    }
    let vms = check(&host, iterations + 1).await;
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
    assert!(check(&host, iterations + 2).await.is_empty());
    assert!(vmm_processes(&host.vms_dir()).is_empty());
    assert_eq!(std::fs::read_dir(host.data_dir().join("snapshots")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_fake_backend() {
    run(Kind::Fake, 60, 16, 100).await;
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
    run(Kind::Qemu, 16, 10, 1500).await;
}
