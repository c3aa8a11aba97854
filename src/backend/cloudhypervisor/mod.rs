//! The Cloud Hypervisor backend (`UNKEY_METALD_BACKEND=cloudhypervisor`).
//!
//! One `cloud-hypervisor --api-socket path=<vm dir>/cloud-hypervisor.sock`
//! process per VM, in its own process group, driven over its REST API
//! (`/api/v1/...`, see [`api`]):
//!
//! | operation         | Cloud Hypervisor API                                     |
//! |-------------------|----------------------------------------------------------|
//! | create            | spawn, wait for `vmm.ping`, `vm.create` (payload, cpus, memory, disks, net, serial to its stdout (`console.log`), the virtio console a pty: see [`generation`]) |
//! | boot              | `vm.boot`                                                |
//! | pause, resume     | `vm.pause`, `vm.resume`                                  |
//! | reboot            | `vm.reboot` (in-process; forced or not: the API has no hard reset) |
//! | graceful shutdown | resume if paused, `vm.power-button`, wait for the process to exit (a guest power-off ends it) up to the timeout, then `vm.shutdown` + `vmm.shutdown`, then SIGKILL |
//! | forced shutdown   | `vm.shutdown` + `vmm.shutdown`, SIGKILL if still alive after 3 s |
//! | delete            | SIGKILL                                                  |
//! | usage             | `/proc` CPU and RSS, plus `vm.counters` block/net bytes  |
//! | save (paused)     | `vm.snapshot {"destination_url":"file://<dir>"}` (see [`snapshot`]) |
//! | restore           | spawn, wait for `vmm.ping`, `vm.restore {"source_url":"file://<vm dir>/restore-source"}` (a per-VM copy of the save whose `config.json` names this VM's disks, TAPs and console); the VM comes back paused |
//!
//! Files per VM: `console.log` (guest serial: Cloud Hypervisor's stdout),
//! `vmm.log` (its stderr), `cloud-hypervisor.sock`. The serial console is
//! `Tty` mode, not `File`: Cloud Hypervisor creates a serial file with
//! `File::create` (truncating, without `O_APPEND`), which could not be
//! rotated in place (the writer would go on at its old offset) and would
//! lose the history at every restore; its stdout is a file metald opens to
//! append. (In `Tty` mode it takes serial input only when its stdin is a
//! terminal; metald gives it `/dev/null`.) NICs use the existing TAP named
//! in the spec (metald does not create TAPs).

pub mod api;
pub mod config;
pub mod generation;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::api::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RateLimiterConfig,
    RestoreConfig, VmConfig, VmCounters, VmInfo, VmSnapshotConfig, VmmPingResponse, counter_sum,
};
use self::config::CloudHypervisorSettings;
use super::exit::Logs;
use super::kernel;
use super::process::{self, ProcessId, Watched, remove_quiet, watch_exit};
use super::restvmm::{self, Launch, Output};
use super::uds_http::{ApiError, UdsClient, checked};
use super::{
    Backend, BackendError, BackendHealth, BackendKind, ExitSink, Observed, Result, Runtime, StopMode, Usage, VmContext,
};
use crate::model::{ValidSpec, VmId};
use crate::util::logs::LogFile;
use crate::util::unix_now;

/// How long `vmm.shutdown` may take before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
const API: &str = "/api/v1";
/// Block/net counters are refreshed at most this often.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

/// Where a VM's files are.
struct Paths {
    socket: PathBuf,
    console_log: PathBuf,
    vmm_log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            socket: dir.join("cloud-hypervisor.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }
}

/// The `vm.create` body for a spec.
pub fn vm_config(spec: &ValidSpec) -> VmConfig {
    let mut cmdline = spec.boot.kernel_args.clone();
    if !cmdline.split_whitespace().any(|a| a.starts_with("console=")) {
        cmdline = format!("{cmdline} console=ttyS0").trim().to_owned();
    }
    if !cmdline.split_whitespace().any(|a| a == generation::CMDLINE_FLAG) {
        cmdline = format!("{cmdline} {}", generation::CMDLINE_FLAG);
    }
    let size = spec.memory_bytes();
    let max = u64::try_from(spec.memory.max_size_bytes).unwrap_or(0);
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: spec.vcpus(),
            max_vcpus: u32::try_from(spec.cpu.max_vcpus).ok().filter(|m| *m > spec.vcpus()).unwrap_or(spec.vcpus()),
        },
        memory: MemoryConfig { size, hotplug_size: (spec.memory.hotplug && max > size).then(|| max - size) },
        payload: PayloadConfig {
            kernel: spec.boot.kernel.display().to_string(),
            cmdline: Some(cmdline),
            initramfs: spec.boot.initrd.as_ref().map(|p| p.display().to_string()),
        },
        disks: spec
            .storage
            .iter()
            .map(|d| DiskConfig { path: d.path.display().to_string(), readonly: d.read_only, id: d.id.clone() })
            .collect(),
        net: spec
            .network
            .iter()
            .map(|n| NetConfig {
                tap: n.tap.clone(),
                mac: (!n.mac.is_empty()).then(|| n.mac.clone()),
                id: n.id.clone(),
                rate_limiter_config: RateLimiterConfig::from_spec(
                    n.rx_rate_limit.as_ref().or(n.tx_rate_limit.as_ref()),
                ),
            })
            .collect(),
        // To the process's stdout, `console.log` (see the module doc).
        serial: ConsoleConfig { mode: ConsoleMode::Tty, file: None },
        // The virtio console carries a clone's new generation (generation.rs).
        console: ConsoleConfig { mode: ConsoleMode::Pty, file: None },
    }
}

/// Refuses specs Cloud Hypervisor cannot run.
pub fn check_spec(spec: &ValidSpec) -> Result<()> {
    let k = &spec.boot.kernel;
    match kernel::detect(k) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(BackendError::unsupported(format!(
                "config.boot.kernel_path: {} is neither an ELF vmlinux (PVH) nor a bzImage, the formats Cloud Hypervisor boots",
                k.display()
            )));
        }
        Err(e) => {
            return Err(
                BackendError::unsupported(format!("config.boot.kernel_path: cannot read {}", k.display())).caused_by(e)
            );
        }
    }
    for (i, n) in spec.network.iter().enumerate() {
        if n.tap.is_empty() && !n.managed {
            return Err(BackendError::unsupported(format!(
                "config.network[{i}].tap_device: name an existing TAP device, or leave it empty for metald to make one"
            )));
        }
        if let (Some(rx), Some(tx)) = (&n.rx_rate_limit, &n.tx_rate_limit)
            && rx != tx
        {
            return Err(BackendError::unsupported(format!(
                "config.network[{i}]: Cloud Hypervisor applies one rate limit to both directions; \
                 make rx_rate_limit and tx_rate_limit equal or set only one"
            )));
        }
    }
    Ok(())
}

/// Device counters of one VMM process, and when they were read.
type CountersCache = HashMap<VmId, (u32, Instant, Usage)>;

/// What a freshly spawned VMM is asked to do once its API serves.
enum Then<'a> {
    /// `vm.create` with the VM's configuration.
    Create,
    /// `vm.restore` from this `file://` URL, within this time.
    Restore(&'a str, Duration),
}

pub struct CloudHypervisorBackend {
    settings: CloudHypervisorSettings,
    binary: PathBuf,
    version: String,
    /// The host CPU model, part of [`Backend::compat`].
    cpu_model: String,
    exits: ExitSink,
    stop: CancellationToken,
    /// `usage()` runs every 100 ms per VM (metering); `vm.counters` is
    /// asked at most every [`COUNTERS_INTERVAL`].
    counters: Mutex<CountersCache>,
}

fn lock(m: &Mutex<CountersCache>) -> std::sync::MutexGuard<'_, CountersCache> {
    // Only cached counters live here; a poisoned map is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CloudHypervisorBackend {
    pub async fn start(
        settings: &CloudHypervisorSettings,
        exits: ExitSink,
        stop: CancellationToken,
    ) -> std::result::Result<CloudHypervisorBackend, String> {
        let binary = process::resolve_binary(&settings.binary).ok_or_else(|| {
            format!(
                "Cloud Hypervisor binary {:?} not found (set UNKEY_METALD_CLOUD_HYPERVISOR_BINARY)",
                settings.binary
            )
        })?;
        let version = super::host::binary_version(&binary).await?;
        info!(binary = %binary.display(), version = %version, "Cloud Hypervisor backend ready");
        Ok(CloudHypervisorBackend {
            settings: settings.clone(),
            binary,
            version,
            cpu_model: super::host::cpu_model(),
            exits,
            stop,
            counters: Mutex::default(),
        })
    }

    fn client(&self, dir: &Path) -> UdsClient {
        UdsClient::new(Paths::new(dir).socket, "cloud-hypervisor", self.settings.api_timeout, api::error_message)
    }

    /// `r` with an API failure mapped to a backend error (naming a VMM that died).
    async fn checked<T>(&self, r: std::result::Result<T, ApiError>, rt: &Runtime, dir: &Path) -> Result<T> {
        checked(r, "Cloud Hypervisor", ProcessId::from_runtime(rt), &Paths::new(dir).vmm_log).await
    }

    async fn action(&self, vm: &VmContext<'_>, rt: &Runtime, name: &str) -> Result<()> {
        let r = self.client(&vm.dir).put_empty(&format!("{API}/{name}")).await;
        self.checked(r, rt, &vm.dir).await
    }

    /// `vm.shutdown` + `vmm.shutdown`, then SIGKILL after [`QUIT_GRACE`].
    async fn force_stop(&self, vm: &VmContext<'_>, pid: ProcessId) -> Result<()> {
        let client = self.client(&vm.dir).with_timeout(QUIT_GRACE);
        for name in ["vm.shutdown", "vmm.shutdown"] {
            if let Err(e) = client.put_empty(&format!("{API}/{name}")).await {
                debug!(vm_id = %vm.id, error = %crate::util::chain(&e), "{name} failed");
            }
        }
        if pid.wait_gone(QUIT_GRACE).await {
            return Ok(());
        }
        warn!(vm_id = %vm.id, pid = pid.pid, "Cloud Hypervisor did not exit; sending SIGKILL");
        pid.kill().await
    }

    /// Spawns the VM's Cloud Hypervisor, waits for `vmm.ping`, then creates
    /// or restores the VM (`then`); watches the process. On failure nothing
    /// is left running.
    async fn launch(&self, vm: &VmContext<'_>, then: Then<'_>) -> Result<Runtime> {
        let paths = Paths::new(&vm.dir);
        restvmm::prepare_socket(&paths.socket, "UNKEY_METALD_DATA_DIR")?;
        let mut api_socket = OsString::from("path=");
        api_socket.push(&paths.socket);
        let args = vec![OsString::from("--api-socket"), api_socket];
        let launch = Launch {
            vmm: "Cloud Hypervisor",
            program: &self.binary,
            args: &args,
            cwd: &vm.dir,
            output: Output::Split { stdout: &paths.console_log, stderr: &paths.vmm_log },
            socket: &paths.socket,
            probe_path: &format!("{API}/vmm.ping"),
            log: &paths.vmm_log,
        };
        let client = self.client(&vm.dir);
        let (c, paths, then) = (&client, &paths, &then);
        let started = restvmm::launch(&launch, c, |pid, ping: VmmPingResponse| async move {
            let extra = BTreeMap::from([
                ("cloud_hypervisor_version".to_owned(), ping.version),
                ("vmm_log".to_owned(), paths.vmm_log.display().to_string()),
            ]);
            let rt = restvmm::runtime(pid, &paths.socket, &paths.console_log, extra);
            let r = match then {
                Then::Create => c.put(&format!("{API}/vm.create"), &vm_config(vm.spec)).await,
                Then::Restore(url, timeout) => {
                    let body = RestoreConfig { source_url: (*url).to_owned() };
                    c.with_timeout(*timeout).put(&format!("{API}/vm.restore"), &body).await
                }
            };
            self.checked(r, &rt, &vm.dir).await?;
            Ok(rt)
        })
        .await?;
        let pid = started.pid.pid;
        let rt = started.watch(vm.id, Logs::at_start([paths.vmm_log.clone()]), &self.exits, &self.stop);
        debug!(vm_id = %vm.id, pid, restored = matches!(then, Then::Restore(..)), "Cloud Hypervisor started, VM created");
        Ok(rt)
    }
}

#[async_trait]
impl Backend for CloudHypervisorBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    fn check(&self, spec: &ValidSpec) -> Result<()> {
        check_spec(spec)
    }

    /// The common facts and the host CPU (the saved vCPU state is KVM's).
    /// The serial console (Cloud Hypervisor's stdout, see [`vm_config`]) and
    /// its stderr, both opened by metald to append.
    fn log_files(&self, vm: &VmContext<'_>) -> Vec<LogFile> {
        let paths = Paths::new(&vm.dir);
        vec![LogFile::appended(paths.console_log), LogFile::appended(paths.vmm_log)]
    }

    fn compat(&self, spec: &ValidSpec) -> BTreeMap<String, String> {
        let mut m = super::base_compat(self.kind(), &self.version, spec);
        m.insert("host_cpu".into(), self.cpu_model.clone());
        m
    }

    async fn save(&self, vm: &VmContext<'_>, rt: &Runtime, dir: &Path) -> Result<()> {
        let body = VmSnapshotConfig { destination_url: snapshot::file_url(dir)? };
        let client = self.client(&vm.dir).with_timeout(super::save_timeout(vm.spec.memory_bytes()));
        let r = client.put(&format!("{API}/vm.snapshot"), &body).await;
        self.checked(r, rt, &vm.dir).await?;
        snapshot::check_saved(dir)
    }

    async fn restore(&self, vm: &VmContext<'_>, dir: &Path) -> Result<Runtime> {
        let source = snapshot::prepare_source(dir, &vm.dir, vm.spec)?;
        let restored = match snapshot::file_url(&source) {
            Ok(url) => self.launch(vm, Then::Restore(&url, super::save_timeout(vm.spec.memory_bytes()))).await,
            Err(e) => Err(e),
        };
        // The memory was copied in (or the restore failed): the copy goes.
        if let Err(e) = std::fs::remove_dir_all(&source) {
            debug!(vm_id = %vm.id, dir = %source.display(), error = %e, "could not remove the restore source");
        }
        let mut rt = restored?;
        rt.booted_at = Some(unix_now());
        Ok(rt)
    }

    async fn new_generation(&self, vm: &VmContext<'_>, rt: &Runtime, seed: &[u8; 32]) -> Result<&'static str> {
        let r = self.client(&vm.dir).get::<VmInfo>(&format!("{API}/vm.info")).await;
        let info = self.checked(r, rt, &vm.dir).await?;
        let pty = generation::pty_of(&info)
            .ok_or_else(|| BackendError::unsupported("a new generation: the guest's virtio console is not a pty"))?;
        generation::send(pty, vm.id, seed).await.map(|()| "virtio-console")
    }

    async fn create(&self, vm: &VmContext<'_>) -> Result<Runtime> {
        super::tap::check_all(vm.spec, None)?;
        self.launch(vm, Then::Create).await
    }

    async fn boot(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        // Cloud Hypervisor opens its TAPs only now: one taken since create
        // would fail the boot as an internal error.
        super::tap::check_all(vm.spec, rt.pid)?;
        self.action(vm, rt, "vm.boot").await?;
        rt.booted_at = Some(unix_now());
        Ok(())
    }

    async fn pause(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.action(vm, rt, "vm.pause").await
    }

    async fn resume(&self, vm: &VmContext<'_>, rt: &mut Runtime) -> Result<()> {
        self.action(vm, rt, "vm.resume").await
    }

    async fn reboot(&self, vm: &VmContext<'_>, rt: &mut Runtime, _force: bool) -> Result<()> {
        self.action(vm, rt, "vm.reboot").await?;
        rt.booted_at = Some(unix_now());
        Ok(())
    }

    async fn shutdown(&self, vm: &VmContext<'_>, rt: &Runtime, mode: StopMode) -> Result<()> {
        lock(&self.counters).remove(vm.id);
        let paths = Paths::new(&vm.dir);
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            remove_quiet(&paths.socket);
            return Ok(());
        };
        let grace = restvmm::grace(mode);
        let ask = async {
            let r = self.client(&vm.dir).get::<VmInfo>(&format!("{API}/vm.info")).await;
            let info = self.checked(r, rt, &vm.dir).await?;
            if info.state == "Paused" {
                self.action(vm, rt, "vm.resume").await?;
            }
            self.action(vm, rt, "vm.power-button").await
        };
        let result = restvmm::stop(vm.id, pid, grace, "press the power button", ask, self.force_stop(vm, pid)).await;
        remove_quiet(&paths.socket);
        result
    }

    async fn delete(&self, vm: &VmContext<'_>, rt: Option<&Runtime>) -> Result<()> {
        lock(&self.counters).remove(vm.id);
        let result = match rt.and_then(ProcessId::from_runtime) {
            Some(pid) => pid.kill().await,
            None => Ok(()),
        };
        remove_quiet(&Paths::new(&vm.dir).socket);
        result
    }

    async fn reap(&self, vm: &VmContext<'_>, _rt: &Runtime) -> Result<()> {
        lock(&self.counters).remove(vm.id);
        remove_quiet(&Paths::new(&vm.dir).socket);
        Ok(())
    }

    async fn usage(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Usage> {
        let (pid, mut usage) = process::vmm_usage(vm.id, rt, "Cloud Hypervisor")?;
        if rt.booted_at.is_some() && !(vm.spec.storage.is_empty() && vm.spec.network.is_empty()) {
            let cached = lock(&self.counters)
                .get(vm.id)
                .filter(|(p, at, _)| *p == pid.pid && at.elapsed() < COUNTERS_INTERVAL)
                .map(|(_, _, u)| *u);
            let devices = match cached {
                Some(u) => u,
                None => {
                    let r = self.client(&vm.dir).get::<VmCounters>(&format!("{API}/vm.counters")).await;
                    let c = self.checked(r, rt, &vm.dir).await?;
                    let u = Usage {
                        disk_read_bytes: counter_sum(&c, "read_bytes"),
                        disk_write_bytes: counter_sum(&c, "write_bytes"),
                        disk_read_ops: counter_sum(&c, "read_ops"),
                        disk_write_ops: counter_sum(&c, "write_ops"),
                        net_rx_bytes: counter_sum(&c, "rx_bytes"),
                        net_tx_bytes: counter_sum(&c, "tx_bytes"),
                        net_rx_packets: counter_sum(&c, "rx_frames"),
                        net_tx_packets: counter_sum(&c, "tx_frames"),
                        ..Usage::default()
                    };
                    lock(&self.counters).insert(vm.id.clone(), (pid.pid, Instant::now(), u));
                    u
                }
            };
            usage = Usage { cpu_time_ns: usage.cpu_time_ns, memory_bytes: usage.memory_bytes, ..devices };
        }
        Ok(usage)
    }

    async fn observe(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<Observed> {
        if !ProcessId::from_runtime(rt).is_some_and(|p| p.is_alive()) {
            return Ok(Observed::Gone);
        }
        let r = self.client(&vm.dir).get::<VmInfo>(&format!("{API}/vm.info")).await;
        let info = self.checked(r, rt, &vm.dir).await?;
        Ok(match info.state.as_str() {
            "Created" => Observed::Created,
            "Running" => Observed::Running,
            // "Shutdown": the guest powered off inside a VMM that still runs;
            // like a paused guest it runs no code, and shutdown/delete apply.
            "Paused" | "Shutdown" => Observed::Paused,
            other => {
                return Err(BackendError::failed(format!("Cloud Hypervisor reports an unknown state {other:?}")));
            }
        })
    }

    async fn reattach(&self, vm: &VmContext<'_>, rt: &Runtime) -> Result<bool> {
        let Some(pid) = ProcessId::from_runtime(rt).filter(ProcessId::is_alive) else {
            return Ok(false);
        };
        let socket = Paths::new(&vm.dir).socket;
        let cmdline = crate::procfs::cmdline(pid.pid);
        let want = format!("path={}", socket.display());
        if !cmdline.split(|b| *b == 0).any(|a| a == want.as_bytes()) {
            warn!(vm_id = %vm.id, pid = pid.pid, "recorded pid runs something else; not reattaching");
            return Ok(false);
        }
        if let Err(e) = self.client(&vm.dir).get::<VmmPingResponse>(&format!("{API}/vmm.ping")).await {
            warn!(vm_id = %vm.id, error = %crate::util::chain(&e), "reattached to Cloud Hypervisor, but vmm.ping fails");
        }
        let logs = Logs::at_start([Paths::new(&vm.dir).vmm_log]);
        watch_exit(vm.id.clone(), pid.pid, Watched::Pid(pid), logs, self.exits.clone(), self.stop.clone());
        debug!(vm_id = %vm.id, pid = pid.pid, "reattached to Cloud Hypervisor");
        Ok(true)
    }

    async fn health(&self) -> BackendHealth {
        let ok = self.binary.is_file();
        BackendHealth {
            ok,
            version: self.version.clone(),
            detail: if ok { self.binary.display().to_string() } else { format!("{} is gone", self.binary.display()) },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;
    use crate::model::{NicSpec, RateLimit};

    #[test]
    fn check_refuses_what_cloud_hypervisor_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("script");
        std::fs::write(&bad, b"#!/bin/sh\n").unwrap();
        let mut spec = VmSpec::default();
        spec.boot.kernel = bad;
        let e = check_spec(&ValidSpec::unchecked(spec.clone())).unwrap_err();
        assert!(e.to_string().contains("neither an ELF vmlinux"), "{e}");
        let good = dir.path().join("vmlinux");
        std::fs::write(&good, b"\x7fELF\x02").unwrap();
        spec.boot.kernel = good;
        let rl = |b| Some(RateLimit { bandwidth: b, refill_time_ms: 100, burst: 0 });
        spec.network.push(NicSpec {
            tap: "tap0".into(),
            rx_rate_limit: rl(1),
            tx_rate_limit: rl(2),
            ..Default::default()
        });
        assert!(check_spec(&ValidSpec::unchecked(spec.clone())).unwrap_err().to_string().contains("one rate limit"));
    }
}
