//! End-to-end tests against real guests: metald in-process with the QEMU
//! backend under TCG, driven through the generated Connect client, booting
//! the guest image of `scripts/guest-image.sh` (built on first use and
//! cached in `target/guest-image`, or `METALD_GUEST_IMAGE_DIR`).
//!
//! The guest's init prints `METALD_GUEST_READY`, then `METALD_TICK <n>`
//! every second, and `METALD_GUEST_POWEROFF` before it powers off; the tests
//! read those markers from the console log named in `backend_info`.
//! Waits are generous (TCG on a loaded 2-core machine); every QEMU process
//! a test started is killed when the test ends, pass or fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::Config;
use metald::daemon::Daemon;
use metald::pb::vmprovisioner::v1 as pb;
use support::{
    console_text, count_lines, guest_image, kill_processes_under, metald_env, proc_entry_exists, wait_until,
};

const TOKEN: &str = "dev_customer_acme";
/// Upper bound for a guest to boot under TCG with other guests running.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound for metald to notice a VMM exit (the goal is < 1 s).
const EXIT_NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

/// One metald with the QEMU backend on a temp data dir.
struct Env {
    daemon: Option<Daemon>,
    env: HashMap<String, String>,
    tmp: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(d) = &self.daemon {
            d.shutdown();
        }
        kill_processes_under(self.tmp.path());
    }
}

impl Env {
    async fn start() -> Env {
        Env::start_with(&[]).await
    }

    /// [`Env::start`] with `extra` settings (names without the prefix).
    async fn start_with(extra: &[(&str, String)]) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let image = guest_image();
        let tmp = tempfile::Builder::new().prefix("metald-e2e-").tempdir().unwrap();
        let assets = tmp.path().join("assets");
        std::fs::create_dir_all(&assets).unwrap();
        let env = metald_env([
            ("BACKEND", "qemu".to_owned()),
            ("QEMU_ACCEL", "tcg".to_owned()),
            ("AUTH_DEV_TOKENS", "true".to_owned()),
            ("ADDRESS", "127.0.0.1".to_owned()),
            ("PORT", "0".to_owned()),
            ("DATA_DIR", tmp.path().join("data").display().to_string()),
            ("ASSET_DIRS", format!("{}:{}", assets.display(), image.display())),
            ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ]);
        let mut env = env;
        env.extend(metald_env(extra.iter().map(|(k, v)| (*k, v.clone()))));
        let daemon = metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap();
        Env { daemon: Some(daemon), env, tmp }
    }

    fn client(&self) -> VmClient {
        let addr = self.daemon.as_ref().unwrap().addr;
        vm_client(&format!("http://{addr}"), TOKEN, WireProtocol::ConnectProto, Duration::from_secs(120)).unwrap()
    }

    /// Stops metald gracefully (its VMs keep running) and starts a new one
    /// on the same data directory.
    async fn restart(&mut self) {
        let d = self.daemon.take().unwrap();
        d.shutdown();
        d.wait().await.unwrap();
        let cfg = Config::from_source(&self.env).unwrap();
        self.daemon = Some(metald::daemon::start(cfg).await.unwrap());
    }

    /// A private writable copy of the ext4 root filesystem.
    fn rootfs_copy(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join("assets").join(name);
        std::fs::copy(guest_image().join("rootfs.ext4"), &p).unwrap();
        p
    }
}

fn config(kernel: &str, kernel_args: &str) -> pb::VmConfig {
    config_at(&guest_image().join(kernel), kernel_args)
}

fn config_at(kernel: &Path, kernel_args: &str) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: kernel.display().to_string(),
            initrd_path: guest_image().join("initramfs.cpio.gz").display().to_string(),
            kernel_args: kernel_args.into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

/// A VM seen through the API.
struct Vm<'a> {
    c: &'a VmClient,
    id: String,
}

impl<'a> Vm<'a> {
    async fn create(c: &'a VmClient, id: &str, config: pb::VmConfig) -> Vm<'a> {
        let r = c
            .create_vm(pb::CreateVmRequest { vm_id: id.into(), config: config.into(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e:?}"))
            .into_owned();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_CREATED));
        Vm { c, id: id.into() }
    }

    async fn info(&self) -> pb::GetVmInfoResponse {
        self.c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: self.id.clone(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("info {}: {e:?}", self.id))
            .into_owned()
    }

    async fn state(&self) -> pb::VmState {
        self.info().await.state.as_known().unwrap()
    }

    async fn backend(&self, key: &str) -> String {
        self.info().await.backend_info.get(key).cloned().unwrap_or_else(|| panic!("no backend_info[{key}]"))
    }

    async fn pid(&self) -> i32 {
        self.backend("pid").await.parse().unwrap()
    }

    async fn boot(&self) {
        let r = self.c.boot_vm(pb::BootVmRequest { vm_id: self.id.clone(), ..Default::default() }).await;
        let r = r.unwrap_or_else(|e| panic!("boot {}: {e:?}", self.id)).into_owned();
        assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    }

    async fn pause(&self) {
        let r = self.c.pause_vm(pb::PauseVmRequest { vm_id: self.id.clone(), ..Default::default() }).await;
        assert_eq!(r.unwrap().into_owned().state.as_known(), Some(pb::VmState::VM_STATE_PAUSED));
    }

    async fn resume(&self) {
        let r = self.c.resume_vm(pb::ResumeVmRequest { vm_id: self.id.clone(), ..Default::default() }).await;
        assert_eq!(r.unwrap().into_owned().state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    }

    async fn delete_force(&self) {
        let r =
            self.c.delete_vm(pb::DeleteVmRequest { vm_id: self.id.clone(), force: true, ..Default::default() }).await;
        assert!(r.unwrap().into_owned().success);
    }

    async fn console(&self) -> Console {
        Console(PathBuf::from(self.backend("console_log").await))
    }

    async fn wait_state(&self, want: pb::VmState, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_until(&format!("{} to be {want:?}", self.id), timeout, || async { self.state().await == want }).await;
        start.elapsed()
    }
}

/// The guest's serial console log.
struct Console(PathBuf);

impl Console {
    fn text(&self) -> String {
        console_text(&self.0)
    }

    fn count(&self, marker: &str) -> usize {
        count_lines(&self.0, marker)
    }

    fn last_tick(&self) -> Option<u64> {
        self.text().lines().filter_map(|l| l.trim().strip_prefix("METALD_TICK ")?.parse().ok()).next_back()
    }

    async fn wait_count(&self, marker: &str, n: usize, timeout: Duration) {
        wait_until(&format!("{marker} x{n} in {}", self.0.display()), timeout, || async { self.count(marker) >= n })
            .await;
    }

    /// Waits for a tick newer than `after` and returns it.
    async fn wait_tick_after(&self, after: Option<u64>, timeout: Duration) -> u64 {
        wait_until("a new METALD_TICK", timeout, || async { self.last_tick() > after }).await;
        self.last_tick().unwrap()
    }
}

async fn wait_process_gone(pid: i32) {
    wait_until(&format!("process {pid} to be gone"), Duration::from_secs(10), || async { !proc_entry_exists(pid) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_of_a_real_guest() {
    let env = Env::start().await;
    let c = env.client();
    let vm = Vm::create(&c, "life", config("vmlinux", "quiet")).await;
    let console = vm.console().await;
    let socket = PathBuf::from(vm.backend("api_socket").await);
    let info = vm.info().await;
    assert_eq!(info.backend_info.get("backend").map(String::as_str), Some("qemu"));
    assert_eq!(info.backend_info.get("accel").map(String::as_str), Some("tcg"));
    let first_pid = vm.pid().await;
    assert!(proc_entry_exists(first_pid));

    // Boot.
    vm.boot().await;
    console.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
    let m = vm.info().await.metrics;
    assert!(m.is_set() && m.memory_usage_bytes > 0, "live metrics of a running guest: {m:?}");

    // Pause: the guest makes no progress.
    let tick = console.wait_tick_after(None, BOOT_TIMEOUT).await;
    vm.pause().await;
    let frozen = console.last_tick();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(console.last_tick(), frozen, "ticks advanced while paused");
    assert!(frozen >= Some(tick));

    // Resume: it advances again.
    vm.resume().await;
    console.wait_tick_after(frozen, Duration::from_secs(30)).await;

    // Reboot: the guest comes up a second time in the same QEMU.
    let r = c.reboot_vm(pb::RebootVmRequest { vm_id: vm.id.clone(), ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    console.wait_count("METALD_GUEST_READY", 2, BOOT_TIMEOUT).await;
    assert_eq!(vm.pid().await, first_pid);

    // Graceful shutdown: clean power-off, no QEMU left.
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: vm.id.clone(), timeout_seconds: 60, ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    assert_eq!(console.count("METALD_GUEST_POWEROFF"), 1, "{}", console.text());
    wait_process_gone(first_pid).await;
    assert!(!socket.exists(), "QMP socket left behind");

    // Boot again: a new QEMU process.
    vm.boot().await;
    console.wait_count("METALD_GUEST_READY", 3, BOOT_TIMEOUT).await;
    let second_pid = vm.pid().await;
    assert_ne!(second_pid, first_pid);

    // Delete with force: process, socket and files gone.
    let dir = socket.parent().unwrap().to_path_buf();
    vm.delete_force().await;
    wait_process_gone(second_pid).await;
    assert!(!dir.exists(), "VM directory {} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_and_killed_vmm_become_shutdown() {
    let env = Env::start().await;
    let c = env.client();
    let selfoff = Vm::create(&c, "selfoff", config("vmlinux", "quiet metald.poweroff_after=3")).await;
    let victim = Vm::create(&c, "victim", config("vmlinux", "quiet")).await;
    let (off_console, victim_console) = (selfoff.console().await, victim.console().await);
    let off_pid = selfoff.pid().await;
    selfoff.boot().await;
    victim.boot().await;

    // The guest powers itself off: QEMU exits, metald notices.
    off_console.wait_count("METALD_GUEST_POWEROFF", 1, BOOT_TIMEOUT).await;
    let took = selfoff.wait_state(pb::VmState::VM_STATE_SHUTDOWN, EXIT_NOTICE_TIMEOUT).await;
    eprintln!("guest power-off noticed {took:?} after the marker was seen");
    wait_process_gone(off_pid).await;
    let stop = selfoff.info().await.stop.as_option().cloned().expect("a stop reason");
    assert_eq!(stop.reason.as_known(), Some(pb::StopReason::STOP_REASON_GUEST_POWER_OFF), "{stop:?}");

    // SIGKILL of the QEMU process: metald notices and cleans up.
    victim_console.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
    let pid = victim.pid().await;
    let socket = PathBuf::from(victim.backend("api_socket").await);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let took = victim.wait_state(pb::VmState::VM_STATE_SHUTDOWN, EXIT_NOTICE_TIMEOUT).await;
    eprintln!("kill -9 noticed within {took:?}");
    wait_process_gone(pid).await;
    assert!(!socket.exists(), "QMP socket of a killed VMM left behind");
    let stop = victim.info().await.stop.as_option().cloned().expect("a stop reason");
    assert_eq!(stop.reason.as_known(), Some(pb::StopReason::STOP_REASON_KILLED), "{stop:?}");
    assert!(stop.detail.contains("SIGKILL"), "{stop:?}");

    // Both can be deleted (nothing to kill any more).
    selfoff.delete_force().await;
    victim.delete_force().await;

    // The guest side of Firecracker's metald.stop=reboot, on QEMU (which resets in place on a
    // guest reboot): the test guest powering off prints its marker and then reboots — it
    // boots again, and the VM stays RUNNING in the same QEMU.
    let rebooter =
        Vm::create(&c, "rebooter", config("vmlinux", "quiet metald.stop=reboot metald.poweroff_after=2")).await;
    let console = rebooter.console().await;
    let pid = rebooter.pid().await;
    rebooter.boot().await;
    console.wait_count("METALD_GUEST_POWEROFF", 1, BOOT_TIMEOUT).await;
    console.wait_count("METALD_GUEST_READY", 2, BOOT_TIMEOUT).await;
    assert_eq!(rebooter.state().await, pb::VmState::VM_STATE_RUNNING);
    assert_eq!(rebooter.pid().await, pid, "a reboot, not a power-off");
    rebooter.delete_force().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_guests_at_once_one_on_an_ext4_root() {
    let env = Env::start().await;
    let c = env.client();
    let mut rooted = config("bzImage", "quiet");
    rooted.storage.push(pb::StorageDevice {
        id: "root".into(),
        path: env.rootfs_copy("root.ext4").display().to_string(),
        is_root_device: true,
        ..Default::default()
    });
    let vms = [
        Vm::create(&c, "one", config("vmlinux", "quiet")).await,
        Vm::create(&c, "two", config("bzImage", "quiet")).await,
        Vm::create(&c, "rooted", rooted).await,
    ];
    for vm in &vms {
        vm.boot().await;
    }
    for vm in &vms {
        vm.console().await.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
        assert_eq!(vm.state().await, pb::VmState::VM_STATE_RUNNING);
    }
    let root_console = vms[2].console().await;
    assert_eq!(root_console.count("METALD_GUEST_ROOT=ext4"), 1, "{}", root_console.text());
    assert_eq!(vms[0].console().await.count("METALD_GUEST_ROOT=initramfs"), 1);
    // Disk counters come from QMP query-blockstats.
    let m = vms[2].info().await.metrics;
    assert!(m.storage_stats.bytes_read > 0, "disk reads of the ext4 guest: {m:?}");
    let pids = [vms[0].pid().await, vms[1].pid().await, vms[2].pid().await];

    // Forced shutdown (QMP `quit`) of one of them.
    let two_console = vms[1].console().await;
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest { vm_id: "two".into(), force: true, ..Default::default() })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    wait_process_gone(pids[1]).await;
    assert_eq!(two_console.count("METALD_GUEST_POWEROFF"), 0, "a forced stop is not a clean power-off");

    for vm in &vms {
        vm.delete_force().await;
    }
    for pid in pids {
        wait_process_gone(pid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_qemu_start_is_reported_and_leaves_nothing() {
    let env = Env::start().await;
    let c = env.client();
    let bad = env.tmp.path().join("assets/broken-vmlinux");
    std::fs::write(&bad, b"\x7fELF but not a kernel").unwrap();
    let cfg = config_at(&bad, "");
    let e = c
        .create_vm(pb::CreateVmRequest { vm_id: "broken".into(), config: cfg.into(), ..Default::default() })
        .await
        .expect_err("QEMU cannot load this kernel");
    let msg = e.message.clone().unwrap_or_default();
    assert!(msg.contains("Error while loading elf kernel"), "QEMU's own words reach the caller: {e:?}");
    let e = c.get_vm_info(pb::GetVmInfoRequest { vm_id: "broken".into(), ..Default::default() }).await;
    assert_eq!(e.expect_err("no record").code, connectrpc::ErrorCode::NotFound);
    assert!(!env.tmp.path().join("data/vms/broken").exists());
    assert_eq!(kill_processes_under(env.tmp.path()), 0, "no QEMU left running");

    // A file that is no kernel at all is refused before QEMU starts.
    let text = env.tmp.path().join("assets/readme");
    std::fs::write(&text, b"hello").unwrap();
    let cfg = config_at(&text, "");
    let e = c
        .create_vm(pb::CreateVmRequest { vm_id: "text".into(), config: cfg.into(), ..Default::default() })
        .await
        .expect_err("not a kernel");
    assert_eq!(e.code, connectrpc::ErrorCode::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_survive_a_daemon_restart() {
    let mut env = Env::start().await;
    let id = "survivor";
    let (pid, console) = {
        let c = env.client();
        let vm = Vm::create(&c, id, config("vmlinux", "quiet")).await;
        vm.boot().await;
        let console = vm.console().await;
        console.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
        (vm.pid().await, console)
    };

    env.restart().await;
    assert!(proc_entry_exists(pid), "the guest must outlive metald");
    let c = env.client();
    let vm = Vm { c: &c, id: id.into() };
    assert_eq!(vm.state().await, pb::VmState::VM_STATE_RUNNING);
    assert_eq!(vm.pid().await, pid);

    // QMP works through the new daemon.
    let before = console.wait_tick_after(console.last_tick(), Duration::from_secs(30)).await;
    vm.pause().await;
    let frozen = console.last_tick();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(console.last_tick(), frozen);
    assert!(frozen >= Some(before));
    vm.resume().await;
    console.wait_tick_after(frozen, Duration::from_secs(30)).await;

    // The reattached process is watched too (by polling /proc: it is no
    // longer a child of this daemon's backend).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    vm.wait_state(pb::VmState::VM_STATE_SHUTDOWN, EXIT_NOTICE_TIMEOUT).await;
    vm.delete_force().await;
}

/// `UNKEY_METALD_QEMU_ACCEL=auto` runs a KVM probe guest. Where KVM works it
/// must reach userspace; where it does not (these CI machines: nested KVM
/// dies with "KVM internal error") the decision must fall back to TCG and
/// say why. Either way the reason is explained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_is_decided_by_a_probe_guest() {
    use metald::backend::qemu::accel::decide;
    use metald::backend::qemu::cmdline::Accel;
    use metald::backend::qemu::config::{AccelChoice, QemuSettings};

    let tmp = tempfile::tempdir().unwrap();
    let settings = QemuSettings { accel: AccelChoice::Auto, probe_timeout_secs: 30, ..Default::default() };
    let qemu = metald::backend::process::resolve_binary(&settings.binary).expect("qemu-system-x86_64");
    let started = Instant::now();
    let d = decide(&settings, &qemu, &[guest_image().to_path_buf()], tmp.path()).await;
    eprintln!("auto accel: {} in {:?}: {}", d.accel.name(), started.elapsed(), d.reason);
    match d.accel {
        Accel::Kvm => assert!(d.reason.contains("reached userspace"), "{}", d.reason),
        Accel::Tcg { tsc_khz, .. } => {
            assert!(!d.reason.is_empty());
            assert!(tsc_khz.is_some(), "TCG guests need tsc_early_khz");
        }
    }
    assert!(!tmp.path().join("kvm-probe").exists(), "probe files are removed");
    assert_eq!(kill_processes_under(tmp.path()), 0, "probe QEMU is gone");

    // A probe runs once per host boot: the next start (same data directory, boot, QEMU and
    // kernel) takes the kept outcome and starts no QEMU.
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
        let kept = tmp.path().join(metald::backend::qemu::accel::PROBE_CACHE);
        assert!(kept.is_file(), "the probe's outcome is kept");
        let again = decide(&settings, &qemu, &[guest_image().to_path_buf()], tmp.path()).await;
        assert_eq!(again.accel.name(), d.accel.name());
        assert!(again.reason.contains("earlier in this host boot"), "{}", again.reason);
        assert!(again.reason.starts_with(&d.reason), "{} / {}", again.reason, d.reason);
        assert!(!tmp.path().join("kvm-probe").exists(), "no probe guest this time");
        // Another boot id (e.g. after a host reboot) is not this one's: the record is not used.
        let raw = std::fs::read_to_string(&kept).unwrap();
        std::fs::write(&kept, raw.replacen("boot=", "boot=another-", 1)).unwrap();
        let quick = QemuSettings { probe_timeout_secs: 2, ..settings.clone() };
        let fresh = decide(&quick, &qemu, &[guest_image().to_path_buf()], tmp.path()).await;
        assert!(!fresh.reason.contains("earlier in this host boot"), "{}", fresh.reason);
        assert_eq!(kill_processes_under(tmp.path()), 0, "probe QEMU is gone");
    }
}

/// The KVM probe runs in the background: the API answers while it runs
/// (health says the accelerator is being decided), and a VM created then
/// waits for the decision and runs. The probe guest here is a kernel that
/// only halts, so where `/dev/kvm` opens the probe takes its whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kvm_probe_never_delays_the_api() {
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = probe_dir.path().join("halt.elf");
    support::halting_kernel(&probe);
    let env = Env::start_with(&[
        ("QEMU_ACCEL", "auto".to_owned()),
        ("QEMU_PROBE_KERNEL", probe.display().to_string()),
        ("QEMU_PROBE_TIMEOUT_SECONDS", "8".to_owned()),
    ])
    .await;
    let addr = env.daemon.as_ref().unwrap().addr;
    let (status, h) = support::http_get(&addr, "/_/health").await;
    assert!(status.contains("200"), "{status} {h}");
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
        let detail = h["backend_detail"].as_str().unwrap_or_default();
        assert!(detail.contains("deciding"), "the API is up while the probe runs: {h}");
    } else {
        eprintln!("note: /dev/kvm does not open here; the decision is immediate (TCG)");
    }
    let c = env.client();
    let vm = Vm::create(&c, "early", config("vmlinux", "quiet")).await;
    let console = vm.console().await;
    vm.boot().await;
    console.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
    let i = vm.info().await;
    assert_eq!(i.backend_info["accel"], "tcg", "the halting probe never proves KVM: {:?}", i.backend_info);
    assert!(!i.backend_info["accel_reason"].is_empty());
    let (_, h) = support::http_get(&addr, "/_/health").await;
    assert!(h["backend_detail"].as_str().unwrap_or_default().contains("accel tcg"), "{h}");
    vm.delete_force().await;
}

/// A frozen QEMU (SIGSTOP) during pause: the QMP `stop` times out, then takes
/// effect when QEMU runs again; metald asks QEMU until it answers and ends
/// with the guest's real state (PAUSED), so resume is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_qemu_during_pause_ends_with_the_guests_state() {
    use nix::sys::signal::{Signal, kill};
    let env = Env::start().await;
    let c = env.client();
    let vm = Vm::create(&c, "frozen", config("vmlinux", "quiet")).await;
    let console = vm.console().await;
    vm.boot().await;
    console.wait_count("METALD_GUEST_READY", 1, BOOT_TIMEOUT).await;
    let pid = nix::unistd::Pid::from_raw(vm.pid().await);
    kill(pid, Signal::SIGSTOP).unwrap();
    let e = c.pause_vm(pb::PauseVmRequest { vm_id: "frozen".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code, connectrpc::ErrorCode::DeadlineExceeded, "{e:?}");
    let info = vm.info().await;
    assert!(info.state_reconciling, "the state is unconfirmed while QEMU is frozen");
    kill(pid, Signal::SIGCONT).unwrap();
    wait_until("the paused state to be confirmed", Duration::from_secs(60), || async {
        let i = vm.info().await;
        i.state.as_known() == Some(pb::VmState::VM_STATE_PAUSED) && !i.state_reconciling
    })
    .await;
    let ticks = console.last_tick();
    vm.resume().await;
    console.wait_tick_after(ticks, BOOT_TIMEOUT).await;
    vm.delete_force().await;
}

/// `StreamConsole` with follow from before the boot: the real guest's
/// serial console arrives over the API (the boot marker and then a tick),
/// and the stream ends when the VM is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_streams_a_real_guests_boot() {
    let env = Env::start().await;
    let c = env.client();
    let vm = Vm::create(&c, "console", config("vmlinux", "quiet")).await;
    let req = pb::StreamConsoleRequest { vm_id: vm.id.clone(), follow: true, ..Default::default() };
    let mut stream = c.stream_console(req).await.unwrap();
    vm.boot().await;
    let mut seen = Vec::new();
    let has = |seen: &[u8], marker: &str| String::from_utf8_lossy(seen).contains(marker);
    while !(has(&seen, "METALD_GUEST_READY") && has(&seen, "METALD_TICK ")) {
        let m = tokio::time::timeout(BOOT_TIMEOUT, stream.message()).await.expect("console output").unwrap();
        seen.extend_from_slice(m.expect("the stream goes on while the VM exists").data());
    }
    let on_disk = std::fs::read(vm.console().await.0).unwrap();
    assert!(on_disk.starts_with(&seen), "the stream is the console log, in order");
    vm.delete_force().await;
    loop {
        match tokio::time::timeout(BOOT_TIMEOUT, stream.message()).await.expect("the stream ends") {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => panic!("the stream ends cleanly, not with {e:?}"),
        }
    }
}
