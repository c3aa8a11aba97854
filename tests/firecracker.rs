//! Firecracker backend tests: the real daemon in-process with
//! `UNKEY_METALD_BACKEND=firecracker`, whose "Firecracker binary" is the
//! `metald-fake-firecracker` test double (and `metald-fake-jailer` for the
//! jailer), so spawning, socket waiting, exit detection and cleanup are
//! real. Request sequences recorded by the fake are checked field by field
//! against Firecracker's OpenAPI definitions. Error injection goes through
//! a `fake-control.json` in each test's own temp dir (parallel-safe).
//!
//! The real binaries of `../shared/hypervisors/` go through the same lifecycle in
//! `tests/real_hypervisors.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "firecracker/saves.rs"]
mod saves;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connectrpc::ErrorCode;
use metald::pb::vmprovisioner::v1 as pb;
use serde_json::{Value, json};
use support::{
    KillOnDrop, TOKEN_A, TestDaemon, assert_requests, calls, canon, count_lines, create, http_get, info, process_alive,
    processes_under, requests, set_control, vm_dir, wait_until, without_usage,
};

const FAKE_FC: &str = env!("CARGO_BIN_EXE_metald-fake-firecracker");
const FAKE_JAILER: &str = env!("CARGO_BIN_EXE_metald-fake-jailer");
const WAIT: Duration = Duration::from_secs(10);

async fn start(extra: &[(&str, &str)]) -> (TestDaemon, support::VmmGuard) {
    support::start_with(&[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", FAKE_FC)], extra).await
}

fn boot_config(kernel: &str, initrd: &Path) -> buffa::MessageField<pb::BootConfig, buffa::Inline<pb::BootConfig>> {
    pb::BootConfig {
        kernel_path: kernel.into(),
        initrd_path: initrd.display().to_string(),
        kernel_args: "console=ttyS0 quiet".into(),
        ..Default::default()
    }
    .into()
}

/// One root disk, an initrd and a NIC with an RX rate limit.
fn full_config(t: &TestDaemon) -> pb::VmConfig {
    let mut c = t.config(&t.kernel());
    c.boot = boot_config(&t.kernel(), &t.assets().join("initrd.img"));
    c.storage = vec![pb::StorageDevice {
        id: "root".into(),
        path: t.assets().join("rootfs.ext4").display().to_string(),
        is_root_device: true,
        ..Default::default()
    }];
    c.network = vec![pb::NetworkInterface {
        id: "eth0".into(),
        mac_address: "02:00:00:00:00:01".into(),
        tap_device: support::test_tap(t),
        rx_rate_limit: pb::RateLimit { bandwidth: 1_000_000, refill_time: 100, burst: 4096, ..Default::default() }
            .into(),
        ..Default::default()
    }];
    c
}

/// The pre-boot sequence metald sends for `full_config`.
fn expected_configuration(t: &TestDaemon) -> Vec<Value> {
    vec![
        json!({"method": "GET", "path": "/", "body": null}),
        json!({"method": "PUT", "path": "/machine-config", "body": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false}}),
        json!({"method": "PUT", "path": "/boot-source", "body": {
            "kernel_image_path": canon(t.assets().join("vmlinux")),
            "initrd_path": canon(t.assets().join("initrd.img")),
            "boot_args": "console=ttyS0 quiet reboot=k panic=1 metald.stop=reboot"}}),
        json!({"method": "PUT", "path": "/drives/root", "body": {
            "drive_id": "root", "path_on_host": "drive-root", "is_root_device": true, "is_read_only": false}}),
        json!({"method": "PUT", "path": "/network-interfaces/eth0", "body": {
            "iface_id": "eth0", "host_dev_name": support::test_tap(t), "guest_mac": "02:00:00:00:00:01",
            "rx_rate_limiter": {"bandwidth": {"size": 100_000, "one_time_burst": 4096, "refill_time": 100}}}}),
        json!({"method": "GET", "path": "/vm/config", "body": null}),
        json!({"method": "GET", "path": "/", "body": null}),
    ]
}

/// A span seen in this test process: its name and fields, and its
/// ancestors' (nearest first).
#[derive(Clone, Debug)]
struct SpanSeen {
    name: &'static str,
    fields: String,
    ancestors: Vec<(&'static str, String)>,
}

/// Records every span opened in this test process (installed once as the
/// process' subscriber; the tests run in parallel, so each looks for its
/// own VM's spans).
#[derive(Clone, Default)]
struct SpanLog(std::sync::Arc<std::sync::Mutex<Vec<SpanSeen>>>);

/// A span's recorded fields, kept in its registry extensions.
struct Fields(String);

impl<S> tracing_subscriber::Layer<S> for SpanLog
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        use std::fmt::Write as _;
        let mut fields = String::new();
        attrs.record(&mut |f: &tracing::field::Field, v: &dyn std::fmt::Debug| {
            let _ = write!(fields, "{}={v:?} ", f.name());
        });
        let Some(span) = ctx.span(id) else { return };
        let ancestors = span
            .scope()
            .skip(1)
            .map(|a| (a.name(), a.extensions().get::<Fields>().map(|f| f.0.clone()).unwrap_or_default()))
            .collect();
        span.extensions_mut().insert(Fields(fields.clone()));
        self.0.lock().unwrap().push(SpanSeen { name: span.name(), fields, ancestors });
    }
}

fn span_log() -> &'static SpanLog {
    static LOG: std::sync::OnceLock<SpanLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        let log = SpanLog::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(log.clone())).unwrap();
        log
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_sends_the_documented_requests() {
    let (t, _g) = start(&[]).await;
    let c = t.client(TOKEN_A);
    let dir = vm_dir(&t, "fc1");
    let r = create(&t, "fc1", full_config(&t)).await.unwrap();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_CREATED));
    assert_requests(&requests(&dir), &expected_configuration(&t));
    // Logger and metrics on Firecracker's command line (nothing it logs reaches the console);
    // its metrics path is a FIFO metald reads, so no file grows.
    let argv: Vec<String> = serde_json::from_slice(&std::fs::read(dir.join("firecracker.args")).unwrap()).unwrap();
    let fifo = dir.join("metrics.fifo");
    assert_eq!(
        argv[1..].join(" "),
        format!(
            "--api-sock {} --id fc1 --log-path {} --level Warning --show-level --metrics-path {}",
            dir.join("firecracker.sock").display(),
            dir.join("firecracker.log").display(),
            fifo.display()
        )
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()));
    // The drive's name in Firecracker's working directory (the VM's).
    assert_eq!(
        std::fs::read_link(dir.join("drive-root")).unwrap().display().to_string(),
        canon(t.assets().join("rootfs.ext4"))
    );

    let i = info(&t, "fc1").await;
    let bi = &i.backend_info;
    assert_eq!(bi["backend"], "firecracker");
    assert_eq!(bi["firecracker_version"], "1.16.1");
    assert_eq!(bi["api_socket"], dir.join("firecracker.sock").display().to_string());
    let pid: i32 = bi["pid"].parse().unwrap();
    assert!(process_alive(pid));
    let console = PathBuf::from(&bi["console_log"]);

    c.boot_vm(pb::BootVmRequest { vm_id: "fc1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(count_lines(&console, "METALD_GUEST_READY"), 1);
    c.pause_vm(pb::PauseVmRequest { vm_id: "fc1".into(), ..Default::default() }).await.unwrap();
    c.resume_vm(pb::ResumeVmRequest { vm_id: "fc1".into(), ..Default::default() }).await.unwrap();

    // Usage: block/net counters come from FlushMetrics + the metrics file.
    let m = info(&t, "fc1").await.metrics;
    assert!(m.is_set(), "live metrics");
    // Each flush adds 4096 read bytes / 2 reads / 100 rx bytes / 2 tx
    // packets; metering may have flushed more than once.
    let flushes = m.storage_stats.bytes_read / 4096;
    assert!(flushes >= 1 && m.storage_stats.bytes_read % 4096 == 0, "{m:?}");
    assert_eq!(m.storage_stats.read_operations, 2 * flushes);
    assert_eq!((m.network_stats.bytes_received, m.network_stats.packets_transmitted), (100 * flushes, 2 * flushes));
    assert!(m.memory_usage_bytes > 0);
    assert_eq!(std::fs::metadata(&fifo).unwrap().len(), 0, "the lines were read out of the pipe");
    let saved: Value = serde_json::from_slice(&std::fs::read(dir.join("metrics-totals.json")).unwrap()).unwrap();
    assert!(saved["totals"]["block"]["read_bytes"].as_u64().unwrap() >= 4096, "totals kept for a restart: {saved}");

    let r = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: "fc1".into(), timeout_seconds: 5, ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    assert!(!process_alive(pid), "Ctrl+Alt+Del ended Firecracker");
    assert!(!dir.join("firecracker.sock").exists());

    let reqs = requests(&dir);
    assert!(reqs.iter().any(|r| r["body"]["action_type"] == "FlushMetrics"));
    let after: Vec<Value> = without_usage(reqs).split_off(7);
    let want = [
        json!({"method": "PUT", "path": "/actions", "body": {"action_type": "InstanceStart"}}),
        json!({"method": "PATCH", "path": "/vm", "body": {"state": "Paused"}}),
        json!({"method": "PATCH", "path": "/vm", "body": {"state": "Resumed"}}),
        json!({"method": "GET", "path": "/", "body": null}),
        json!({"method": "PUT", "path": "/actions", "body": {"action_type": "SendCtrlAltDel"}}),
    ];
    assert_requests(&after, &want);

    c.delete_vm(pb::DeleteVmRequest { vm_id: "fc1".into(), ..Default::default() }).await.unwrap();
    assert!(!dir.exists());
    assert!(processes_under(t.tmp.path()).is_empty());
}

/// The NICs are configured in the VM's `network` step: a child span of
/// `backend.create` around the `PUT /network-interfaces/{id}` calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_configuration_is_the_network_step_of_create() {
    let log = span_log();
    let (t, _vmm) = start(&[]).await;
    create(&t, "vm-netspan", full_config(&t)).await.unwrap();
    let seen = log.0.lock().unwrap().clone();
    let nic_call = seen
        .iter()
        .find(|s| {
            s.name == "hypervisor.api"
                && s.fields.contains("url.path=/network-interfaces/eth0")
                && s.ancestors.iter().any(|(name, f)| *name == "backend.create" && f.contains("vm_id=vm-netspan"))
        })
        .unwrap_or_else(|| panic!("no NIC call span of vm-netspan in {seen:#?}"));
    let names: Vec<_> = nic_call.ancestors.iter().map(|(name, _)| *name).collect();
    assert_eq!(names[..2], ["network", "backend.create"], "{nic_call:#?}");
    assert!(nic_call.ancestors[0].1.contains("nics=1"), "{nic_call:#?}");
    // The other configuration calls are not part of it.
    let drive = seen
        .iter()
        .find(|s| {
            s.fields.contains("url.path=/drives/root")
                && s.ancestors.iter().any(|(_, f)| f.contains("vm_id=vm-netspan"))
        })
        .unwrap();
    assert_eq!(drive.ancestors[0].0, "backend.create", "{drive:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_restarts_firecracker_with_the_same_configuration() {
    let (t, _g) = start(&[]).await;
    let c = t.client(TOKEN_A);
    let dir = vm_dir(&t, "rb");
    create(&t, "rb", full_config(&t)).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "rb".into(), ..Default::default() }).await.unwrap();
    let first: i32 = info(&t, "rb").await.backend_info["pid"].parse().unwrap();
    let before = without_usage(requests(&dir)).len();

    for (n, force) in [(1, false), (2, true)] {
        let old: i32 = info(&t, "rb").await.backend_info["pid"].parse().unwrap();
        let r = c
            .reboot_vm(pb::RebootVmRequest { vm_id: "rb".into(), force, ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
        let i = info(&t, "rb").await;
        let new: i32 = i.backend_info["pid"].parse().unwrap();
        assert_ne!(new, old, "a new Firecracker process");
        assert!(!process_alive(old));
        assert_eq!(i.backend_info["restarts"], n.to_string());
        assert_eq!(count_lines(&PathBuf::from(&i.backend_info["console_log"]), "METALD_GUEST_READY"), n + 1);
    }
    // The old process's exit must not turn the VM off.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(info(&t, "rb").await.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert_ne!(first, info(&t, "rb").await.backend_info["pid"].parse::<i32>().unwrap());

    // Each restart replays exactly the original configuration, then boots.
    let reqs = without_usage(requests(&dir));
    let config = expected_configuration(&t);
    let boot = json!({"method": "PUT", "path": "/actions", "body": {"action_type": "InstanceStart"}});
    let graceful = calls(&reqs[before..before + 2]);
    assert_eq!(graceful, ["GET /", "PUT /actions"], "Ctrl+Alt+Del first");
    assert_eq!(reqs[before + 1]["body"], json!({"action_type": "SendCtrlAltDel"}));
    let first_restart = &reqs[before + 2..before + 2 + config.len() + 1];
    assert_requests(first_restart, &[config.clone(), vec![boot.clone()]].concat());
    let second_restart = &reqs[before + 2 + config.len() + 1..];
    assert_requests(second_restart, &[config, vec![boot]].concat());
    assert_ne!(first_restart[0]["pid"], second_restart[0]["pid"]);

    c.delete_vm(pb::DeleteVmRequest { vm_id: "rb".into(), force: true, ..Default::default() }).await.unwrap();
    assert!(processes_under(t.tmp.path()).is_empty());
}

/// Firecracker ends when its guest reboots: a reboot the guest starts is
/// one (metald starts it again, the VM stays RUNNING); a guest of metald's
/// that powers off says so on its console first (then reboots, as
/// `metald.stop=reboot` tells it): the VM is SHUTDOWN, a guest power-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reboot_keeps_the_vm_running_and_a_guest_power_off_stops_it() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let (t, _g) = start(&[]).await;
    let c = t.client(TOKEN_A);
    create(&t, "gr", full_config(&t)).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "gr".into(), ..Default::default() }).await.unwrap();
    let first: i32 = info(&t, "gr").await.backend_info["pid"].parse().unwrap();

    kill(Pid::from_raw(first), Signal::SIGUSR1).unwrap();
    wait_until("a new Firecracker", WAIT, || async {
        info(&t, "gr").await.backend_info.get("pid").is_some_and(|p| p != &first.to_string())
    })
    .await;
    let i = info(&t, "gr").await;
    assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert_eq!(i.backend_info["restarts"], "1");
    assert_eq!(count_lines(&PathBuf::from(&i.backend_info["console_log"]), "METALD_GUEST_READY"), 2, "booted again");
    assert!(!process_alive(first));

    let second: i32 = i.backend_info["pid"].parse().unwrap();
    kill(Pid::from_raw(second), Signal::SIGUSR2).unwrap();
    wait_until("SHUTDOWN", WAIT, || async {
        info(&t, "gr").await.state.as_known() == Some(pb::VmState::VM_STATE_SHUTDOWN)
    })
    .await;
    let stop = info(&t, "gr").await.stop.as_option().cloned().expect("a stop reason");
    assert_eq!(stop.reason.as_known(), Some(pb::StopReason::STOP_REASON_GUEST_POWER_OFF), "{stop:?}");
    c.delete_vm(pb::DeleteVmRequest { vm_id: "gr".into(), ..Default::default() }).await.unwrap();
    assert_nothing_left(&t, "gr").await;
}

/// Asserts a failed CreateVm left no VM, directory or process behind.
async fn assert_nothing_left(t: &TestDaemon, id: &str) {
    let c = t.client(TOKEN_A);
    let e = c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(!vm_dir(t, id).exists(), "VM directory removed");
    wait_until("no fake processes", WAIT, || async { processes_under(t.tmp.path()).is_empty() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_become_clear_errors_and_leave_nothing() {
    let (t, _g) = start(&[("FIRECRACKER_API_TIMEOUT_MS", "500")]).await;
    let tmp = t.tmp.path();

    // 400 with fault_message.
    set_control(tmp, Some(json!({"fail": "/drives/root"})));
    let e = create(&t, "f1", full_config(&t)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal, "{e:?}");
    let msg = e.message.clone().unwrap_or_default();
    assert!(msg.contains("firecracker API PUT /drives/root: 400: injected fault at /drives/root"), "{msg}");
    assert_nothing_left(&t, "f1").await;

    // A hanging API call times out.
    set_control(tmp, Some(json!({"hang": "/boot-source"})));
    let started = Instant::now();
    let e = create(&t, "f2", full_config(&t)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{e:?}");
    assert!(e.message.clone().unwrap_or_default().contains("PUT /boot-source: no answer within 500 ms"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "the timeout bounds the call");
    assert_nothing_left(&t, "f2").await;

    // The VMM exits mid-call.
    set_control(tmp, Some(json!({"exit": "/machine-config"})));
    let e = create(&t, "f3", full_config(&t)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal, "{e:?}");
    let msg = e.message.clone().unwrap_or_default();
    assert!(msg.contains("PUT /machine-config") && msg.contains("the Firecracker process exited"), "{msg}");
    assert_nothing_left(&t, "f3").await;

    // After boot: a refused pause keeps the VM running.
    set_control(tmp, None);
    create(&t, "f4", full_config(&t)).await.unwrap();
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: "f4".into(), ..Default::default() }).await.unwrap();
    set_control(tmp, Some(json!({"fail": "/vm"})));
    let e = c.pause_vm(pb::PauseVmRequest { vm_id: "f4".into(), ..Default::default() }).await.unwrap_err();
    assert!(e.message.clone().unwrap_or_default().contains("PATCH /vm: 400: injected fault at /vm"), "{e:?}");
    assert_eq!(info(&t, "f4").await.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));

    // Ctrl+Alt+Del refused: graceful shutdown falls back to SIGKILL.
    set_control(tmp, Some(json!({"fail": "/actions:SendCtrlAltDel"})));
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: "f4".into(), timeout_seconds: 5, ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    c.delete_vm(pb::DeleteVmRequest { vm_id: "f4".into(), ..Default::default() }).await.unwrap();
    assert_nothing_left(&t, "f4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_firecracker_turns_the_vm_off_and_delete_still_works() {
    let (t, _g) = start(&[]).await;
    let c = t.client(TOKEN_A);
    create(&t, "k1", t.config(&t.kernel())).await.unwrap();
    c.boot_vm(pb::BootVmRequest { vm_id: "k1".into(), ..Default::default() }).await.unwrap();
    let pid: i32 = info(&t, "k1").await.backend_info["pid"].parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the VM to be SHUTDOWN", WAIT, || async {
        info(&t, "k1").await.state.as_known() == Some(pb::VmState::VM_STATE_SHUTDOWN)
    })
    .await;
    // Boot from SHUTDOWN starts a fresh Firecracker.
    c.boot_vm(pb::BootVmRequest { vm_id: "k1".into(), ..Default::default() }).await.unwrap();
    assert_ne!(info(&t, "k1").await.backend_info["pid"].parse::<i32>().unwrap(), pid);
    c.delete_vm(pb::DeleteVmRequest { vm_id: "k1".into(), force: true, ..Default::default() }).await.unwrap();
    assert_nothing_left(&t, "k1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_format_and_unsupported_devices_are_refused_at_create() {
    let (t, _g) = start(&[]).await;
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(t.assets().join("bzImage"), bz).unwrap();
    let e = create(&t, "bz", t.config(&t.assets().join("bzImage").display().to_string())).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let msg = e.message.unwrap_or_default();
    assert!(msg.contains("is a bzImage") && msg.contains("ELF vmlinux"), "{msg}");

    let mut c = t.config(&t.kernel());
    c.network = vec![pb::NetworkInterface { id: "eth0".into(), ..Default::default() }];
    // No tap_device: a managed NIC, refused while host networking is off
    // (as the test daemons run it), saying how to fix it.
    let e = create(&t, "notap", c).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    let msg = e.message.unwrap_or_default();
    assert!(msg.contains("tap_device") && msg.contains("UNKEY_METALD_NETWORK_ENABLED"), "{msg}");

    // A TAP device that does not exist is not created behind the operator's back.
    let mut c = full_config(&t);
    c.network[0].tap_device = "mt-no-such-dev".into();
    let e = create(&t, "ghosttap", c).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let msg = e.message.unwrap_or_default();
    assert!(msg.contains("config.network[0].tap_device") && msg.contains("\"mt-no-such-dev\" does not exist"), "{msg}");
    assert!(!std::path::Path::new("/sys/class/net/mt-no-such-dev").exists());
    assert!(!vm_dir(&t, "ghosttap").exists());
    assert!(processes_under(t.tmp.path()).is_empty(), "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailer_gets_its_arguments_and_a_chroot_with_only_this_vms_files() {
    let probe = tempfile::NamedTempFile::new().unwrap();
    let root_user = probe.as_file().metadata().unwrap().uid() == 0;
    let (uid, gid) = if root_user { ("1234", "1235") } else { ("0", "0") };
    let tmp_jail = tempfile::tempdir().unwrap();
    let jail_base = tmp_jail.path().join("jail");
    let netns = tmp_jail.path().join("netns-jl");
    std::fs::write(&netns, b"").unwrap();
    let netns_template = tmp_jail.path().join("netns-{vm_id}").display().to_string();
    let base = jail_base.display().to_string();
    let (t, _g) = start(&[
        ("JAILER_ENABLED", "true"),
        ("JAILER_BINARY", FAKE_JAILER),
        ("JAILER_UID", uid),
        ("JAILER_GID", gid),
        ("JAILER_CHROOT_DIR", &base),
        ("JAILER_NETNS", &netns_template),
    ])
    .await;
    let _g2 = KillOnDrop(tmp_jail.path().to_path_buf());
    let c = t.client(TOKEN_A);
    // A writable disk of the operator's must already be the jail's to write: metald never
    // changes an asset's owner or mode. One that is not is refused, unchanged.
    std::fs::copy(t.assets().join("rootfs.ext4"), t.assets().join("jl.ext4")).unwrap();
    if root_user {
        std::fs::write(tmp_jail.path().join("netns-ro"), b"").unwrap();
        std::fs::copy(t.assets().join("rootfs.ext4"), t.assets().join("root-only.ext4")).unwrap();
        let mut config = full_config(&t);
        config.storage[0].path = t.assets().join("root-only.ext4").display().to_string();
        config.network.clear();
        let e = create(&t, "ro", config).await.unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::InvalidArgument, "{e:?}");
        assert!(e.message.as_deref().unwrap_or("").contains("UNKEY_METALD_JAILER_UID"), "{e:?}");
        let m = std::fs::metadata(t.assets().join("root-only.ext4")).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "the refused asset keeps its owner");
        assert!(!vm_dir(&t, "ro").exists(), "a refused create leaves no VM directory");
        assert!(!jail_base.join("metald-fake-firecracker").join("ro").exists(), "nor a jail");
        std::os::unix::fs::chown(t.assets().join("jl.ext4"), Some(1234), Some(1235)).unwrap();
    }
    let mut config = full_config(&t);
    config.storage[0].path = t.assets().join("jl.ext4").display().to_string();
    config.network.clear();
    create(&t, "jl", config).await.unwrap();

    let exec = std::fs::canonicalize(FAKE_FC).unwrap();
    let vm_jail = jail_base.join("metald-fake-firecracker").join("jl");
    let root = vm_jail.join("root");
    let args: Value = serde_json::from_slice(&std::fs::read(vm_jail.join("jailer-args.json")).unwrap()).unwrap();
    let argv: Vec<String> = serde_json::from_value(args["argv"].clone()).unwrap();
    let want = format!(
        "--id jl --exec-file {} --uid {uid} --gid {gid} --chroot-base-dir {base} --netns {} --cgroup-version 1 \
         --cgroup cpu.cfs_quota_us=100000 --cgroup memory.limit_in_bytes={} -- --api-sock /firecracker.sock \
         --log-path /firecracker.log --level Warning --show-level --metrics-path /metrics.fifo",
        exec.display(),
        netns.display(),
        (128u64 << 20) + (128 << 20)
    );
    assert_eq!(argv.join(" "), want);

    // Only this VM's files, linked into the jail.
    let mut names: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "drive-root",
            "fake-requests.jsonl",
            "firecracker.log",
            "firecracker.sock",
            "initrd",
            "metrics.fifo",
            "vmlinux"
        ]
    );
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(root.join("vmlinux")), ino(t.assets().join("vmlinux")), "hard link, not a copy");
    assert_eq!(ino(root.join("drive-root")), ino(t.assets().join("jl.ext4")));
    if root_user {
        let m = std::fs::metadata(root.join("drive-root")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 1235), "the operator made the writable disk the jail user's");
        let k = std::fs::metadata(root.join("vmlinux")).unwrap();
        assert_eq!(k.uid(), 0, "a shared read-only asset keeps its owner");
    }

    // API paths are relative to the jail.
    let reqs = requests(&root);
    let body = |path: &str| reqs.iter().find(|r| r["path"] == path).unwrap()["body"].clone();
    assert_eq!(body("/boot-source")["kernel_image_path"], "/vmlinux");
    assert_eq!(body("/boot-source")["initrd_path"], "/initrd");
    assert_eq!(body("/drives/root")["path_on_host"], "/drive-root");
    assert!(reqs.iter().all(|r| r["path"] != "/logger" && r["path"] != "/metrics"), "on the command line");

    c.boot_vm(pb::BootVmRequest { vm_id: "jl".into(), ..Default::default() }).await.unwrap();
    let i = info(&t, "jl").await;
    assert_eq!(i.backend_info["jail_root"], root.display().to_string());
    assert_eq!(count_lines(&PathBuf::from(&i.backend_info["console_log"]), "METALD_GUEST_READY"), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", i.backend_info["pid"])).unwrap();
    assert!(cmdline.windows(6).any(|w| w == b"--id=j"), "jailer exec'd Firecracker in place (same pid)");

    // Reboot rebuilds the jail and jails the new process the same way.
    c.reboot_vm(pb::RebootVmRequest { vm_id: "jl".into(), force: true, ..Default::default() }).await.unwrap();
    let i = info(&t, "jl").await;
    assert_eq!(count_lines(&PathBuf::from(&i.backend_info["console_log"]), "METALD_GUEST_READY"), 2);
    let again: Value = serde_json::from_slice(&std::fs::read(vm_jail.join("jailer-args.json")).unwrap()).unwrap();
    assert_eq!(again["argv"], args["argv"]);
    assert!(root.join("vmlinux").exists() && root.join("drive-root").exists());

    // A restarted metald finds the jailed Firecracker again (by `--id=<vm id>`).
    let pid = i.backend_info["pid"].clone();
    let mut t = t;
    t.restart().await;
    let c = t.client(TOKEN_A);
    let i = info(&t, "jl").await;
    assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert_eq!(i.backend_info["pid"], pid);

    c.delete_vm(pb::DeleteVmRequest { vm_id: "jl".into(), force: true, ..Default::default() }).await.unwrap();
    assert!(!vm_jail.exists(), "jail removed on delete");
    assert!(t.assets().join("jl.ext4").exists() && t.assets().join("vmlinux").exists(), "originals stay");
    assert!(processes_under(tmp_jail.path()).is_empty() && processes_under(t.tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_backend_version_and_kvm() {
    let (t, _g) = start(&[]).await;
    let (status, h) = http_get(&t.d().addr, "/_/health").await;
    assert!(status.contains("200"), "{status} {h}");
    assert_eq!(h["backend"], "firecracker");
    assert_eq!(h["backend_version"], "Firecracker v1.16.1 (metald fake)");
    assert_eq!(h["kvm"], Path::new("/dev/kvm").exists() && metald::backend::host::kvm_available());
}

/// Firecracker's ordering rules, enforced the same by the fake (so metald's
/// request order is really checked) and the real v1.16.1.
async fn check_ordering_rules(binary: &str) {
    use metald::backend::firecracker::api::fault_message;
    use metald::backend::uds_http::UdsClient;
    let tmp = tempfile::tempdir().unwrap();
    let _g = KillOnDrop(tmp.path().to_path_buf());
    let sock = tmp.path().join("fc.sock");
    let mut child = std::process::Command::new(binary)
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "order"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("socket", WAIT, || async { sock.exists() }).await;
    let c = UdsClient::new(&sock, "firecracker", Duration::from_secs(5), fault_message);
    wait_until("GET /", WAIT, || async { c.get::<Value>("/").await.is_ok() }).await;
    let err = |e: metald::backend::uds_http::ApiError| (e.status(), e.to_string());

    let (s, m) = err(c.patch("/vm", &json!({"state": "Paused"})).await.unwrap_err());
    assert_eq!(s, Some(400));
    assert!(m.contains("not supported before starting the microVM"), "{m}");
    let (s, m) = err(c.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap_err());
    assert_eq!(s, Some(400));
    assert!(m.contains("without kernel configuration"), "{m}");
    let (_, m) =
        err(c.put("/machine-config", &json!({"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1})).await.unwrap_err());
    assert!(m.contains("unknown field `bogus`"), "{m}");
    let (_, m) = err(c.put("/drives/a", &json!({"drive_id": "b", "is_root_device": false})).await.unwrap_err());
    assert!(m.contains("does not match"), "{m}");

    let kernel = tmp.path().join("vmlinux");
    support::halting_kernel(&kernel);
    c.put("/boot-source", &json!({"kernel_image_path": kernel})).await.unwrap();
    c.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap();
    let (s, m) = err(c.put("/machine-config", &json!({"vcpu_count": 2, "mem_size_mib": 64})).await.unwrap_err());
    assert_eq!(s, Some(400));
    assert!(m.contains("not supported after starting the microVM"), "{m}");
    c.patch("/vm", &json!({"state": "Paused"})).await.unwrap();
    let state: Value = c.get("/").await.unwrap();
    assert_eq!(state["state"], "Paused");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_firecracker_enforces_the_api_ordering_rules() {
    check_ordering_rules(FAKE_FC).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firecracker_has_the_same_api_ordering_rules() {
    let Some(fc) = support::real_hypervisor("firecracker") else { return };
    check_ordering_rules(fc.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_vms_survive_a_daemon_restart() {
    let (mut t, _g) = start(&[]).await;
    create(&t, "rs", full_config(&t)).await.unwrap();
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: "rs".into(), ..Default::default() }).await.unwrap();
    let pid: i32 = info(&t, "rs").await.backend_info["pid"].parse().unwrap();
    t.restart().await;
    let c = t.client(TOKEN_A);
    let i = info(&t, "rs").await;
    assert_eq!(i.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    assert_eq!(i.backend_info["pid"], pid.to_string(), "reattached to the same Firecracker");
    c.pause_vm(pb::PauseVmRequest { vm_id: "rs".into(), ..Default::default() }).await.unwrap();
    // A process found again (not our child) is still watched for its exit.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the VM to be SHUTDOWN", WAIT, || async {
        info(&t, "rs").await.state.as_known() == Some(pb::VmState::VM_STATE_SHUTDOWN)
    })
    .await;
    c.delete_vm(pb::DeleteVmRequest { vm_id: "rs".into(), ..Default::default() }).await.unwrap();
    assert_nothing_left(&t, "rs").await;
}

/// A frozen Firecracker (SIGSTOP) during pause and during resume: each call
/// times out, takes effect once the process runs again, and metald ends
/// with the state Firecracker reports (asked until it answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_firecracker_ends_with_the_state_it_reports() {
    use nix::sys::signal::{Signal, kill};
    let (t, _g) = start(&[("FIRECRACKER_API_TIMEOUT_MS", "500")]).await;
    create(&t, "ice", full_config(&t)).await.unwrap();
    let c = t.client(TOKEN_A);
    c.boot_vm(pb::BootVmRequest { vm_id: "ice".into(), ..Default::default() }).await.unwrap();
    let pid = nix::unistd::Pid::from_raw(info(&t, "ice").await.backend_info["pid"].parse().unwrap());
    for (want, call) in [(pb::VmState::VM_STATE_PAUSED, "pause"), (pb::VmState::VM_STATE_RUNNING, "resume")] {
        kill(pid, Signal::SIGSTOP).unwrap();
        let e = match call {
            "pause" => c.pause_vm(pb::PauseVmRequest { vm_id: "ice".into(), ..Default::default() }).await.map(|_| ()),
            _ => c.resume_vm(pb::ResumeVmRequest { vm_id: "ice".into(), ..Default::default() }).await.map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{call}: {e:?}");
        assert!(info(&t, "ice").await.state_reconciling, "{call}: unconfirmed while frozen");
        kill(pid, Signal::SIGCONT).unwrap();
        wait_until(&format!("{want:?} after {call}"), WAIT, || async {
            let i = info(&t, "ice").await;
            i.state.as_known() == Some(want) && !i.state_reconciling
        })
        .await;
    }
    c.delete_vm(pb::DeleteVmRequest { vm_id: "ice".into(), force: true, ..Default::default() }).await.unwrap();
    assert_nothing_left(&t, "ice").await;
}
