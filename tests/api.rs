//! API tests: the real daemon on 127.0.0.1:0 (fake backend, temp data dir),
//! driven through the generated client over Connect (proto and JSON), gRPC
//! and gRPC-Web.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use connectrpc::ErrorCode;
use metald::client::WireProtocol;
use metald::pb::vmprovisioner::v1 as pb;
use support::{TOKEN_A, TOKEN_B, http_get_raw, start, vm_config};

fn code<T: std::fmt::Debug>(r: Result<T, connectrpc::ConnectError>) -> ErrorCode {
    r.expect_err("expected an error").code
}

#[tokio::test]
async fn every_rpc_over_every_protocol() {
    let t = start(&[]).await;
    for proto in WireProtocol::ALL {
        let c = t.client_with(TOKEN_A, proto);
        let id = format!("vm-{}", format!("{proto:?}").to_lowercase());
        let r = c
            .create_vm(pb::CreateVmRequest {
                vm_id: id.clone(),
                config: t.config(&t.kernel()).into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{proto:?}: {e:?}"))
            .into_owned();
        assert_eq!(r.vm_id, id);
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_CREATED), "{proto:?}");

        let st = |s: buffa::EnumValue<pb::VmState>| s.as_known();
        let r = c.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert!(r.success);
        assert_eq!(st(r.state), Some(pb::VmState::VM_STATE_RUNNING));
        let r = c.pause_vm(pb::PauseVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(st(r.state), Some(pb::VmState::VM_STATE_PAUSED));
        let r =
            c.resume_vm(pb::ResumeVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(st(r.state), Some(pb::VmState::VM_STATE_RUNNING));
        let r = c
            .reboot_vm(pb::RebootVmRequest { vm_id: id.clone(), force: true, ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(st(r.state), Some(pb::VmState::VM_STATE_RUNNING));

        let info =
            c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(info.vm_id, id);
        assert_eq!(st(info.state), Some(pb::VmState::VM_STATE_RUNNING));
        assert_eq!(info.config.cpu.vcpu_count, 1);
        assert_eq!(info.config.boot.kernel_path, std::fs::canonicalize(t.kernel()).unwrap().display().to_string());
        assert_eq!(info.backend_info.get("backend").map(String::as_str), Some("fake"));
        assert!(info.backend_info.contains_key("console_log"));
        assert!(info.metrics.is_set(), "running VM has live metrics");
        assert_eq!(info.metrics.memory_usage_bytes, (128 << 20) / 4);

        let list = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
        assert!(list.vms.iter().any(|v| v.vm_id == id && v.customer_id == "cust-a"));

        let r = c
            .shutdown_vm(pb::ShutdownVmRequest { vm_id: id.clone(), timeout_seconds: 5, ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(st(r.state), Some(pb::VmState::VM_STATE_SHUTDOWN));
        let info =
            c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert!(!info.metrics.is_set(), "a shut-down VM has no live metrics");

        let r =
            c.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert!(r.success);
        assert_eq!(
            code(c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await),
            ErrorCode::NotFound,
            "{proto:?}"
        );
        // Errors carry the right code over every protocol.
        assert_eq!(
            code(c.boot_vm(pb::BootVmRequest { vm_id: id, ..Default::default() }).await),
            ErrorCode::NotFound,
            "{proto:?}"
        );
    }
}

#[tokio::test]
async fn invalid_requests_say_what_to_fix_and_create_nothing() {
    let t = start(&[("MAX_VCPUS", "4")]).await;
    let c = t.client(TOKEN_A);
    let outside = t.tmp.path().join("outside-kernel");
    std::fs::write(&outside, b"k").unwrap();
    let link = t.assets().join("sneaky");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let mut too_many_cpus = vm_config(&t.kernel());
    too_many_cpus.cpu.get_or_insert_default().vcpu_count = 5;
    let mut tiny_mem = vm_config(&t.kernel());
    tiny_mem.memory.get_or_insert_default().size_bytes = 1 << 20;
    let mut two_roots = vm_config(&t.kernel());
    let root = t.assets().join("rootfs.ext4").display().to_string();
    for i in 0..2 {
        two_roots.storage.push(pb::StorageDevice {
            id: format!("d{i}"),
            path: root.clone(),
            is_root_device: true,
            ..Default::default()
        });
    }
    let mut bad_max = vm_config(&t.kernel());
    bad_max.cpu.get_or_insert_default().max_vcpu_count = 0;
    bad_max.cpu.get_or_insert_default().vcpu_count = 2;
    bad_max.cpu.get_or_insert_default().max_vcpu_count = 1;
    let nic = |mac: &str, tap: &str| pb::NetworkInterface {
        mac_address: mac.into(),
        tap_device: tap.into(),
        ..Default::default()
    };
    let mut same_mac = vm_config(&t.kernel());
    same_mac.network = vec![nic("02:00:00:00:00:01", "tap-a"), nic("02:00:00:00:00:01", "tap-b")];
    let mut same_tap = vm_config(&t.kernel());
    same_tap.network = vec![nic("02:00:00:00:00:01", "tap-a"), nic("02:00:00:00:00:02", "tap-a")];
    let cases: Vec<(&str, pb::CreateVmRequest, &str)> = vec![
        (
            "same mac",
            pb::CreateVmRequest { config: same_mac.into(), ..Default::default() },
            "config.network[1].mac_address",
        ),
        (
            "same tap",
            pb::CreateVmRequest { config: same_tap.into(), ..Default::default() },
            "config.network[1].tap_device",
        ),
        ("no config", pb::CreateVmRequest::default(), "config"),
        ("cpus", pb::CreateVmRequest { config: too_many_cpus.into(), ..Default::default() }, "config.cpu.vcpu_count"),
        ("memory", pb::CreateVmRequest { config: tiny_mem.into(), ..Default::default() }, "config.memory.size_bytes"),
        ("max vcpu", pb::CreateVmRequest { config: bad_max.into(), ..Default::default() }, "config.cpu.max_vcpu_count"),
        (
            "no kernel",
            pb::CreateVmRequest { config: vm_config("").into(), ..Default::default() },
            "config.boot.kernel_path",
        ),
        (
            "outside",
            pb::CreateVmRequest { config: vm_config(&outside.display().to_string()).into(), ..Default::default() },
            "outside the asset directories",
        ),
        (
            "symlink out",
            pb::CreateVmRequest { config: vm_config(&link.display().to_string()).into(), ..Default::default() },
            "outside the asset directories",
        ),
        (
            "dotdot",
            pb::CreateVmRequest {
                config: vm_config(&format!("{}/../outside-kernel", t.assets().display())).into(),
                ..Default::default()
            },
            "outside the asset directories",
        ),
        ("two roots", pb::CreateVmRequest { config: two_roots.into(), ..Default::default() }, "is_root_device"),
        (
            "bad id",
            pb::CreateVmRequest { vm_id: "Bad_ID".into(), config: vm_config(&t.kernel()).into(), ..Default::default() },
            "vm_id",
        ),
    ];
    for (name, req, needle) in cases {
        let e = c.create_vm(req).await.expect_err(name);
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}: {e:?}");
        let msg = e.message.unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {msg:?} should mention {needle:?}");
    }
    let list = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    assert_eq!(list.total_count, 0, "nothing was created");
    let vms_dir = t.data_dir().join("vms");
    assert_eq!(std::fs::read_dir(vms_dir).unwrap().count(), 0, "no VM directory left behind");

    // Other invalid arguments.
    let e = c.list_vms(pb::ListVmsRequest { page_token: "garbage".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let e = c.list_vms(pb::ListVmsRequest { page_size: -1, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let e = c.boot_vm(pb::BootVmRequest::default()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.unwrap_or_default().contains("vm_id"));
}

#[tokio::test]
async fn lifecycle_rules_are_enforced() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    let id = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "rules".into(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned()
        .vm_id;
    let e = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "rules".into(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists);
    let e = c.pause_vm(pb::PauseVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.unwrap_or_default().contains("created"), "names the current state");
    c.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap();
    let e =
        c.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), force: false, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.unwrap_or_default().contains("force=true"));
    let e = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: id.clone(), timeout_seconds: -3, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    c.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), force: true, ..Default::default() }).await.unwrap();
    assert!(!t.data_dir().join("vms").join(&id).exists(), "VM directory removed");
    assert_eq!(t.d().fake.as_ref().unwrap().live_count(), 0, "process released");
}

#[tokio::test]
async fn max_vms_is_resource_exhausted() {
    let t = start(&[("MAX_VMS", "2")]).await;
    let c = t.client(TOKEN_A);
    for _ in 0..2 {
        c.create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() }).await.unwrap();
    }
    let e = c
        .create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    assert!(e.message.unwrap_or_default().contains("UNKEY_METALD_MAX_VMS"));
}

#[tokio::test]
async fn list_paginates_filters_and_counts() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    for i in 0..7 {
        let id = format!("page-{i}");
        c.create_vm(pb::CreateVmRequest {
            vm_id: id.clone(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap();
        if i % 2 == 0 {
            c.boot_vm(pb::BootVmRequest { vm_id: id, ..Default::default() }).await.unwrap();
        }
    }
    let mut token = String::new();
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_vms(pb::ListVmsRequest { page_size: 3, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(r.total_count, 7, "total counts all matching VMs, not the page");
        assert!(r.vms.len() <= 3);
        ids.extend(r.vms.into_iter().map(|v| v.vm_id));
        pages += 1;
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(ids, (0..7).map(|i| format!("page-{i}")).collect::<Vec<_>>());
    let r = c
        .list_vms(pb::ListVmsRequest { state_filter: vec![pb::VmState::VM_STATE_RUNNING.into()], ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.total_count, 4);
    assert!(r.vms.iter().all(|v| v.state.as_known() == Some(pb::VmState::VM_STATE_RUNNING)));
    assert!(r.next_page_token.is_empty());
    let r = c.list_vms(pb::ListVmsRequest { page_size: 5000, ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(r.vms.len(), 7, "page_size above the maximum is clamped to 1000");
}

#[tokio::test]
async fn tenancy_is_enforced() {
    let t = start(&[]).await;
    let a = t.client(TOKEN_A);
    let b = t.client(TOKEN_B);
    let id = a
        .create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() })
        .await
        .unwrap()
        .into_owned()
        .vm_id;
    assert_eq!(
        code(b.get_vm_info(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(b.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(b.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), force: true, ..Default::default() }).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(b.shutdown_vm(pb::ShutdownVmRequest { vm_id: id.clone(), force: true, ..Default::default() }).await),
        ErrorCode::NotFound
    );
    let list = b.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    assert_eq!(list.total_count, 0);
    assert!(list.vms.is_empty());
    // Creating for someone else is refused.
    let e = b
        .create_vm(pb::CreateVmRequest {
            customer_id: "cust-a".into(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    // Own customer_id is fine.
    b.create_vm(pb::CreateVmRequest {
        customer_id: "cust-b".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A spoofed baggage header (as the original honoured) changes nothing.
    let spoof = metald::client::vm_client(
        &t.endpoint(),
        TOKEN_B,
        WireProtocol::ConnectProto,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let opts = connectrpc::client::CallOptions::default()
        .with_header("baggage", "customer_id=cust-a,tenant_id=cust-a")
        .with_header("x-customer-id", "cust-a");
    let e = spoof
        .get_vm_info_with_options(pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() }, opts.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let list = spoof.list_vms_with_options(pb::ListVmsRequest::default(), opts).await.unwrap().into_owned();
    assert!(list.vms.iter().all(|v| v.customer_id == "cust-b"));
    // An id another customer uses is as free as any unused one: CreateVm
    // cannot probe for other customers' ids.
    let mine = b
        .create_vm(pb::CreateVmRequest {
            vm_id: id.clone(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(mine.vm_id, id);
    let host_of = |info: pb::GetVmInfoResponse| info.backend_info["host_id"].clone();
    let get = pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() };
    let (ha, hb) = (
        host_of(a.get_vm_info(get.clone()).await.unwrap().into_owned()),
        host_of(b.get_vm_info(get).await.unwrap().into_owned()),
    );
    assert_eq!(ha, id, "the first VM of an id keeps it on the host");
    assert!(hb.starts_with(&format!("{id}-")) && hb != ha, "{hb}");
    b.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap();
    // A still running, untouched VM for A; each keeps its own across a restart.
    let mut t = t;
    for round in 0..2 {
        let (a, b) = (t.client(TOKEN_A), t.client(TOKEN_B));
        let get = pb::GetVmInfoRequest { vm_id: id.clone(), ..Default::default() };
        let info = a.get_vm_info(get.clone()).await.unwrap().into_owned();
        assert_eq!(info.state.as_known(), Some(pb::VmState::VM_STATE_CREATED), "round {round}");
        let info = b.get_vm_info(get).await.unwrap().into_owned();
        assert_eq!(info.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING), "round {round}");
        if round == 0 {
            t.restart().await;
        }
    }
}

#[tokio::test]
async fn every_rpc_requires_a_valid_credential() {
    let t = start(&[]).await;
    for token in ["", "wrong-token-xxxxxxxx", "dev_customer_acme"] {
        let c = t.client(token);
        assert_eq!(code(c.list_vms(pb::ListVmsRequest::default()).await), ErrorCode::Unauthenticated, "{token:?}");
        assert_eq!(
            code(c.create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.get_vm_info(pb::GetVmInfoRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.boot_vm(pb::BootVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.pause_vm(pb::PauseVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.resume_vm(pb::ResumeVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.reboot_vm(pb::RebootVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.shutdown_vm(pb::ShutdownVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(c.delete_vm(pb::DeleteVmRequest { vm_id: "x".into(), ..Default::default() }).await),
            ErrorCode::Unauthenticated
        );
    }
}

#[tokio::test]
async fn dev_tokens_work_when_enabled() {
    let t = start(&[("AUTH_DEV_TOKENS", "true")]).await;
    let c = t.client("dev_customer_acme");
    c.create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() }).await.unwrap();
    let l = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    assert_eq!(l.vms[0].customer_id, "acme");
    // File tokens keep working beside dev tokens.
    let a = t.client(TOKEN_A);
    assert_eq!(a.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0);
}

#[tokio::test]
async fn a_lost_store_beside_vm_directories_refuses_to_start() {
    let mut t = start(&[]).await;
    let c = t.client(TOKEN_A);
    for id in ["lost-a", "lost-b"] {
        let req = pb::CreateVmRequest { vm_id: id.into(), config: t.config(&t.kernel()).into(), ..Default::default() };
        c.create_vm(req).await.unwrap();
    }
    let d = t.daemon.take().unwrap();
    d.shutdown();
    d.wait().await.unwrap();
    for f in ["metald.db", "metald.db-wal", "metald.db-shm"] {
        let _ = std::fs::remove_file(t.data_dir().join(f));
    }
    let cfg = metald::daemon::Config::from_source(&t.env).unwrap();
    let e = metald::daemon::start(cfg).await.err().expect("start must be refused");
    let msg = e.to_string();
    assert!(msg.contains("lost-a, lost-b") && msg.contains("Restore metald.db"), "{msg}");
    assert!(!t.data_dir().join("metald.db").exists(), "no new store was created");

    // An empty file counts as lost too; with the directories moved away it starts.
    std::fs::write(t.data_dir().join("metald.db"), b"").unwrap();
    let cfg = metald::daemon::Config::from_source(&t.env).unwrap();
    assert!(metald::daemon::start(cfg).await.is_err());
    std::fs::rename(t.data_dir().join("vms"), t.tmp.path().join("vms-moved")).unwrap();
    let cfg = metald::daemon::Config::from_source(&t.env).unwrap();
    t.daemon = Some(metald::daemon::start(cfg).await.unwrap());
    let l = t.client(TOKEN_A).list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    assert_eq!(l.total_count, 0);
}

#[tokio::test]
async fn restart_keeps_vms_and_states() {
    let mut t = start(&[]).await;
    let c = t.client(TOKEN_A);
    let mut want = Vec::new();
    for (i, steps) in [0, 1, 2, 3].into_iter().enumerate() {
        let id = format!("keep-{i}");
        c.create_vm(pb::CreateVmRequest {
            vm_id: id.clone(),
            config: t.config(&t.kernel()).into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut state = pb::VmState::VM_STATE_CREATED;
        if steps >= 1 {
            c.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap();
            state = pb::VmState::VM_STATE_RUNNING;
        }
        if steps == 2 {
            c.pause_vm(pb::PauseVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap();
            state = pb::VmState::VM_STATE_PAUSED;
        }
        if steps == 3 {
            c.shutdown_vm(pb::ShutdownVmRequest { vm_id: id.clone(), force: true, ..Default::default() })
                .await
                .unwrap();
            state = pb::VmState::VM_STATE_SHUTDOWN;
        }
        want.push((id, state));
    }
    t.restart().await;
    let c = t.client(TOKEN_A);
    let l = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    let got: Vec<_> = l.vms.iter().map(|v| (v.vm_id.clone(), v.state.as_known().unwrap())).collect();
    assert_eq!(got, want);
    // And the recovered VMs remain operable.
    c.resume_vm(pb::ResumeVmRequest { vm_id: "keep-2".into(), ..Default::default() }).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "keep-3".into(), ..Default::default() }).await.unwrap();
    let info = c
        .get_vm_info(pb::GetVmInfoRequest { vm_id: "keep-0".into(), ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(info.config.memory.size_bytes, 128 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_creates_boots_deletes() {
    let t = start(&[]).await;
    let endpoint = t.endpoint();
    let kernel = t.kernel();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = metald::client::vm_client(
            &endpoint,
            TOKEN_A,
            WireProtocol::ConnectProto,
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        let kernel = kernel.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("par-{i:02}");
            c.create_vm(pb::CreateVmRequest {
                vm_id: id.clone(),
                config: vm_config(&kernel).into(),
                ..Default::default()
            })
            .await
            .unwrap();
            c.boot_vm(pb::BootVmRequest { vm_id: id.clone(), ..Default::default() }).await.unwrap();
            if i % 2 == 0 {
                c.delete_vm(pb::DeleteVmRequest { vm_id: id.clone(), force: true, ..Default::default() })
                    .await
                    .unwrap();
            }
            id
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let c = t.client(TOKEN_A);
    let l = c.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_owned();
    let ids: Vec<_> = l.vms.iter().map(|v| v.vm_id.clone()).collect();
    let want: Vec<_> = (0..50).filter(|i| i % 2 == 1).map(|i| format!("par-{i:02}")).collect();
    assert_eq!(ids, want, "no VM lost or duplicated");
    assert!(l.vms.iter().all(|v| v.state.as_known() == Some(pb::VmState::VM_STATE_RUNNING)));
    assert_eq!(t.d().fake.as_ref().unwrap().live_count(), 25);
    let rows = t.d().manager.store().load_all().unwrap();
    assert_eq!(rows.len(), 25, "store agrees with memory");
    // Racing operations on one VM are serialised: exactly one boot wins.
    c.create_vm(pb::CreateVmRequest { vm_id: "race".into(), config: vm_config(&kernel).into(), ..Default::default() })
        .await
        .unwrap();
    let mut boots = Vec::new();
    for _ in 0..8 {
        let c = metald::client::vm_client(
            &endpoint,
            TOKEN_A,
            WireProtocol::ConnectProto,
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        boots.push(tokio::spawn(async move {
            c.boot_vm(pb::BootVmRequest { vm_id: "race".into(), ..Default::default() }).await.is_ok()
        }));
    }
    let mut wins = 0;
    for b in boots {
        wins += usize::from(b.await.unwrap());
    }
    assert_eq!(wins, 1);
}

#[tokio::test]
async fn guest_exit_is_noticed() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest {
        vm_id: "exiting".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "exiting".into(), ..Default::default() }).await.unwrap();
    let id = metald::model::VmId::parse("exiting").unwrap();
    assert!(t.d().fake.as_ref().unwrap().simulate_exit(&id));
    let mut state = None;
    for _ in 0..200 {
        let info = c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: "exiting".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        state = info.state.as_known();
        if state == Some(pb::VmState::VM_STATE_SHUTDOWN) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(state, Some(pb::VmState::VM_STATE_SHUTDOWN));
    // Why, in GetVmInfo, and after a restart (stored with the state).
    let mut t = t;
    for round in 0..2 {
        let c = t.client(TOKEN_A);
        let info = c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: "exiting".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        let stop = info.stop.as_option().expect("a stop reason");
        assert_eq!(stop.reason.as_known(), Some(pb::StopReason::STOP_REASON_GUEST_POWER_OFF), "{round}");
        assert_eq!(stop.detail, "simulated exit");
        assert!(stop.stopped_timestamp > 0);
        if round == 0 {
            t.restart().await;
        }
    }
}

#[tokio::test]
async fn health_reports_status_backend_and_counts() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest { config: t.config(&t.kernel()).into(), ..Default::default() }).await.unwrap();
    let body = http_get_raw(&t.d().addr, "/_/health").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["status"], "ok");
    assert_eq!(json["backend"], "fake");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["vms"]["total"], 1);
    assert_eq!(json["vms"]["created"], 1);
    assert_eq!(json["store_ok"], true);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls() {
    let t = start(&[]).await;
    let c = t.client(TOKEN_A);
    c.create_vm(pb::CreateVmRequest {
        vm_id: "slow".into(),
        config: t.config(&t.kernel()).into(),
        ..Default::default()
    })
    .await
    .unwrap();
    t.d().fake.as_ref().unwrap().set_delay(std::time::Duration::from_millis(500));
    let call =
        tokio::spawn(async move { c.boot_vm(pb::BootVmRequest { vm_id: "slow".into(), ..Default::default() }).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut t = t;
    let d = t.daemon.take().unwrap();
    let addr = d.addr;
    let manager = d.manager.clone();
    d.shutdown();
    d.wait().await.unwrap();
    let r = call.await.unwrap().expect("in-flight call completed");
    assert_eq!(r.into_owned().state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
    // The VM keeps running: shutdown of metald does not stop VMs.
    let a = metald::model::CustomerId("cust-a".into());
    let id = metald::model::VmId::parse("slow").unwrap();
    assert_eq!(manager.get(&a, &id).unwrap().state(), metald::model::VmState::Running);
}

#[tokio::test]
async fn health_is_503_when_the_backend_is_unusable() {
    let t = start(&[]).await;
    t.d().fake.as_ref().unwrap().set_unhealthy(Some("hypervisor binary vanished"));
    let body = http_get_raw(&t.d().addr, "/_/health").await;
    assert!(body.starts_with("HTTP/1.1 503"), "{body}");
    let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["status"], "unhealthy");
    assert_eq!(json["backend_ok"], false);
    assert_eq!(json["backend_detail"], "hypervisor binary vanished");
    t.d().fake.as_ref().unwrap().set_unhealthy(None);
    assert!(http_get_raw(&t.d().addr, "/_/health").await.starts_with("HTTP/1.1 200"));
}
