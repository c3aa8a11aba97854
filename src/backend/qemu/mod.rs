//! The QEMU `-M microvm` backend (`UNKEY_METALD_BACKEND=qemu`).
//!
//! One QEMU process per VM, started paused (`-S`) at create in its own
//! process group, driven over its QMP socket `<vm dir>/qmp.sock`:
//!
//! | operation         | QMP                                                   |
//! |-------------------|-------------------------------------------------------|
//! | boot, resume      | `cont`                                                |
//! | pause             | `stop`                                                |
//! | reboot            | `system_reset`, forced or not: QMP has no ACPI reboot; the guest restarts and prints its ready marker again |
//! | graceful shutdown | `system_powerdown` (ACPI power button; a paused guest is resumed first so it can react), wait for the process to exit up to the timeout, then force |
//! | forced shutdown   | `quit`, SIGKILL if still alive after 3 s               |
//! | delete            | SIGKILL                                               |
//!
//! A guest power-off ends the QEMU process (no `-no-shutdown`), a guest
//! reset reboots it (no `-no-reboot`). A watcher task per VM reports the
//! process's end on the exit sink; the core ignores exits it caused itself.
//! Files per VM: `console.log` (serial), `qemu.log` (QEMU's stdout/stderr),
//! `qemu.args` (the command line, JSON), `qmp.sock`, `qemu.pid`.

pub mod accel;
pub mod cmdline;
pub mod config;
pub mod generation;
pub mod qmp;
pub mod save;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::accel::AccelDecision;
use self::cmdline::VmPaths;
use self::config::QemuSettings;
use self::qmp::{
    Cont, Qmp, QmpCommand, QmpError, QmpEvent, QueryBlockstats, QueryStatus, Quit, Stop, SystemPowerdown, SystemReset,
};
use super::exit::Logs;
use super::kernel;
use super::process::{self, ProcessId, Watched, log_tail, remove_quiet, watch_exit};
use super::{
    Backend, BackendError, BackendHealth, BackendKind, ExitSink, Observed, Result, Runtime, StopMode, Usage, VmContext,
};
use crate::model::{ValidSpec, VmId};
use crate::util::logs::LogFile;
use crate::util::unix_now;

/// Bound of every QMP request (and of connecting).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `quit` may take before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// A VM's QEMU process and its (lazily re-established) QMP connection.
struct Conn {
    pid: ProcessId,
    socket: PathBuf,
    qmp: tokio::sync::Mutex<Option<Arc<Qmp>>>,
}

type Conns = Arc<Mutex<HashMap<VmId, Arc<Conn>>>>;

fn lock(c: &Conns) -> std::sync::MutexGuard<'_, HashMap<VmId, Arc<Conn>>> {
    // Entries are inserted and removed whole; a poisoned map is still valid.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct QemuBackend {
    binary: PathBuf,
    version: String,
    /// The accelerator, once decided: the decision (a KVM probe guest, up to
    /// its timeout, on a host boot's first start) runs in the background so
    /// the API is ready at once; what needs it (a VM's start, a save's
    /// compatibility facts) waits for it.
    accel: tokio::sync::watch::Receiver<Option<AccelDecision>>,
    exits: ExitSink,
    /// Cancelled at daemon shutdown: watchers stop, QMP connections close
    /// (QEMU serves one QMP client at a time, so a successor metald can
    /// connect); the QEMU processes keep running.
    stop: CancellationToken,
    conns: Conns,
}

fn qmp_error(e: QmpError) -> BackendError {
    match e {
        QmpError::Timeout(what) => BackendError::timeout(format!("QMP {what}")),
        e => BackendError::failed_by(e),
    }
}

impl QemuBackend {
    /// Finds QEMU, reads its version and starts deciding the accelerator
    /// (which may boot a KVM probe guest, see [`accel`]) in the background.
    /// `work_dir` holds the probe.
    pub async fn start(
        settings: &QemuSettings,
        asset_dirs: &[PathBuf],
        work_dir: &Path,
        exits: ExitSink,
        stop: CancellationToken,
    ) -> std::result::Result<QemuBackend, String> {
        let binary = process::resolve_binary(&settings.binary).ok_or_else(|| {
            format!(
                "QEMU binary {:?} not found (install qemu-system-x86, or set UNKEY_METALD_QEMU_BINARY)",
                settings.binary
            )
        })?;
        let version = accel::qemu_version(&binary).await?;
        let (tx, accel) = tokio::sync::watch::channel(None);
        let (s, b, a, w) = (settings.clone(), binary.clone(), asset_dirs.to_vec(), work_dir.to_path_buf());
        tokio::spawn(async move {
            let _ = tx.send(Some(accel::decide(&s, &b, &a, &w).await));
        });
        let conns: Conns = Arc::default();
        let (c, s) = (conns.clone(), stop.clone());
        tokio::spawn(async move {
            s.cancelled().await;
            lock(&c).clear();
        });
        info!(binary = %binary.display(), version = %version, "QEMU backend ready (deciding the accelerator)");
        Ok(QemuBackend { binary, version, accel, exits, stop, conns })
    }

    /// The accelerator, `None` while it is being decided.
    pub fn accel(&self) -> Option<AccelDecision> {
        self.accel.borrow().clone()
    }

    /// The accelerator, waiting for the decision.
    pub async fn decided_accel(&self) -> AccelDecision {
        let mut rx = self.accel.clone();
        if let Ok(d) = rx.wait_for(Option::is_some).await
            && let Some(d) = d.clone()
        {
            return d;
        }
        // The deciding task is gone (only at a runtime shutdown): TCG always works.
        let tcg = cmdline::Accel::Tcg { tb_size_mb: None, tsc_khz: None };
        AccelDecision { accel: tcg, reason: "the accelerator was never decided".into() }
    }

    /// Starts the VM's QEMU, paused (`-S`): cold, or loading a saved guest
    /// (see `save.rs`).
    async fn launch(&self, vm: &VmContext<'_>, start: Start<'_>) -> Result<Runtime> {
        let paths = VmPaths::new(&vm.dir);
        process::check_socket_path("QMP socket", &paths.qmp_socket, "UNKEY_METALD_DATA_DIR")?;
        remove_quiet(&paths.qmp_socket);
        remove_quiet(&paths.generation_socket);
        remove_quiet(&paths.pidfile);
        let ram_file = match start {
            Start::RamFile(dir) => Some(dir.join(save::RAM_FILE)),
            Start::Cold | Start::Stream => None,
        };
        let ram = match (start, ram_file.as_deref()) {
            (Start::Cold, _) => cmdline::Ram::Memfd,
            (_, Some(file)) => cmdline::Ram::Private(file),
            (_, None) => cmdline::Ram::Anonymous,
        };
        let decided = self.decided_accel().await;
        let mut args = cmdline::qemu_args_with(vm.spec, &decided.accel, &paths, ram);
        if !matches!(start, Start::Cold) {
            // Capabilities first (`save::load_device_state`), then the load.
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let printable: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let json = serde_json::to_string(&printable).unwrap_or_default();
        std::fs::write(&paths.args_file, json)
            .map_err(|e| BackendError::io(format!("writing {}", paths.args_file.display()), e))?;

        let mut child = process::spawn_detached(&self.binary, &args, &vm.dir, &paths.qemu_log)?;
        let pid = child.id().ok_or_else(|| BackendError::failed("QEMU exited at once"))?;
        let started = match ProcessId::of(pid).map_err(|e| BackendError::io(format!("reading /proc/{pid}/stat"), e)) {
            Ok(id) => Self::wait_for_qmp(&mut child, &paths).await.map(|q| (id, q)),
            Err(e) => Err(e),
        };
        let (ident, (qmp, events)) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.release(vm.id, &vm.dir);
                return Err(e);
            }
        };
        log_events(vm.id.clone(), events);
        let version = qmp.version;
        lock(&self.conns).insert(
            vm.id.clone(),
            Arc::new(Conn {
                pid: ident,
                socket: paths.qmp_socket.clone(),
                qmp: tokio::sync::Mutex::new(Some(Arc::new(qmp))),
            }),
        );
        let logs = Logs::at_start([paths.qemu_log.clone()]);
        watch_exit(vm.id.clone(), pid, Watched::Child(child), logs, self.exits.clone(), self.stop.clone());
        debug!(vm_id = %vm.id, pid, "QEMU started");

        let mut extra = BTreeMap::new();
        extra.insert("accel".into(), decided.accel.name().into());
        extra.insert("accel_reason".into(), decided.reason.clone());
        extra.insert("qemu_version".into(), format!("{}.{}.{}", version.major, version.minor, version.micro));
        extra.insert("qemu_log".into(), paths.qemu_log.display().to_string());
        let ram = if matches!(start, Start::Cold) { "memfd" } else { "private" };
        extra.insert(RAM_KEY.into(), ram.into());
        Ok(Runtime {
            pid: Some(pid),
            pid_start_ticks: Some(ident.start_ticks),
            api_socket: Some(paths.qmp_socket),
            console_log: Some(paths.console_log),
            booted_at: None,
            extra,
        })
    }

    /// The QMP connection of the VM's current process, connecting if needed.
    async fn qmp(&self, vm: &VmId, rt: &Runtime) -> Result<Arc<Qmp>> {
        let pid = ProcessId::from_runtime(rt)
            .ok_or_else(|| BackendError::failed(format!("no QEMU process recorded for VM {vm}")))?;
        let socket =
            rt.api_socket.clone().ok_or_else(|| BackendError::failed(format!("no QMP socket recorded for VM {vm}")))?;
        let conn = {
            let mut m = lock(&self.conns);
            match m.get(vm) {
                Some(c) if c.pid == pid => c.clone(),
                _ => {
                    let c = Arc::new(Conn { pid, socket, qmp: tokio::sync::Mutex::new(None) });
                    m.insert(vm.clone(), c.clone());
                    c
                }
            }
        };
        let mut slot = conn.qmp.lock().await;
        if let Some(q) = slot.as_ref().filter(|q| !q.is_closed()) {
            return Ok(q.clone());
        }
        if !pid.is_alive() {
            return Err(BackendError::failed(format!("QEMU process {} has exited", pid.pid)));
        }
        let (q, events) = Qmp::connect(&conn.socket, QMP_TIMEOUT).await.map_err(qmp_error)?;
        log_events(vm.clone(), events);
        let q = Arc::new(q);
        *slot = Some(q.clone());
        Ok(q)
    }

    async fn command<C: QmpCommand>(&self, vm: &VmId, rt: &Runtime, cmd: &C) -> Result<C::Reply> {
        self.qmp(vm, rt).await?.execute(cmd).await.map_err(qmp_error)
    }

    /// Removes the process's files and forgets its connection.
    fn release(&self, vm: &VmId, dir: &Path) {
        lock(&self.conns).remove(vm);
        let paths = VmPaths::new(dir);
        remove_quiet(&paths.qmp_socket);
        remove_quiet(&paths.generation_socket);
        remove_quiet(&paths.pidfile);
    }

    /// Waits for a freshly spawned QEMU to serve QMP; on failure the error
    /// carries the end of `qemu.log`.
    async fn wait_for_qmp(child: &mut Child, paths: &VmPaths) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>)> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut last_err = String::from("socket not created");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::failed(format!(
                    "QEMU exited during start ({status}): {}",
                    log_tail(&paths.qemu_log, 5)
                )));
            }
            if paths.qmp_socket.exists() {
                match Qmp::connect(&paths.qmp_socket, QMP_TIMEOUT).await {
                    Ok(q) => return Ok(q),
                    Err(e) => last_err = e.to_string(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::timeout(format!(
                    "QEMU did not serve QMP within {} s ({last_err}): {}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&paths.qemu_log, 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `quit`, then SIGKILL if the process outlives [`QUIT_GRACE`].
    async fn force_stop(&self, vm: &VmId, rt: &Runtime, pid: ProcessId) -> Result<()> {
        if let Err(e) = self.command(vm, rt, &Quit).await {
            // Usual: QEMU may hang up before its reply arrives.
            debug!(vm_id = %vm, error = %crate::util::chain(&e), "quit got no reply");
        }
        if pid.wait_gone(QUIT_GRACE).await {
            return Ok(());
        }
        warn!(vm_id = %vm, pid = pid.pid, "QEMU did not quit; sending SIGKILL");
        pid.kill().await
    }
}

/// How a QEMU starts (`QemuBackend::launch`).
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    Cold,
    /// Loading the stream in this directory (RAM included).
    Stream,
    /// Mapping this directory's RAM file, then loading its device state.
    RamFile(&'a Path),
}

/// `Runtime.extra` key naming where the guest's RAM is: `memfd` (a save
/// copies it out) or `private` (a saved RAM file mapped copy-on-write, or
/// anonymous memory; a save streams it). Absent for QEMUs of older metald versions (anonymous RAM,
/// streamed).
const RAM_KEY: &str = "ram";

/// Logs a VM's QMP events until its connection closes. Guest-triggered
/// events (resets, power-offs) stay at debug: a guest can loop them.
fn log_events(vm: VmId, mut events: mpsc::UnboundedReceiver<QmpEvent>) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            debug!(vm_id = %vm, event = ?ev, "QMP event");
        }
    });
}

/// Refuses specs QEMU microvm cannot run, naming the field to change.
fn check_spec(spec: &ValidSpec) -> Result<()> {
    let kernel = &spec.boot.kernel;
    match kernel::detect(kernel) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(BackendError::unsupported(format!(
                "config.boot.kernel_path: {} is neither an ELF vmlinux nor a bzImage, the formats QEMU microvm boots",
                kernel.display()
            )));
        }
        Err(e) => {
            return Err(BackendError::unsupported(format!(
                "config.boot.kernel_path: cannot read {}",
                kernel.display()
            ))
            .caused_by(e));
        }
    }
    for (i, n) in spec.network.iter().enumerate() {
        if n.tap.is_empty() && !n.managed {
            return Err(BackendError::unsupported(format!(
                "config.network[{i}].tap_device: name an existing TAP device, or leave it empty for metald to make one"
            )));
        }
        // QEMU has no limiter: metald enforces a managed NIC's limits on its
        // TAP (network::limits). An operator's TAP is not metald's to shape.
        if !n.managed && (n.rx_rate_limit.is_some() || n.tx_rate_limit.is_some()) {
            return Err(BackendError::unsupported(format!(
                "config.network[{i}]: the qemu backend enforces rate limits only on NICs metald manages, not on the \
                 operator's tap_device {:?}; leave tap_device empty, or remove rx_rate_limit and tx_rate_limit \
                 (and limit the device yourself)",
                n.tap
            )));
        }
    }
    if spec.cpu.max_vcpus > spec.cpu.vcpus {
        return Err(BackendError::unsupported(
            "config.cpu.max_vcpu_count: QEMU microvm cannot hotplug vCPUs; set it to 0 or to vcpu_count",
        ));
    }
    if spec.memory.hotplug {
        return Err(BackendError::unsupported(
            "config.memory.hotplug_enabled: QEMU microvm cannot hotplug memory; set it to false",
        ));
    }
    Ok(())
}

#[async_trait]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn check(&self, spec: &ValidSpec) -> Result<()> {
        check_spec(spec)
    }

    /// The serial console (`append=on`) and QEMU's stdout/stderr (opened to
    /// append by [`process::spawn_detached`]).
    fn log_files(&self, vm: &VmContext<'_>) -> Vec<LogFile> {
        let paths = VmPaths::new(&vm.dir);
        vec![LogFile::appended(paths.console_log), LogFile::appended(paths.qemu_log)]
    }

    async fn ready(&self) {
        self.decided_accel().await;
    }

    fn compat(&self, spec: &ValidSpec) -> BTreeMap<String, String> {
        let mut m = super::base_compat(self.kind(), &self.version, spec);
        m.insert("machine".into(), "microvm".into());
        // Decided by now: the core waits for `ready` before asking.
        let accel = self.accel().map_or("undecided", |d| d.accel.name());
        m.insert("accel".into(), accel.into());
        // The device set a save holds state for (cmdline.rs adds the port to every guest).
        m.insert("generation_port".into(), generation::PORT_NAME.into());
        m
    }

    async fn new_generation(&self, vm: &VmContext<'_>, _rt: &Runtime, seed: &[u8; 32]) -> Result<&'static str> {
        generation::send(&VmPaths::new(&vm.dir).generation_socket, vm.id, seed).await.map(|()| "virtio-console")
    }

    async fn save(&self, vm: &VmContext<'_>, rt: &Runtime, dir: &Path) -> Result<()> {
        let qmp = self.qmp(vm.id, rt).await?;
        // Only a QEMU this version started has its RAM in the memfd.
        let memfd = rt.extra.get(RAM_KEY).is_some_and(|r| r == "memfd").then_some(rt.pid).flatten();
        save::save(&qmp, dir, vm.spec.memory_bytes(), memfd).await.map(|_| ())
    }

    async fn restore(&self, vm: &VmContext<'_>, dir: &Path) -> Result<Runtime> {
        let start = if dir.join(save::RAM_FILE).is_file() { Start::RamFile(dir) } else { Start::Stream };
        let mut rt = self.launch(vm, start).await?;
        // A booted guest (as the fake's restore records it): uptime counts
        // from here unless the core knows the first boot, and a restart's
        // check of the process finds what the record says.
        rt.booted_at = Some(unix_now());
        let loaded = async {
            let qmp = self.qmp(vm.id, &rt).await?;
            save::load_device_state(&qmp, dir).await?;
            let pid = ProcessId::from_runtime(&rt);
            save::wait_loaded(&qmp, vm.spec.memory_bytes(), || pid.is_some_and(|p| p.is_alive())).await
        }
        .await;
        if let Err(e) = loaded {
            let tail = log_tail(&VmPaths::new(&vm.dir).qemu_log, 5);
            let _ = self.delete(vm, Some(&rt)).await;
            return Err(
                BackendError::failed(format!("restoring the guest from {}: {tail}", dir.display())).caused_by(e)
            );
        }
        Ok(rt)
    }

    async fn create(&self, vm: &VmContext<'_>) -> Result<Runtime> {
        super::tap::check_all(vm.spec, None)?;
        self.launch(vm, Start::Cold).await
    }

    async fn boot(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.command(vm.id, rt, &Cont).await?;
        rt.booted_at = Some(unix_now());
        Ok(())
    }

    async fn pause(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.command(vm.id, rt, &Stop).await.map(|_| ())
    }

    async fn resume(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.command(vm.id, rt, &Cont).await.map(|_| ())
    }

    async fn reboot(&self, vm: &VmContext<'_>, rt: &mut Runtime, _force: bool) -> Result<()> {
        // QMP offers no ACPI reboot, so a graceful reboot is a reset too.
        self.command(vm.id, rt, &SystemReset).await?;
        rt.booted_at = Some(unix_now());
        Ok(())
    }

    async fn shutdown(&self, vm: &VmContext<'_>, rt: &Runtime, mode: StopMode) -> Result<()> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            self.release(vm.id, &vm.dir);
            return Ok(());
        };
        let result = match mode {
            StopMode::Force => self.force_stop(vm.id, rt, pid).await,
            StopMode::Graceful { timeout } => {
                let asked = async {
                    if !self.command(vm.id, rt, &QueryStatus).await?.running {
                        self.command(vm.id, rt, &Cont).await?;
                    }
                    self.command(vm.id, rt, &SystemPowerdown).await
                }
                .await;
                match asked {
                    Ok(_) if pid.wait_gone(timeout).await => Ok(()),
                    Ok(_) => {
                        info!(vm_id = %vm.id, timeout_secs = timeout.as_secs(), "guest did not power off in time; forcing");
                        self.force_stop(vm.id, rt, pid).await
                    }
                    Err(e) => {
                        warn!(vm_id = %vm.id, error = %crate::util::chain(&e), "could not press the power button; forcing");
                        self.force_stop(vm.id, rt, pid).await
                    }
                }
            }
        };
        self.release(vm.id, &vm.dir);
        result
    }

    async fn delete(&self, vm: &VmContext<'_>, rt: Option<&Runtime>) -> Result<()> {
        lock(&self.conns).remove(vm.id);
        let result = match rt.and_then(ProcessId::from_runtime) {
            Some(pid) => pid.kill().await,
            None => Ok(()),
        };
        self.release(vm.id, &vm.dir);
        result
    }

    async fn reap(&self, vm: &VmContext<'_>, _rt: &Runtime) -> Result<()> {
        self.release(vm.id, &vm.dir);
        Ok(())
    }

    async fn usage(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Usage> {
        let (_, mut usage) = process::vmm_usage(vm.id, rt, "QEMU")?;
        // No QMP round trip for VMs without disks (most of the metering loop).
        if !vm.spec.storage.is_empty() {
            for b in self.command(vm.id, rt, &QueryBlockstats).await? {
                usage.disk_read_bytes += b.stats.rd_bytes;
                usage.disk_write_bytes += b.stats.wr_bytes;
                usage.disk_read_ops += b.stats.rd_operations;
                usage.disk_write_ops += b.stats.wr_operations;
            }
        }
        Ok(usage)
    }

    async fn observe(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Observed> {
        if !ProcessId::from_runtime(rt).is_some_and(|p| p.is_alive()) {
            return Ok(Observed::Gone);
        }
        let status = self.command(vm.id, rt, &QueryStatus).await?;
        Ok(match status.status.as_str() {
            "prelaunch" => Observed::Created,
            _ if status.running => Observed::Running,
            // paused, suspended, io-error, guest-panicked, ...: not running.
            _ => Observed::Paused,
        })
    }

    async fn reattach(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<bool> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            return Ok(false);
        };
        // Start time already rules out a recycled pid; also require that the
        // process is the QEMU of this VM (its command line names the VM dir).
        let cmdline = crate::procfs::cmdline(pid.pid);
        let dir = vm.dir.as_os_str().as_encoded_bytes();
        if !cmdline.windows(dir.len()).any(|w| w == dir) {
            warn!(vm_id = %vm.id, pid = pid.pid, "recorded pid runs something else; not reattaching");
            return Ok(false);
        }
        match self.qmp(vm.id, rt).await {
            // Keep the VM: operations reconnect on demand.
            Err(e) => {
                warn!(vm_id = %vm.id, error = %crate::util::chain(&e), "reattached to QEMU, but QMP is not reachable yet");
            }
            Ok(qmp) => match save::cancel_interrupted(&qmp).await {
                Ok(true) => info!(vm_id = %vm.id, "cancelled a save a restart interrupted"),
                Ok(false) => {}
                Err(e) => {
                    warn!(vm_id = %vm.id, error = %crate::util::chain(&e), "could not cancel a save a restart interrupted");
                }
            },
        }
        let logs = Logs::at_start([VmPaths::new(&vm.dir).qemu_log]);
        watch_exit(vm.id.clone(), pid.pid, Watched::Pid(pid), logs, self.exits.clone(), self.stop.clone());
        debug!(vm_id = %vm.id, pid = pid.pid, "reattached to QEMU");
        Ok(true)
    }

    async fn health(&self) -> BackendHealth {
        let ok = self.binary.is_file();
        BackendHealth {
            ok,
            version: self.version.clone(),
            detail: if ok {
                match self.accel() {
                    Some(d) => format!("{} (accel {}: {})", self.binary.display(), d.accel.name(), d.reason),
                    None => format!("{} (accel: deciding, the KVM probe runs)", self.binary.display()),
                }
            } else {
                format!("{} is gone", self.binary.display())
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    #[test]
    fn check_refuses_what_microvm_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("vmlinux");
        std::fs::write(&good, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let bad = dir.path().join("script");
        std::fs::write(&bad, b"#!/bin/sh\n").unwrap();
        let mut spec = VmSpec::default();
        spec.cpu.vcpus = 1;
        spec.boot.kernel = good.clone();
        assert!(check_spec(&ValidSpec::unchecked(spec.clone())).is_ok());

        let mut s = spec.clone();
        s.boot.kernel = bad;
        let e = check_spec(&ValidSpec::unchecked(s.clone())).unwrap_err();
        assert!(e.to_string().contains("neither an ELF vmlinux nor a bzImage"), "{e}");
        assert_eq!(crate::error::Error::from(e).code(), crate::model::Code::InvalidArgument);

        let mut s = spec.clone();
        s.network.push(Default::default());
        assert!(check_spec(&ValidSpec::unchecked(s.clone())).unwrap_err().to_string().starts_with("config.network"));
        s.network[0].managed = true;
        check_spec(&ValidSpec::unchecked(s.clone())).unwrap();
        // A managed NIC's limits are enforced on its TAP; an operator's
        // TAP is not metald's to limit.
        s.network[0].rx_rate_limit = Some(Default::default());
        check_spec(&ValidSpec::unchecked(s.clone())).unwrap();
        s.network[0].managed = false;
        s.network[0].tap = "optap0".into();
        let e = check_spec(&ValidSpec::unchecked(s.clone())).unwrap_err().to_string();
        assert!(e.contains("rate limits only on NICs metald manages") && e.contains("optap0"), "{e}");
        let mut s = spec.clone();
        s.cpu.max_vcpus = 2;
        assert!(
            check_spec(&ValidSpec::unchecked(s.clone()))
                .unwrap_err()
                .to_string()
                .starts_with("config.cpu.max_vcpu_count")
        );
        let mut s = spec;
        s.memory.hotplug = true;
        assert!(
            check_spec(&ValidSpec::unchecked(s.clone()))
                .unwrap_err()
                .to_string()
                .starts_with("config.memory.hotplug_enabled")
        );
    }
}
