//! The Firecracker backend (`UNKEY_METALD_BACKEND=firecracker`).
//!
//! One Firecracker process per VM, started at create in its own process
//! group with `--api-sock <vm dir>/firecracker.sock` (or under the jailer,
//! see [`jailer`]), configured over its REST API ([`vmm`], [`api`]):
//!
//! | operation         | Firecracker API                                           |
//! |-------------------|-----------------------------------------------------------|
//! | create            | spawn (logger and metrics options on the command line), `PUT /machine-config`, `/boot-source`, `/drives/{id}`, `/network-interfaces/{id}`, then `GET /vm/config` and `GET /` |
//! | boot              | `PUT /actions {"action_type":"InstanceStart"}`            |
//! | pause, resume     | `PATCH /vm {"state":"Paused"}` / `{"state":"Resumed"}`     |
//! | reboot            | Firecracker exits when its guest reboots, so: `SendCtrlAltDel` and wait (forced: SIGKILL), then a new process with the same configuration, booted; the VM stays RUNNING with a new pid |
//! | graceful shutdown | resume if paused, `SendCtrlAltDel`, wait for the exit up to the timeout, then SIGKILL |
//! | forced shutdown, delete | SIGKILL                                             |
//! | usage             | `/proc` CPU and RSS, plus block/net counters: `FlushMetrics`, then the lines waiting in the metrics FIFO (see [`metrics`]) |
//! | save (paused)     | `GET /vm/config`, `GET /`, `PUT /snapshot/create {"snapshot_type":"Full"}` (see [`snapshot`]) |
//! | restore           | spawn as at create, `PUT /snapshot/load {"resume_vm":false, ...}`, `GET /vm/config` (`PATCH /drives/{id}` for a drive on another file), `GET /`; the guest stays paused |
//!
//! Files per VM (in the VM dir): `console.log` (Firecracker's stdout: the
//! guest serial console), `vmm.log` (stderr), `firecracker.args`; and where
//! Firecracker can reach them (VM dir, or the jail): `firecracker.sock`,
//! `firecracker.log` (`--log-path`, level `Warning`), `metrics.fifo`
//! (`--metrics-path`, a named pipe metald reads: nothing grows), and in the
//! VM dir `metrics-totals.json` (the block/net totals so far).
//! Without the jailer, `drive-<id>` links to each disk (Firecracker is given
//! those names, see [`vmm`]). Network interfaces use the TAP device named in
//! the spec.

pub mod api;
pub mod cgroups;
pub mod config;
pub mod jailer;
pub mod metrics;
pub mod snapshot;
pub mod vmm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::api::{ActionType, InstanceActionInfo, InstanceInfo, MetricsLine, Vm, VmRunState};
use self::config::FirecrackerSettings;
use self::jailer::Jail;
use self::vmm::{Layout, Load, checked};
use super::kernel::{self, KernelFormat};
use super::process::{self, ProcessId, Watched, remove_quiet, watch_exit};
use super::restvmm;
use super::{
    Backend, BackendError, BackendHealth, BackendKind, ExitSink, Observed, Result, Runtime, StopMode, Usage, VmContext,
};
use crate::model::{ValidSpec, VmId};
use crate::util::logs::LogFile;
use crate::util::unix_now;

/// How long a guest gets to reboot after Ctrl+Alt+Del before SIGKILL.
const REBOOT_GRACE: Duration = Duration::from_secs(15);
/// Block/net counters are refreshed (`FlushMetrics`) at most this often.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Firecracker's vCPU limit (`MachineConfiguration.vcpu_count`).
const MAX_VCPUS: i64 = 32;

pub struct FirecrackerBackend {
    settings: FirecrackerSettings,
    binary: PathBuf,
    jailer: Option<PathBuf>,
    version: String,
    /// The host CPU model, part of [`Backend::compat`].
    cpu_model: String,
    exits: ExitSink,
    stop: CancellationToken,
    metrics: Arc<Mutex<HashMap<VmId, metrics::Acc>>>,
}

fn lock(m: &Mutex<HashMap<VmId, metrics::Acc>>) -> std::sync::MutexGuard<'_, HashMap<VmId, metrics::Acc>> {
    // Only counters live here; a poisoned map is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Refuses specs Firecracker cannot run, naming the field to change.
pub fn check_spec(spec: &ValidSpec) -> Result<()> {
    let k = &spec.boot.kernel;
    match kernel::detect(k) {
        Ok(Some(KernelFormat::Elf)) => {}
        Ok(Some(KernelFormat::BzImage)) => {
            return Err(BackendError::unsupported(format!(
                "config.boot.kernel_path: {} is a bzImage; Firecracker boots only an uncompressed ELF vmlinux on x86_64",
                k.display()
            )));
        }
        Ok(None) => {
            return Err(BackendError::unsupported(format!(
                "config.boot.kernel_path: {} is not an ELF vmlinux, the format Firecracker boots",
                k.display()
            )));
        }
        Err(e) => {
            return Err(
                BackendError::unsupported(format!("config.boot.kernel_path: cannot read {}", k.display())).caused_by(e)
            );
        }
    }
    if spec.cpu.vcpus > MAX_VCPUS {
        return Err(BackendError::unsupported(format!("config.cpu.vcpu_count: Firecracker runs at most {MAX_VCPUS}")));
    }
    if spec.cpu.max_vcpus > spec.cpu.vcpus {
        return Err(BackendError::unsupported(
            "config.cpu.max_vcpu_count: Firecracker cannot hotplug vCPUs; set it to 0 or to vcpu_count",
        ));
    }
    if spec.memory.hotplug {
        return Err(BackendError::unsupported(
            "config.memory.hotplug_enabled: the firecracker backend does not hotplug memory; set it to false",
        ));
    }
    for (i, n) in spec.network.iter().enumerate() {
        if n.tap.is_empty() && !n.managed {
            return Err(BackendError::unsupported(format!(
                "config.network[{i}].tap_device: name an existing TAP device, or leave it empty for metald to make one"
            )));
        }
    }
    Ok(())
}

impl FirecrackerBackend {
    /// Finds Firecracker (and the jailer when enabled) and reads its version.
    pub async fn start(
        settings: &FirecrackerSettings,
        exits: ExitSink,
        stop: CancellationToken,
    ) -> std::result::Result<FirecrackerBackend, String> {
        let binary = process::resolve_binary(&settings.binary).ok_or_else(|| {
            format!("Firecracker binary {:?} not found (set UNKEY_METALD_FIRECRACKER_BINARY)", settings.binary)
        })?;
        let binary = std::fs::canonicalize(&binary).unwrap_or(binary);
        let jailer =
            match &settings.jailer {
                None => None,
                Some(j) => Some(process::resolve_binary(&j.binary).ok_or_else(|| {
                    format!("jailer binary {:?} not found (set UNKEY_METALD_JAILER_BINARY)", j.binary)
                })?),
            };
        let version = super::host::binary_version(&binary).await?;
        info!(binary = %binary.display(), version = %version, jailer = jailer.is_some(), "Firecracker backend ready");
        Ok(FirecrackerBackend {
            settings: settings.clone(),
            binary,
            jailer,
            version,
            cpu_model: super::host::cpu_model(),
            exits,
            stop,
            metrics: Arc::default(),
        })
    }

    fn layout(&self, vm: &VmContext<'_>) -> Layout {
        Layout::new(&self.settings, &self.binary, vm)
    }

    fn client(&self, layout: &Layout) -> crate::backend::uds_http::UdsClient {
        layout.client(self.settings.api_timeout)
    }

    async fn action(&self, layout: &Layout, rt: &Runtime, action_type: ActionType) -> Result<()> {
        checked(
            self.client(layout).put("/actions", &InstanceActionInfo { action_type }).await,
            ProcessId::from_runtime(rt),
            layout,
        )
        .await
    }

    async fn set_state(&self, layout: &Layout, rt: &Runtime, state: VmRunState) -> Result<()> {
        checked(self.client(layout).patch("/vm", &Vm { state }).await, ProcessId::from_runtime(rt), layout).await
    }

    /// Starts a configured Firecracker (with `load`, one that loaded that
    /// snapshot) and watches it; returns its runtime.
    async fn launch(
        &self,
        vm: &VmContext<'_>,
        layout: &Layout,
        load: Option<&Load>,
    ) -> Result<(Runtime, InstanceInfo)> {
        let started = vmm::start(&self.settings, &self.binary, self.jailer.as_deref(), vm, layout, load).await?;
        let pid = started.pid;
        lock(&self.metrics).insert(vm.id.clone(), metrics::Acc::resume(&layout.dir.join(metrics::TOTALS_FILE), pid));
        let info = started.watch(vm.id, layout.exit_logs(), &self.exits, &self.stop);
        let mut extra = BTreeMap::new();
        extra.insert("firecracker_version".into(), info.vmm_version.clone());
        extra.insert("vmm_log".into(), layout.vmm_log.display().to_string());
        extra.insert("metrics_fifo".into(), layout.host_file(metrics::FIFO).display().to_string());
        if let Some(j) = &layout.jail {
            extra.insert("jail_root".into(), j.root.display().to_string());
        }
        Ok((restvmm::runtime(pid, &layout.socket, &layout.console_log, extra), info))
    }

    /// Forgets a VM's process: socket, counters, cgroups and jail (in that
    /// order: a jail left marks a cleanup to finish, see [`Jail::sweep`]).
    async fn release(&self, vm: &VmContext<'_>, layout: &Layout) {
        lock(&self.metrics).remove(vm.id);
        remove_quiet(&layout.socket);
        if let (Some(j), Some(js)) = (&layout.jail, &self.settings.jailer) {
            let left = j.remove_cgroups(js).await;
            if left.is_empty() {
                j.remove();
            }
        }
    }

    /// Asks the guest to reboot (which ends Firecracker) and waits up to
    /// `grace`; then SIGKILL.
    async fn stop_process(
        &self,
        vm: &VmContext<'_>,
        layout: &Layout,
        rt: &Runtime,
        grace: Option<Duration>,
    ) -> Result<()> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            return Ok(());
        };
        let ask = async {
            let info: InstanceInfo = checked(self.client(layout).get("/").await, Some(pid), layout).await?;
            if info.state == "Paused" {
                self.set_state(layout, rt, VmRunState::Resumed).await?;
            }
            self.action(layout, rt, ActionType::SendCtrlAltDel).await
        };
        restvmm::stop(vm.id, pid, grace, "send Ctrl+Alt+Del", ask, pid.kill()).await
    }

    /// The block/net totals of the VM's Firecracker: `FlushMetrics` (at
    /// most every [`FLUSH_INTERVAL`]), then the lines in its metrics FIFO
    /// (see [`metrics`]).
    async fn device_counters(
        &self,
        vm: &VmContext<'_>,
        layout: &Layout,
        rt: &Runtime,
        pid: ProcessId,
    ) -> Result<MetricsLine> {
        let totals_file = layout.dir.join(metrics::TOTALS_FILE);
        let flush = {
            let mut m = lock(&self.metrics);
            let acc = m.entry(vm.id.clone()).or_default();
            if acc.pid != Some(pid) {
                *acc = metrics::Acc::resume(&totals_file, pid);
            }
            acc.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_INTERVAL)
        };
        if flush {
            self.action(layout, rt, ActionType::FlushMetrics).await?;
        }
        let mut m = lock(&self.metrics);
        let acc = m.entry(vm.id.clone()).or_default();
        if flush {
            // Lines appear in the FIFO only at a flush (Firecracker's own,
            // every 60 s, are read with the next of ours): the metering
            // ticks in between take the totals as they are.
            acc.last_flush = Some(Instant::now());
            let fifo = layout.host_file(metrics::FIFO);
            acc.read(&fifo, &totals_file).map_err(|e| BackendError::io(format!("reading {}", fifo.display()), e))?;
        }
        Ok(acc.totals)
    }
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn check(&self, spec: &ValidSpec) -> Result<()> {
        check_spec(spec)
    }

    /// The common facts, the host CPU (the saved vCPU state is KVM's) and
    /// whether the jailer runs Firecracker: a snapshot names its drives
    /// inside the jail (`/drive-<id>`) or in the VM directory (`drive-<id>`).
    /// The serial console and Firecracker's stderr (its stdout and stderr,
    /// opened by metald to append) and its log file, which Firecracker opens
    /// itself without `O_APPEND` (rotated by punching a hole, see
    /// [`crate::util::logs`]). Not its metrics file.
    fn log_files(&self, vm: &VmContext<'_>) -> Vec<LogFile> {
        let layout = self.layout(vm);
        vec![
            LogFile::appended(layout.console_log.clone()),
            LogFile::appended(layout.vmm_log.clone()),
            LogFile::at_offset(layout.host_file(vmm::LOG_FILE)),
        ]
    }

    fn compat(&self, spec: &ValidSpec) -> BTreeMap<String, String> {
        let mut m = super::base_compat(self.kind(), &self.version, spec);
        m.insert("host_cpu".into(), self.cpu_model.clone());
        m.insert("jailer".into(), self.settings.jailer.is_some().to_string());
        m
    }

    /// Firecracker (1.9 and later) has a VM generation ID device and gives it a new value on
    /// every snapshot load by itself; a guest kernel with the vmgenid driver reseeds on it.
    async fn new_generation(&self, _vm: &VmContext<'_>, rt: &Runtime, _seed: &[u8; 32]) -> Result<&'static str> {
        let version = rt.extra.get("firecracker_version").unwrap_or(&self.version);
        if vmm::has_vmgenid(version) {
            Ok("vmgenid")
        } else {
            Err(BackendError::unsupported(format!(
                "a new generation: Firecracker {version} has no VM generation ID device (v1.9 or later has)"
            )))
        }
    }

    async fn save(&self, vm: &VmContext<'_>, rt: &Runtime, dir: &Path) -> Result<()> {
        let layout = self.layout(vm);
        let pid = ProcessId::from_runtime(rt);
        snapshot::save(&self.client(&layout), &layout, pid, dir, vm.spec.memory_bytes()).await
    }

    async fn restore(&self, vm: &VmContext<'_>, dir: &Path) -> Result<Runtime> {
        let load = snapshot::load_of(dir, vm.spec)?;
        let layout = self.layout(vm);
        let (mut rt, info) = match self.launch(vm, &layout, Some(&load)).await {
            Ok(started) => started,
            Err(e) => {
                // The process is gone (a failed load also ends Firecracker);
                // its jail and cgroups go too.
                self.release(vm, &layout).await;
                return Err(e);
            }
        };
        // Loaded: the microVM exists (Firecracker's runtime API applies),
        // paused until the core resumes it.
        rt.booted_at = Some(unix_now());
        debug!(vm_id = %vm.id, pid = ?rt.pid, state = %info.state, overrides = load.network_overrides.len(),
            "Firecracker restored");
        Ok(rt)
    }

    async fn create(&self, vm: &VmContext<'_>) -> Result<Runtime> {
        // In a jail's network namespace the TAPs are not visible here.
        if self.settings.jailer.as_ref().is_none_or(|j| j.netns.is_none()) {
            super::tap::check_all(vm.spec, None)?;
        }
        let layout = self.layout(vm);
        let (rt, info) = self.launch(vm, &layout, None).await?;
        debug!(vm_id = %vm.id, pid = ?rt.pid, state = %info.state, "Firecracker started");
        Ok(rt)
    }

    async fn boot(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.action(&self.layout(vm), rt, ActionType::InstanceStart).await?;
        rt.booted_at = Some(unix_now());
        Ok(())
    }

    async fn pause(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.set_state(&self.layout(vm), rt, VmRunState::Paused).await
    }

    async fn resume(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.set_state(&self.layout(vm), rt, VmRunState::Resumed).await
    }

    async fn reboot(&self, vm: &VmContext<'_>, rt: &mut Runtime, force: bool) -> Result<()> {
        let layout = self.layout(vm);
        self.stop_process(vm, &layout, rt, (!force).then_some(REBOOT_GRACE)).await?;
        remove_quiet(&layout.socket);
        let (mut new_rt, _) = self.launch(vm, &layout, None).await?;
        if let Err(e) = self.action(&layout, &new_rt, ActionType::InstanceStart).await {
            if let Some(p) = ProcessId::from_runtime(&new_rt) {
                let _ = p.kill().await;
            }
            return Err(e);
        }
        let restarts = rt.extra.get("restarts").and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) + 1;
        new_rt.extra.insert("restarts".into(), restarts.to_string());
        new_rt.booted_at = Some(unix_now());
        info!(vm_id = %vm.id, old_pid = ?rt.pid, new_pid = ?new_rt.pid, "Firecracker restarted for reboot");
        *rt = new_rt;
        Ok(())
    }

    async fn shutdown(&self, vm: &VmContext<'_>, rt: &Runtime, mode: StopMode) -> Result<()> {
        let layout = self.layout(vm);
        let grace = restvmm::grace(mode);
        let result = self.stop_process(vm, &layout, rt, grace).await;
        self.release(vm, &layout).await;
        result
    }

    async fn delete(&self, vm: &VmContext<'_>, rt: Option<&Runtime>) -> Result<()> {
        let layout = self.layout(vm);
        let result = match rt.and_then(ProcessId::from_runtime) {
            Some(pid) => pid.kill().await,
            None => Ok(()),
        };
        self.release(vm, &layout).await;
        result
    }

    async fn sweep(&self, live: &HashSet<String>) -> usize {
        match &self.settings.jailer {
            Some(js) => Jail::sweep(js, &self.binary, live).await,
            None => 0,
        }
    }

    async fn reap(&self, vm: &VmContext<'_>, _rt: &Runtime) -> Result<()> {
        self.release(vm, &self.layout(vm)).await;
        Ok(())
    }

    async fn usage(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Usage> {
        let (pid, mut usage) = process::vmm_usage(vm.id, rt, "Firecracker")?;
        // Not booted: no devices run, and Firecracker refuses FlushMetrics.
        if rt.booted_at.is_some() && !(vm.spec.storage.is_empty() && vm.spec.network.is_empty()) {
            let m = self.device_counters(vm, &self.layout(vm), rt, pid).await?;
            usage.disk_read_bytes = m.block.read_bytes;
            usage.disk_write_bytes = m.block.write_bytes;
            usage.disk_read_ops = m.block.read_count;
            usage.disk_write_ops = m.block.write_count;
            usage.net_rx_bytes = m.net.rx_bytes_count;
            usage.net_tx_bytes = m.net.tx_bytes_count;
            usage.net_rx_packets = m.net.rx_packets_count;
            usage.net_tx_packets = m.net.tx_packets_count;
        }
        Ok(usage)
    }

    async fn observe(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Observed> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            return Ok(Observed::Gone);
        };
        let layout = self.layout(vm);
        let info: InstanceInfo = checked(self.client(&layout).get("/").await, Some(pid), &layout).await?;
        Ok(match info.state.as_str() {
            "Not started" => Observed::Created,
            "Running" => Observed::Running,
            "Paused" => Observed::Paused,
            other => {
                return Err(BackendError::failed(format!("Firecracker reports an unknown state {other:?}")));
            }
        })
    }

    async fn reattach(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<bool> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            return Ok(false);
        };
        // A live pid with the recorded start time is ours unless its command
        // line names another VM: Firecracker gets `--id <vm id>` (the jailer
        // passes `--id=<vm id>`).
        let cmdline = crate::procfs::cmdline(pid.pid);
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let id = vm.id.as_str().as_bytes();
        let joined = format!("--id={}", vm.id);
        let names_vm = args.windows(2).any(|w| w[0] == b"--id" && w[1] == id) || args.contains(&joined.as_bytes());
        if !names_vm {
            warn!(vm_id = %vm.id, pid = pid.pid, "recorded pid runs something else; not reattaching");
            return Ok(false);
        }
        let logs = self.layout(vm).exit_logs();
        watch_exit(vm.id.clone(), pid.pid, Watched::Pid(pid), logs, self.exits.clone(), self.stop.clone());
        debug!(vm_id = %vm.id, pid = pid.pid, "reattached to Firecracker");
        Ok(true)
    }

    async fn health(&self) -> BackendHealth {
        let mut missing: Vec<String> = Vec::new();
        for b in std::iter::once(&self.binary).chain(self.jailer.as_ref()) {
            if !b.is_file() {
                missing.push(format!("{} is gone", b.display()));
            }
        }
        let jail = match &self.settings.jailer {
            Some(j) => format!(
                "jailer {} (uid {}, gid {}, chroot {})",
                self.jailer.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                j.uid,
                j.gid,
                j.chroot_base.display()
            ),
            None => "no jailer".into(),
        };
        BackendHealth {
            ok: missing.is_empty(),
            version: self.version.clone(),
            detail: if missing.is_empty() { format!("{}, {jail}", self.binary.display()) } else { missing.join("; ") },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    #[test]
    fn check_refuses_what_firecracker_cannot_boot() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let bz = dir.path().join("bzImage");
        let mut b = vec![0u8; 0x300];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, b).unwrap();
        let mut spec = VmSpec::default();
        spec.cpu.vcpus = 1;
        spec.boot.kernel = elf;
        assert!(check_spec(&ValidSpec::unchecked(spec.clone())).is_ok());
        let mut s = spec.clone();
        s.boot.kernel = bz;
        let e = check_spec(&ValidSpec::unchecked(s.clone())).unwrap_err();
        assert!(e.to_string().contains("is a bzImage"), "{e}");
        assert_eq!(crate::error::Error::from(e).code(), crate::model::Code::InvalidArgument);
        let mut s = spec;
        s.network.push(Default::default());
        assert!(
            check_spec(&ValidSpec::unchecked(s.clone()))
                .unwrap_err()
                .to_string()
                .starts_with("config.network[0].tap_device")
        );
    }
}
