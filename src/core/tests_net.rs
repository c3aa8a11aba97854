//! Manager tests of metald-managed NICs against the fake backend and a
//! [`RecordingNet`] (the "kernel" it records survives a reopen, as the
//! kernel survives a metald restart): leases in the spec, kernel objects
//! made before the hypervisor and removed after it, refusals, restarts and
//! interrupted creates.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use super::*;
use crate::backend::fake::{FakeBackend, FakeControl};
use crate::model::net::Pools;
use crate::model::{BootSpec, Code, CpuSpec, Ipv4Spec, MemorySpec, NicSpec, PortSpec, VmSpec};

struct Env {
    mgr: Manager,
    fake: FakeControl,
    store: Store,
    stop: CancellationToken,
}

fn pools() -> Pools {
    Pools { v4: Some("10.9.0.0/29".parse().unwrap()), v6: Some("fd00::/64".parse().unwrap()), ports: 100..=102 }
}

async fn open(dir: &Path, net: Option<Arc<RecordingNet>>) -> Env {
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
            net: NetHandle(net.map(|n| n as Arc<dyn HostNet>)),
            images: Default::default(),
        },
        Arc::new(backend),
        store.clone(),
        rx,
        stop.clone(),
    )
    .await
    .unwrap();
    Env { mgr, fake, store, stop }
}

fn spec(env: &Env, nics: Vec<NicSpec>) -> VmSpec {
    VmSpec {
        cpu: CpuSpec { vcpus: 1, ..Default::default() },
        memory: MemorySpec { size_bytes: 64 << 20, ..Default::default() },
        boot: BootSpec {
            kernel: env.mgr.inner.cfg.limits.asset_dirs[0].join("vmlinux"),
            kernel_args: "console=ttyS0".into(),
            ..Default::default()
        },
        network: nics,
        ..Default::default()
    }
}

fn managed() -> NicSpec {
    NicSpec::default()
}

fn c(s: &str) -> CustomerId {
    CustomerId(s.into())
}

fn recording() -> Arc<RecordingNet> {
    Arc::new(RecordingNet::new(pools(), vec!["10.0.0.53".parse().unwrap()]))
}

#[tokio::test]
async fn a_managed_nic_is_leased_wired_before_the_vmm_and_released_at_delete() {
    let dir = tempfile::tempdir().unwrap();
    let net = recording();
    let env = open(dir.path(), Some(net.clone())).await;
    let mut nic = managed();
    nic.ports = vec![PortSpec { protocol: String::new(), host_port: 0, guest_port: 80 }];
    let vm = env.mgr.create(&c("a"), None, spec(&env, vec![nic])).await.unwrap();
    let n = &vm.spec.network[0];
    assert!(n.managed && n.tap.starts_with("mt-"), "{n:?}");
    assert_eq!(n.ipv4.as_ref().unwrap().address, "10.9.0.2");
    assert_eq!(n.ipv4.as_ref().unwrap().gateway, "10.9.0.1");
    assert_eq!(n.ipv6.as_ref().unwrap().address, "fd00::2");
    assert_eq!(n.ports, [PortSpec { protocol: "tcp".into(), host_port: 100, guest_port: 80 }]);
    assert!(vm.spec.boot.kernel_args.contains("ip=10.9.0.2::10.9.0.1:255.255.255.248::eth0:off"));
    assert!(vm.spec.boot.kernel_args.contains("metald.dns=10.0.0.53"));
    // Wired as leased; the backend got the TAP name.
    let wired = net.wired();
    assert_eq!(wired[&vm.host_id].nics[0].tap, n.tap);
    assert!(env.fake.calls().iter().any(|(id, op)| id == vm.host_id.as_str() && *op == "create"));
    // A second VM of another customer gets the next address and port.
    let other = env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap();
    assert_eq!(other.spec.network[0].ipv4.as_ref().unwrap().address, "10.9.0.3");
    assert_ne!(net.wired()[&vm.host_id].tag, net.wired()[&other.host_id].tag);
    // Boot and shutdown keep everything; delete releases everything.
    env.mgr.boot(&c("a"), &vm.id).await.unwrap();
    env.mgr.shutdown(&c("a"), &vm.id, StopMode::Force).await.unwrap();
    assert!(net.wired().contains_key(&vm.host_id));
    env.mgr.delete(&c("a"), &vm.id, true).await.unwrap();
    assert!(!net.wired().contains_key(&vm.host_id));
    assert!(!env.store.net_leases().unwrap().contains_key(&vm.host_id));
    let again = env.mgr.create(&c("c"), None, spec(&env, vec![managed()])).await.unwrap();
    assert_eq!(again.spec.network[0].ipv4.as_ref().unwrap().address, "10.9.0.2", "the address was freed");
    env.stop.cancel();
}

#[tokio::test]
async fn refusals_name_what_to_fix_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let net = recording();
    let env = open(dir.path(), Some(net.clone())).await;
    let with_v4 = |a: &str| NicSpec { ipv4: Some(Ipv4Spec { address: a.into(), ..Default::default() }), ..managed() };
    let e = env.mgr.create(&c("a"), None, spec(&env, vec![with_v4("10.1.0.5")])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.chain().contains("config.network[0].ipv4_config.address") && e.chain().contains("outside"),
        "{}",
        e.chain()
    );
    let port =
        |p| NicSpec { ports: vec![PortSpec { protocol: String::new(), host_port: p, guest_port: 22 }], ..managed() };
    let e = env.mgr.create(&c("a"), None, spec(&env, vec![port(22)])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.chain());
    // Taken: by name, whoever holds it.
    env.mgr.create(&c("a"), None, spec(&env, vec![with_v4("10.9.0.4"), port(101)])).await.unwrap();
    let e = env.mgr.create(&c("b"), None, spec(&env, vec![with_v4("10.9.0.4")])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.chain().contains("10.9.0.4"), "{}", e.chain());
    let e = env.mgr.create(&c("b"), None, spec(&env, vec![port(101)])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Exhausted: /29 has five leasable addresses, two are taken.
    for _ in 0..3 {
        env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap();
    }
    let e = env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.chain());
    assert!(e.chain().contains("UNKEY_METALD_NETWORK_IPV4_POOL"), "{}", e.chain());
    // The kernel side failing: nothing stays leased or wired.
    let before = env.store.net_leases().unwrap().len();
    env.mgr
        .delete(
            &c("b"),
            &env.mgr.list(&c("b"), &ListQuery { states: vec![], page_size: 10, after: None }).vms[0].id,
            true,
        )
        .await
        .unwrap();
    *net.fail_next_add.lock().unwrap() = Some("no such device".into());
    let e = env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(env.store.net_leases().unwrap().len(), before - 1);
    // The backend failing after wiring: unwired and released too.
    env.fake.fail_next("create", "boom");
    env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap_err();
    assert_eq!(env.store.net_leases().unwrap().len(), before - 1);
    assert_eq!(net.wired().len(), before - 1);
    assert!(env.store.intents().unwrap().is_empty());
    // Unavailable or off: refused before anything is written.
    *net.unavailable.lock().unwrap() = Some("nft is not installed: apt-get install nftables".into());
    let e = env.mgr.create(&c("b"), None, spec(&env, vec![managed()])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.chain().contains("apt-get install nftables"), "{}", e.chain());
    // An operator's TAP needs no host networking.
    let op = NicSpec { tap: "tap7".into(), ..Default::default() };
    env.mgr.create(&c("b"), None, spec(&env, vec![op])).await.unwrap();
    env.stop.cancel();
    let off_dir = tempfile::tempdir().unwrap();
    let off = open(off_dir.path(), None).await;
    let e = off.mgr.create(&c("a"), None, spec(&off, vec![managed()])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.chain().contains("UNKEY_METALD_NETWORK_ENABLED"), "{}", e.chain());
    off.stop.cancel();
}

#[tokio::test]
async fn a_restart_keeps_leases_and_rebuilds_the_kernel_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let net = recording();
    let env = open(dir.path(), Some(net.clone())).await;
    let vm = env.mgr.create(&c("a"), None, spec(&env, vec![managed()])).await.unwrap();
    env.mgr.boot(&c("a"), &vm.id).await.unwrap();
    env.stop.cancel();
    drop(env);
    // A crash mid-create left an intent and leases but no VM, and the
    // kernel has an object of a VM the store does not know.
    let store = Store::open(&dir.path().join("db")).unwrap();
    let ghost = VmId::parse("ghost").unwrap();
    let intent = Intent { vm_id: ghost.clone(), customer: c("a"), op: "create".into(), started_at: 1 };
    let nics = crate::model::net::requests(&[NicSpec { id: "eth0".into(), managed: true, ..Default::default() }]);
    let lease = store.begin_create(&intent, &nics, &pools()).unwrap();
    net.wired.lock().unwrap().insert(ghost.clone(), lease);
    net.wired.lock().unwrap().insert(VmId::parse("stray").unwrap(), NetLease::default());
    drop(store);
    let env = open(dir.path(), Some(net.clone())).await;
    let info = env.mgr.get(&c("a"), &vm.id).unwrap();
    assert_eq!(info.spec.network[0].ipv4.as_ref().unwrap().address, "10.9.0.2");
    let wired = net.wired();
    assert_eq!(wired.keys().cloned().collect::<Vec<_>>(), vec![vm.host_id.clone()], "kernel = store");
    assert_eq!(env.store.net_leases().unwrap().keys().cloned().collect::<Vec<_>>(), vec![vm.host_id.clone()]);
    // The rolled-back create's address is free again.
    let next = env.mgr.create(&c("a"), None, spec(&env, vec![managed()])).await.unwrap();
    assert_eq!(next.spec.network[0].ipv4.as_ref().unwrap().address, "10.9.0.3");
    env.stop.cancel();
}
