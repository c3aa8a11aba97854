//! The suspend, snapshot and clone calls through the API: the real daemon
//! on 127.0.0.1:0 (fake backend, temp data dir) driven by the generated
//! client and by `metaldctl`. Codes and messages of every refusal, tenancy,
//! the space limit, and the states and sizes the calls report. (Real guests:
//! `tests/snapshot_e2e.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use connectrpc::{ConnectError, ErrorCode};
use metald::pb::vmprovisioner::v1 as pb;
use support::{TOKEN_A, TOKEN_B, start, vm_config};

fn err<T: std::fmt::Debug>(r: Result<T, ConnectError>) -> (ErrorCode, String) {
    let e = r.expect_err("expected an error");
    (e.code, e.message.unwrap_or_default())
}

fn state(s: buffa::EnumValue<pb::VmState>) -> Option<pb::VmState> {
    s.as_known()
}

#[tokio::test]
async fn suspend_resume_snapshot_and_clone_with_their_refusals() {
    let t = start(&[]).await;
    let (a, b) = (t.client(TOKEN_A), t.client(TOKEN_B));
    a.create_vm(pb::CreateVmRequest {
        vm_id: "web".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Not yet booted: nothing to save.
    let (code, msg) = err(a.suspend_vm(pb::SuspendVmRequest { vm_id: "web".into(), ..Default::default() }).await);
    assert_eq!(code, ErrorCode::FailedPrecondition);
    assert!(msg.contains("created") && msg.contains("running or paused"), "{msg}");
    a.boot_vm(pb::BootVmRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap();

    // Suspend: SUSPENDED with a size; info agrees; boot is refused.
    let r =
        a.suspend_vm(pb::SuspendVmRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(state(r.state), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert!(r.success && r.snapshot_size_bytes > 0, "{r:?}");
    let info = a.get_vm_info(pb::GetVmInfoRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap();
    let info = info.into_owned();
    assert_eq!(state(info.state), Some(pb::VmState::VM_STATE_SUSPENDED));
    assert_eq!(info.snapshot_size_bytes, r.snapshot_size_bytes);
    assert!(!info.metrics.is_set(), "no live metrics without a process");
    let (code, msg) = err(a.boot_vm(pb::BootVmRequest { vm_id: "web".into(), ..Default::default() }).await);
    assert_eq!(code, ErrorCode::FailedPrecondition);
    assert!(msg.contains("resume it instead"), "{msg}");
    // ListVms filters by the new state.
    let listed = a
        .list_vms(pb::ListVmsRequest {
            state_filter: vec![pb::VmState::VM_STATE_SUSPENDED.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(listed.vms.iter().map(|v| v.vm_id.as_str()).collect::<Vec<_>>(), ["web"]);
    // Another customer's VM is not found.
    let (code, _) = err(b.resume_vm(pb::ResumeVmRequest { vm_id: "web".into(), ..Default::default() }).await);
    assert_eq!(code, ErrorCode::NotFound);
    let r = a.resume_vm(pb::ResumeVmRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state(r.into_owned().state), Some(pb::VmState::VM_STATE_RUNNING));
    let info = a.get_vm_info(pb::GetVmInfoRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap();
    assert_eq!(info.into_owned().snapshot_size_bytes, 0);

    // Snapshot names follow the VM id rules and are per customer.
    let snap = |c: &metald::client::VmClient, vm: &str, name: &str| {
        let req = pb::SnapshotVmRequest { vm_id: vm.into(), name: name.into(), ..Default::default() };
        let c = c.clone();
        async move { c.snapshot_vm(req).await.map(|r| r.into_owned()) }
    };
    let (code, msg) = err(snap(&a, "web", "").await);
    assert_eq!((code, msg.contains("name")), (ErrorCode::InvalidArgument, true), "{msg}");
    let (code, _) = err(snap(&a, "web", "Bad Name!").await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    let s = snap(&a, "web", "warm").await.unwrap();
    let s = s.snapshot.as_option().unwrap().clone();
    assert_eq!((s.name.as_str(), s.source_vm_id.as_str(), s.hypervisor.as_str()), ("warm", "web", "fake"));
    assert_eq!((s.vcpu_count, s.memory_size_bytes), (1, 128 << 20));
    assert!(s.size_bytes > 0 && s.created_timestamp > 0);
    let (code, msg) = err(snap(&a, "web", "warm").await);
    assert_eq!(code, ErrorCode::AlreadyExists, "{msg}");
    let r = a.get_vm_info(pb::GetVmInfoRequest { vm_id: "web".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state(r.into_owned().state), Some(pb::VmState::VM_STATE_RUNNING), "the source runs on");
    let mine = a.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned();
    assert_eq!(mine.snapshots.len(), 1);
    let theirs = b.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned();
    assert!(theirs.snapshots.is_empty(), "another customer sees no snapshot");

    // Clones: config must be left out; port mappings need a managed NIC;
    // another customer's snapshot is not found.
    let clone = |c: &metald::client::VmClient, req: pb::CreateVmRequest| {
        let c = c.clone();
        async move { c.create_vm(req).await.map(|r| r.into_owned()) }
    };
    let from = |id: &str| pb::CreateVmRequest { vm_id: id.into(), from_snapshot: "warm".into(), ..Default::default() };
    let (code, msg) = err(clone(&a, pb::CreateVmRequest { config: vm_config(&t.kernel()).into(), ..from("c0") }).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("config") && msg.contains("from_snapshot"), "{msg}");
    let ports = vec![pb::PortMapping { guest_port: 80, ..Default::default() }];
    let (code, msg) = err(clone(&a, pb::CreateVmRequest { port_mappings: ports.clone(), ..from("c0") }).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("port_mappings"), "{msg}");
    let (code, msg) =
        err(clone(&a, pb::CreateVmRequest { port_mappings: ports, config: t.config(&t.kernel()).into(), ..from("") })
            .await);
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
    let (code, msg) = err(clone(&b, from("c0")).await);
    assert_eq!(code, ErrorCode::NotFound);
    assert!(msg.contains("snapshot warm"), "{msg}");
    let c1 = clone(&a, from("c1")).await.unwrap();
    assert_eq!((c1.vm_id.as_str(), state(c1.state)), ("c1", Some(pb::VmState::VM_STATE_RUNNING)));
    let (code, _) = err(clone(&a, from("c1")).await);
    assert_eq!(code, ErrorCode::AlreadyExists);
    // Without a VM id one is generated.
    let c2 = clone(&a, from("")).await.unwrap();
    assert!(!c2.vm_id.is_empty() && c2.vm_id != "c1");

    // Deleting the snapshot leaves its clones; deleting it again is NotFound.
    a.delete_snapshot(pb::DeleteSnapshotRequest { name: "warm".into(), ..Default::default() }).await.unwrap();
    let (code, _) =
        err(a.delete_snapshot(pb::DeleteSnapshotRequest { name: "warm".into(), ..Default::default() }).await);
    assert_eq!(code, ErrorCode::NotFound);
    let r = a.get_vm_info(pb::GetVmInfoRequest { vm_id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state(r.into_owned().state), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(std::fs::read_dir(t.data_dir().join("snapshots")).unwrap().next().is_none(), "no snapshot files left");

    // A suspended VM's delete removes its save with its directory.
    a.suspend_vm(pb::SuspendVmRequest { vm_id: "c1".into(), ..Default::default() }).await.unwrap();
    let dirs = || std::fs::read_dir(t.data_dir().join("vms")).unwrap().count();
    let before = dirs();
    a.delete_vm(pb::DeleteVmRequest { vm_id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(dirs(), before - 1);
}

#[tokio::test]
async fn saves_past_the_space_limit_are_resource_exhausted_and_write_nothing() {
    let t = start(&[("SNAPSHOT_MAX_GB", "1")]).await;
    let a = t.client(TOKEN_A);
    let mut config = t.config(&t.kernel());
    config.memory = pb::MemoryConfig { size_bytes: 2 << 30, ..Default::default() }.into();
    a.create_vm(pb::CreateVmRequest { vm_id: "big".into(), config: config.into(), ..Default::default() })
        .await
        .unwrap();
    a.boot_vm(pb::BootVmRequest { vm_id: "big".into(), ..Default::default() }).await.unwrap();
    let (code, msg) = err(a.suspend_vm(pb::SuspendVmRequest { vm_id: "big".into(), ..Default::default() }).await);
    assert_eq!(code, ErrorCode::ResourceExhausted);
    assert!(msg.contains("UNKEY_METALD_SNAPSHOT_MAX_GB"), "{msg}");
    let req = pb::SnapshotVmRequest { vm_id: "big".into(), name: "s".into(), ..Default::default() };
    let (code, _) = err(a.snapshot_vm(req).await);
    assert_eq!(code, ErrorCode::ResourceExhausted);
    let r = a.get_vm_info(pb::GetVmInfoRequest { vm_id: "big".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state(r.into_owned().state), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(a.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_owned().snapshots.is_empty());
    let saved = std::fs::read_dir(t.data_dir().join("vms")).unwrap().flatten().any(|d| {
        let p = d.path();
        p.join("suspended").exists() || p.join("suspended.tmp").exists()
    });
    assert!(!saved, "nothing written");
}

// metaldctl blocks its thread: the daemon serves from the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metaldctl_suspends_snapshots_and_clones() {
    let t = start(&[]).await;
    let endpoint = t.endpoint();
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_metaldctl"))
            .args(["--endpoint", &endpoint, "--token", TOKEN_A])
            .args(args)
            .output()
            .expect("running metaldctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "metaldctl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let kernel = t.kernel();
    ctl(&["create", "--id", "app", "--kernel", &kernel]);
    ctl(&["boot", "app"]);
    assert!(ctl(&["suspend", "app"]).contains("SUSPENDED"));
    assert!(ctl(&["list", "--state", "suspended"]).contains("app"));
    assert!(ctl(&["resume", "app"]).contains("RUNNING"));
    assert!(ctl(&["snapshot", "app", "--name", "base"]).starts_with("base\tapp\t"));
    let list = ctl(&["--json", "snapshots"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["snapshots"][0]["name"], "base", "{list}");
    assert!(ctl(&["create", "--from-snapshot", "base", "--id", "copy"]).contains("copy\tRUNNING"));
    assert!(ctl(&["snapshot-delete", "base"]).contains("DELETED"));
    assert!(ctl(&["snapshots"]).lines().all(|l| !l.contains("base")));
}
