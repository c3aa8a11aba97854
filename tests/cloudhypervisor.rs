//! Cloud Hypervisor backend tests (the daemon in-process with
//! `UNKEY_METALD_BACKEND=cloudhypervisor` and the
//! `metald-fake-cloud-hypervisor` test double as its binary), plus the
//! `auto` backend selection. Request sequences are checked field by field
//! against Cloud Hypervisor's OpenAPI definitions; error injection goes
//! through a `fake-control.json` in each test's own temp dir.
//!
//! The real binaries of `../shared/hypervisors/` go through the same lifecycle in
//! `tests/real_hypervisors.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "cloudhypervisor/saves.rs"]
mod saves;

use std::time::Duration;

use connectrpc::ErrorCode;
use metald::daemon::Config;
use metald::pb::vmprovisioner::v1 as pb;
use serde_json::{Value, json};
use support::{
    KillOnDrop, TOKEN_A, TestDaemon, assert_requests, calls, canon, count_lines, create, http_get, info, metald_env,
    process_alive, processes_under, requests, set_control, vm_dir, wait_until, without_usage,
};

const FAKE_CH: &str = env!("CARGO_BIN_EXE_metald-fake-cloud-hypervisor");
const FAKE_FC: &str = env!("CARGO_BIN_EXE_metald-fake-firecracker");
const WAIT: Duration = Duration::from_secs(10);

async fn start(extra: &[(&str, &str)]) -> (TestDaemon, support::VmmGuard) {
    support::start_with(&[("BACKEND", "cloudhypervisor"), ("CLOUD_HYPERVISOR_BINARY", FAKE_CH)], extra).await
}

fn full_config(t: &TestDaemon) -> pb::VmConfig {
    let mut c = t.config(&t.kernel());
    c.cpu = pb::CpuConfig { vcpu_count: 2, max_vcpu_count: 4, ..Default::default() }.into();
    c.boot = pb::BootConfig {
        kernel_path: t.kernel(),
        initrd_path: t.assets().join("initrd.img").display().to_string(),
        kernel_args: "quiet".into(),
        ..Default::default()
    }
    .into();
    c.storage = vec![pb::StorageDevice {
        id: "root".into(),
        path: t.assets().join("rootfs.ext4").display().to_string(),
        is_root_device: true,
        read_only: true,
        ..Default::default()
    }];
    c.network = vec![pb::NetworkInterface {
        id: "eth0".into(),
        mac_address: "02:00:00:00:00:02".into(),
        tap_device: support::test_tap(t),
        tx_rate_limit: pb::RateLimit { bandwidth: 2_000_000, refill_time: 0, burst: 0, ..Default::default() }.into(),
        ..Default::default()
    }];
    c
}

fn put(path: &str) -> Value {
    json!({"method": "PUT", "path": format!("/api/v1/{path}"), "body": null})
}

fn get(path: &str) -> Value {
    json!({"method": "GET", "path": format!("/api/v1/{path}"), "body": null})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_sends_the_documented_requests() {
    let (t, _g) = start(&[]).await;
    let c = t.client(TOKEN_A);
    let dir = vm_dir(&t, "ch1");
    create(&t, "ch1", full_config(&t)).await.unwrap();
    let console = dir.join("console.log");
    let create_body = json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
        "memory": {"size": 128u64 << 20},
        "payload": {
            "kernel": canon(t.assets().join("vmlinux")),
            "cmdline": "quiet console=ttyS0 metald.generation=hvc0",
            "initramfs": canon(t.assets().join("initrd.img"))
        },
        "disks": [{"path": canon(t.assets().join("rootfs.ext4")), "readonly": true, "id": "root"}],
        "net": [{"tap": support::test_tap(&t), "mac": "02:00:00:00:00:02", "id": "eth0",
                 "rate_limiter_config": {"bandwidth": {"size": 2_000_000, "refill_time": 1000}}}],
        // The serial console is the process's stdout, metald's console.log.
        "serial": {"mode": "Tty"},
        // The virtio console carries a clone's new generation.
        "console": {"mode": "Pty"}
    });
    let mut want = vec![get("vmm.ping"), json!({"method": "PUT", "path": "/api/v1/vm.create", "body": create_body})];
    assert_requests(&requests(&dir), &want);
    let bi = info(&t, "ch1").await.backend_info;
    assert_eq!(bi["backend"], "cloudhypervisor");
    assert_eq!(bi["cloud_hypervisor_version"], "v40.0.0");
    let pid: i32 = bi["pid"].parse().unwrap();

    c.boot_vm(pb::BootVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(count_lines(&console, "METALD_GUEST_READY"), 1);
    let m = info(&t, "ch1").await.metrics;
    assert_eq!((m.storage_stats.bytes_read, m.storage_stats.write_operations), (8192, 1));
    assert_eq!((m.network_stats.bytes_transmitted, m.network_stats.packets_received), (500, 10));
    c.pause_vm(pb::PauseVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    c.resume_vm(pb::ResumeVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    c.reboot_vm(pb::RebootVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(count_lines(&console, "METALD_GUEST_READY"), 2);
    assert_eq!(info(&t, "ch1").await.backend_info["pid"], pid.to_string(), "reboot stays in-process");
    c.pause_vm(pb::PauseVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: "ch1".into(), timeout_seconds: 5, ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    assert!(!process_alive(pid), "power button ended the VMM");
    want.extend([
        put("vm.boot"),
        put("vm.pause"),
        put("vm.resume"),
        put("vm.reboot"),
        put("vm.pause"),
        get("vm.info"),
        put("vm.resume"),
        put("vm.power-button"),
    ]);
    let reqs = requests(&dir);
    assert!(calls(&reqs).contains(&"GET /api/v1/vm.counters".to_owned()));
    assert_requests(&without_usage(reqs), &want);
    c.delete_vm(pb::DeleteVmRequest { vm_id: "ch1".into(), ..Default::default() }).await.unwrap();
    assert!(!dir.exists());
    assert!(processes_under(t.tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_shutdown_and_errors() {
    let (t, _g) = start(&[("CLOUD_HYPERVISOR_API_TIMEOUT_MS", "500")]).await;
    let c = t.client(TOKEN_A);
    let tmp = t.tmp.path();

    set_control(tmp, Some(json!({"fail": "vm.create"})));
    let e = create(&t, "e1", full_config(&t)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal);
    let msg = e.message.unwrap_or_default();
    assert!(msg.contains("cloud-hypervisor API PUT /api/v1/vm.create: 500: injected failure at"), "{msg}");
    assert!(!vm_dir(&t, "e1").exists());
    wait_until("no processes", WAIT, || async { processes_under(tmp).is_empty() }).await;

    set_control(tmp, Some(json!({"exit": "vm.create"})));
    let e = create(&t, "e2", full_config(&t)).await.unwrap_err();
    assert!(e.message.unwrap_or_default().contains("the Cloud Hypervisor process exited"));
    wait_until("no processes", WAIT, || async { processes_under(tmp).is_empty() }).await;

    set_control(tmp, None);
    create(&t, "e3", t.config(&t.kernel())).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "e3".into(), ..Default::default() }).await.unwrap();
    set_control(tmp, Some(json!({"hang": "vm.pause"})));
    let e = c.pause_vm(pb::PauseVmRequest { vm_id: "e3".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DeadlineExceeded);
    set_control(tmp, None);
    let pid: i32 = info(&t, "e3").await.backend_info["pid"].parse().unwrap();
    c.shutdown_vm(pb::ShutdownVmRequest { vm_id: "e3".into(), force: true, ..Default::default() }).await.unwrap();
    assert!(!process_alive(pid));
    let reqs = requests(&vm_dir(&t, "e3"));
    let tail: Vec<String> = calls(&reqs).split_off(reqs.len() - 2);
    assert_eq!(tail, ["PUT /api/v1/vm.shutdown", "PUT /api/v1/vmm.shutdown"]);
    c.delete_vm(pb::DeleteVmRequest { vm_id: "e3".into(), ..Default::default() }).await.unwrap();
    assert!(processes_under(tmp).is_empty());
}

/// The API's ordering rules and answers, the same for the fake and the real
/// Cloud Hypervisor v53: 404 with the error chain (a JSON array) before a VM
/// exists, `vm.create` accepting files that do not exist (the boot opens
/// them and fails: 500), 500 with the chain for a call in the wrong state,
/// `vmm.shutdown` 200 and the process gone.
async fn check_api_ordering(binary: &str) {
    use metald::backend::uds_http::{UdsClient, text_error_body};
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    let sock = tmp.path().join("ch.sock");
    let mut child = std::process::Command::new(binary)
        .arg("--api-socket")
        .arg(format!("path={}", sock.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("socket", WAIT, || async { sock.exists() }).await;
    let c = UdsClient::new(&sock, "cloud-hypervisor", Duration::from_secs(5), text_error_body);
    wait_until("vmm.ping", WAIT, || async { c.get::<Value>("/api/v1/vmm.ping").await.is_ok() }).await;
    let chain = |e: metald::backend::uds_http::ApiError| {
        let msg = e.to_string();
        (e.status(), msg)
    };
    let (s, m) = chain(c.put_empty("/api/v1/vm.boot").await.unwrap_err());
    assert_eq!(s, Some(404), "boot before create: {m}");
    assert!(m.contains("VM config is missing"), "{m}");
    let kernel = tmp.path().join("halt.elf");
    support::halting_kernel(&kernel);
    let missing = tmp.path().join("no-such-disk.img");
    let config = json!({"payload": {"kernel": kernel}, "memory": {"size": 64u64 << 20}, "disks": [{"path": missing}]});
    c.put("/api/v1/vm.create", &config).await.expect("vm.create does not open the files");
    let (s, m) = chain(c.put_empty("/api/v1/vm.pause").await.unwrap_err());
    assert_eq!(s, Some(500), "pause before boot: {m}");
    assert!(m.contains("VM is not running"), "{m}");
    let (s, m) = chain(c.put_empty("/api/v1/vm.boot").await.unwrap_err());
    assert_eq!(s, Some(500), "the boot opens the disk: {m}");
    assert!(m.contains("Cannot open disk path"), "{m}");
    c.put_empty("/api/v1/vm.delete").await.unwrap();
    c.put("/api/v1/vm.create", &json!({"payload": {"kernel": kernel}, "memory": {"size": 64u64 << 20}})).await.unwrap();
    c.put_empty("/api/v1/vm.boot").await.unwrap();
    let i: Value = c.get("/api/v1/vm.info").await.unwrap();
    assert_eq!(i["state"], "Running");
    let (s, m) = chain(c.put_empty("/api/v1/vm.resume").await.unwrap_err());
    assert_eq!(s, Some(500), "resume while running: {m}");
    c.put_empty("/api/v1/vmm.shutdown").await.expect("vmm.shutdown answers 200");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_cloud_hypervisor_enforces_the_api_ordering() {
    check_api_ordering(FAKE_CH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_hypervisor_has_the_same_api_ordering() {
    let Some(ch) = support::real_hypervisor("cloud-hypervisor") else { return };
    check_api_ordering(ch.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_that_is_not_a_kernel_is_refused() {
    let (t, _g) = start(&[]).await;
    std::fs::write(t.assets().join("notes.txt"), b"hello").unwrap();
    let e = create(&t, "nk", t.config(&t.assets().join("notes.txt").display().to_string())).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.unwrap_or_default().contains("neither an ELF vmlinux (PVH) nor a bzImage"));
}

/// Starts a daemon with `BACKEND=auto` and the given binaries; returns the
/// chosen backend's health or the start error.
async fn auto(fc: &str, ch: &str, qemu: &str) -> Result<Value, String> {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("BACKEND", "auto"),
        ("FIRECRACKER_BINARY", fc),
        ("CLOUD_HYPERVISOR_BINARY", ch),
        ("QEMU_BINARY", qemu),
        ("AUTH_DEV_TOKENS", "true"),
        ("ADDRESS", "127.0.0.1"),
        ("PORT", "0"),
        ("DATA_DIR", &tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", &tmp.path().join("assets").display().to_string()),
    ];
    let env = metald_env(env);
    let d = metald::daemon::start(Config::from_source(&env).unwrap()).await.map_err(|e| e.to_string())?;
    let (_, h) = http_get(&d.addr, "/_/health").await;
    d.shutdown();
    Ok(h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_prefers_firecracker_then_cloud_hypervisor_then_qemu() {
    let none = "/nonexistent/metald-test-binary";
    let h = auto(FAKE_FC, FAKE_CH, none).await.unwrap();
    assert_eq!(h["backend"], "firecracker");
    assert!(h["kvm"].is_boolean());
    let h = auto(none, FAKE_CH, none).await.unwrap();
    assert_eq!(h["backend"], "cloudhypervisor");
    assert_eq!(h["backend_version"], "cloud-hypervisor v40.0.0 (metald fake)");
    let e = auto(none, none, none).await.unwrap_err();
    assert!(e.contains("no hypervisor found") && e.contains("Firecracker") && e.contains("QEMU"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_vms_survive_a_daemon_restart() {
    let (mut t, _g) = start(&[]).await;
    create(&t, "rs", t.config(&t.kernel())).await.unwrap();
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: "rs".into(), ..Default::default() }).await.unwrap();
    let pid: i32 = info(&t, "rs").await.backend_info["pid"].parse().unwrap();
    t.restart().await;
    let c = t.client(TOKEN_A);
    let i = info(&t, "rs").await;
    assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert_eq!(i.backend_info["pid"], pid.to_string());
    c.shutdown_vm(pb::ShutdownVmRequest { vm_id: "rs".into(), timeout_seconds: 5, ..Default::default() })
        .await
        .unwrap();
    assert!(!process_alive(pid));
    c.delete_vm(pb::DeleteVmRequest { vm_id: "rs".into(), ..Default::default() }).await.unwrap();
    assert!(processes_under(t.tmp.path()).is_empty());
}
