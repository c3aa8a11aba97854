//! Starting and configuring one Firecracker process: where its files live
//! ([`Layout`], jail-aware), the pre-boot requests derived from a VM spec
//! ([`Plan`]), and [`start`], which runs the shared REST-VMM launch
//! ([`crate::backend::restvmm`]: spawn, wait for the API socket) and sends
//! the plan — or, for a restore, loads a snapshot instead (see
//! [`super::snapshot`]). Used at create, at every reboot (Firecracker exits
//! when its guest reboots) and at restores, so every process of a VM gets
//! exactly the same configuration.
//!
//! Drives are given to Firecracker by a name that is the same for every
//! VM, `drive-<id>`: inside the jail (`/drive-<id>`, a hard link), or
//! without the jailer relative to Firecracker's working directory, the VM
//! directory (a symbolic link to the disk). A snapshot records the drive
//! paths Firecracker was given and its load reopens exactly those
//! (Firecracker's snapshot docs: the disks must be "accessible at the same
//! relative paths to the new Firecracker process"), so a clone's process,
//! started in the clone's directory or jail, opens the clone's own disk
//! copies and never the source VM's (which may be gone).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{Instrument, debug, info_span, warn};

use super::api::{
    BootSource, Drive, FullVmConfiguration, InstanceInfo, MachineConfiguration, MemoryBackend, MemoryBackendType,
    NetworkInterface, NetworkOverride, PartialDrive, RateLimiter, SnapshotLoadParams, fault_message,
};
use super::config::FirecrackerSettings;
use super::jailer::{JAILED_SOCKET, Jail};
use super::metrics;
use crate::backend::exit::Logs;
use crate::backend::process::ProcessId;
use crate::backend::restvmm::{self, Launch, Output, Running};
use crate::backend::uds_http::{ApiError, UdsClient};
use crate::backend::{BackendError, Result, VmContext};
use crate::model::ValidSpec;

/// Boot arguments Firecracker guests need: the serial console (Firecracker
/// writes it to its stdout), `reboot=k` so a guest reboot ends the VMM,
/// `panic=1` so a panicking guest reboots (and so ends) at once, and
/// `metald.stop=reboot`: Firecracker on x86 has no power-off device (a
/// guest that powers off leaves it running, halted), so metald's guests
/// print their power-off marker and then reboot, which ends it promptly
/// (see [`crate::backend::exit::Logs::ends_on_reboot`]).
const REQUIRED_ARGS: [(&str, &str); 4] = [
    ("console=", "console=ttyS0"),
    ("reboot=", "reboot=k"),
    ("panic=", "panic=1"),
    ("metald.stop=", "metald.stop=reboot"),
];

pub const LOG_FILE: &str = "firecracker.log";
/// Firecracker's own log level: warnings and errors only (at `Info` it
/// writes two lines for every API request, i.e. every metrics flush).
const LOG_LEVEL: &str = "Warning";

/// Where a VM's Firecracker files are, on the host and as the VMM sees them.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// Host path of the API socket.
    pub socket: PathBuf,
    /// The guest serial console (Firecracker's stdout).
    pub console_log: PathBuf,
    /// Firecracker's (or the jailer's) stderr.
    pub vmm_log: PathBuf,
    pub jail: Option<Jail>,
}

impl Layout {
    pub fn new(settings: &FirecrackerSettings, binary: &Path, vm: &VmContext<'_>) -> Layout {
        let jail = settings.jailer.as_ref().map(|j| Jail::new(j, binary, vm.id));
        let socket = match &jail {
            Some(j) => j.host_path(JAILED_SOCKET),
            None => vm.dir.join("firecracker.sock"),
        };
        Layout {
            dir: vm.dir.to_path_buf(),
            socket,
            console_log: vm.dir.join("console.log"),
            vmm_log: vm.dir.join("vmm.log"),
            jail,
        }
    }

    /// Host path of a file Firecracker opens itself (log, metrics).
    pub fn host_file(&self, name: &str) -> PathBuf {
        match &self.jail {
            Some(j) => j.host_path(name),
            None => self.dir.join(name),
        }
    }

    /// The path Firecracker is given for a host file: the file itself, or
    /// its name inside the jail.
    pub fn api_path(&self, host: &Path, jailed_name: &str) -> String {
        match &self.jail {
            Some(_) => format!("/{jailed_name}"),
            None => host.display().to_string(),
        }
    }

    /// The path Firecracker is given for drive `id` (see the module doc).
    pub fn drive_path(&self, id: &str) -> String {
        match &self.jail {
            Some(_) => format!("/{}", drive_name(id)),
            None => drive_name(id),
        }
    }

    /// What its exit is read from: Firecracker's own logs (stderr, its
    /// logger's file) and the console (it ends when its guest reboots).
    pub fn exit_logs(&self) -> Logs {
        Logs::at_start([self.vmm_log.clone(), self.host_file(LOG_FILE)]).ends_on_reboot(self.console_log.clone())
    }

    pub fn client(&self, timeout: Duration) -> UdsClient {
        UdsClient::new(&self.socket, "firecracker", timeout, fault_message)
    }
}

/// The name of drive `id` where Firecracker opens it (see the module doc).
pub fn drive_name(id: &str) -> String {
    format!("drive-{id}")
}

/// The pre-boot requests for one VM, in the order they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Firecracker's logger and metrics options, on its command line (so
    /// nothing it logs before an API call lands in the console).
    pub log_args: Vec<String>,
    pub machine: MachineConfiguration,
    pub boot: BootSource,
    pub drives: Vec<Drive>,
    pub nics: Vec<NetworkInterface>,
    /// Files to put into the jail: (host source, jailed name, writable).
    pub jail_files: Vec<(PathBuf, String, bool)>,
    /// Without the jailer: the drive links to make in the VM directory
    /// (disk, link name).
    pub drive_links: Vec<(PathBuf, String)>,
}

/// The kernel command line with Firecracker's required arguments added
/// when the spec does not set them.
pub fn boot_args(spec_args: &str) -> String {
    let mut args: Vec<&str> = spec_args.split_whitespace().collect();
    for (key, arg) in REQUIRED_ARGS {
        if !args.iter().any(|a| a.starts_with(key)) {
            args.push(arg);
        }
    }
    args.join(" ")
}

impl Plan {
    pub fn new(spec: &ValidSpec, layout: &Layout) -> Plan {
        let mut jail_files = Vec::new();
        let mut place = |host: &Path, name: String, writable: bool| {
            jail_files.push((host.to_path_buf(), name.clone(), writable));
            layout.api_path(host, &name)
        };
        let kernel = place(&spec.boot.kernel, "vmlinux".into(), false);
        let initrd = spec.boot.initrd.as_ref().map(|p| place(p, "initrd".into(), false));
        let drives = spec
            .storage
            .iter()
            .map(|d| {
                place(&d.path, drive_name(&d.id), !d.read_only);
                Drive {
                    drive_id: d.id.clone(),
                    path_on_host: layout.drive_path(&d.id),
                    is_root_device: d.is_root,
                    is_read_only: d.read_only,
                    rate_limiter: None,
                }
            })
            .collect();
        let drive_links = spec.storage.iter().map(|d| (d.path.clone(), drive_name(&d.id))).collect();
        let nics = spec
            .network
            .iter()
            .map(|n| NetworkInterface {
                iface_id: n.id.clone(),
                host_dev_name: n.tap.clone(),
                guest_mac: (!n.mac.is_empty()).then(|| n.mac.clone()),
                rx_rate_limiter: RateLimiter::from_spec(n.rx_rate_limit.as_ref()),
                tx_rate_limiter: RateLimiter::from_spec(n.tx_rate_limit.as_ref()),
            })
            .collect();
        Plan {
            log_args: vec![
                "--log-path".into(),
                layout.api_path(&layout.host_file(LOG_FILE), LOG_FILE),
                "--level".into(),
                LOG_LEVEL.into(),
                "--show-level".into(),
                "--metrics-path".into(),
                layout.api_path(&layout.host_file(metrics::FIFO), metrics::FIFO),
            ],
            machine: MachineConfiguration {
                vcpu_count: spec.vcpus(),
                mem_size_mib: spec.memory_bytes() >> 20,
                smt: false,
            },
            boot: BootSource {
                kernel_image_path: kernel,
                initrd_path: initrd,
                boot_args: Some(boot_args(&spec.boot.kernel_args)),
            },
            drives,
            nics,
            jail_files,
            drive_links,
        }
    }
}

/// A started and configured (not yet booted) Firecracker; `configured` is
/// its `GET /` answer.
pub type Started = Running<InstanceInfo>;

/// `r` with an API failure mapped to a backend error (naming a VMM that died).
pub async fn checked<T>(r: std::result::Result<T, ApiError>, pid: Option<ProcessId>, layout: &Layout) -> Result<T> {
    crate::backend::uds_http::checked(r, "Firecracker", pid, &layout.vmm_log).await
}

/// A snapshot a new Firecracker loads instead of being configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Host path of the saved microVM state.
    pub state: PathBuf,
    /// Host path of the saved guest memory (mapped for the restored
    /// microVM's lifetime).
    pub memory: PathBuf,
    /// TAP devices replacing the saved ones (empty when all are the same).
    pub network_overrides: Vec<NetworkOverride>,
    /// Bound of the load request.
    pub timeout: Duration,
}

/// Names of a restore's files inside the jail.
pub const JAILED_RESTORE_STATE: &str = "restore-vmstate";
pub const JAILED_RESTORE_MEMORY: &str = "restore-memory";

/// Whether a Firecracker `version` ("1.16.1") accepts `network_overrides`
/// in `PUT /snapshot/load` (added in v1.12.0).
pub fn supports_network_overrides(version: &str) -> bool {
    at_least(version, (1, 12))
}

/// Whether a Firecracker `version` has the VM generation ID device, which it
/// changes at every snapshot load (added in v1.9.0, x86_64).
pub fn has_vmgenid(version: &str) -> bool {
    at_least(version, (1, 9))
}

/// `version` as the API ("1.16.1") or `--version` ("Firecracker v1.16.1") says it.
fn at_least(version: &str, want: (u32, u32)) -> bool {
    let version = version.split_whitespace().last().unwrap_or_default();
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= want
}

/// Spawns Firecracker (directly or under the jailer), waits for its API and
/// sends the pre-boot configuration, or with `load` loads that snapshot
/// (the microVM is then paused). On failure nothing is left running.
pub async fn start(
    settings: &FirecrackerSettings,
    binary: &Path,
    jailer: Option<&Path>,
    vm: &VmContext<'_>,
    layout: &Layout,
    load: Option<&Load>,
) -> Result<Started> {
    restvmm::prepare_socket(&layout.socket, "UNKEY_METALD_DATA_DIR or UNKEY_METALD_JAILER_CHROOT_DIR")?;
    let plan = Plan::new(vm.spec, layout);
    let mut files = plan.jail_files.clone();
    let load_params = load.map(|l| {
        files.push((l.state.clone(), JAILED_RESTORE_STATE.into(), false));
        files.push((l.memory.clone(), JAILED_RESTORE_MEMORY.into(), false));
        SnapshotLoadParams {
            snapshot_path: layout.api_path(&l.state, JAILED_RESTORE_STATE),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: layout.api_path(&l.memory, JAILED_RESTORE_MEMORY),
            },
            resume_vm: false,
            network_overrides: l.network_overrides.clone(),
        }
    });
    let (program, mut args): (&Path, Vec<OsString>) = match (&layout.jail, settings.jailer.as_ref(), jailer) {
        (Some(jail), Some(js), Some(jailer)) => {
            // The jail's root is root's: Firecracker (as the jail's uid) cannot create its log there.
            jail.prepare(js, &files, &[LOG_FILE], &vm.dir)?;
            metrics::make_fifo(&layout.host_file(metrics::FIFO), js.owner())?;
            (jailer, jail.args(js, binary, vm.spec))
        }
        _ => {
            metrics::make_fifo(&layout.host_file(metrics::FIFO), None)?;
            link_drives(&layout.dir, &plan.drive_links)?;
            let args = vec!["--api-sock".into(), layout.socket.clone().into(), "--id".into(), vm.id.as_str().into()];
            (binary, args)
        }
    };
    args.extend(plan.log_args.iter().map(OsString::from));
    let printable: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect();
    let args_file = layout.dir.join("firecracker.args");
    std::fs::write(&args_file, serde_json::to_string(&printable).unwrap_or_default())
        .map_err(|e| BackendError::io(format!("writing {}", args_file.display()), e))?;

    let launch = Launch {
        vmm: "Firecracker",
        program,
        args: &args,
        cwd: &layout.dir,
        output: Output::Split { stdout: &layout.console_log, stderr: &layout.vmm_log },
        socket: &layout.socket,
        probe_path: "/",
        log: &layout.vmm_log,
    };
    let client = layout.client(settings.api_timeout);
    let (c, plan, params) = (&client, &plan, load_params.as_ref());
    let configured = restvmm::launch(&launch, c, |pid, probed: InstanceInfo| async move {
        match (params, load) {
            (Some(p), Some(l)) => {
                if !p.network_overrides.is_empty() && !supports_network_overrides(&probed.vmm_version) {
                    return Err(BackendError::unsupported(format!(
                        "the VM's network interfaces use other TAP devices than when it was saved, and Firecracker \
                         {} cannot change them at a snapshot load (network_overrides needs v1.12 or later); \
                         upgrade Firecracker (UNKEY_METALD_FIRECRACKER_BINARY)",
                        probed.vmm_version
                    )));
                }
                checked(load_snapshot(c, plan, p, l.timeout).await, Some(pid), layout).await
            }
            _ => checked(configure(c, plan).await, Some(pid), layout).await,
        }
    })
    .await;
    match configured {
        Ok(started) => {
            if let Some(j) = layout.jail.as_ref().filter(|_| load.is_some()) {
                // Read (state) or mapped (memory) by now: the jail needs no name for them.
                for name in [JAILED_RESTORE_STATE, JAILED_RESTORE_MEMORY] {
                    crate::backend::process::remove_quiet(&j.host_path(name));
                }
            }
            debug!(vm_id = %vm.id, pid = started.pid.pid, version = %started.configured.vmm_version,
                restored = load.is_some(), "Firecracker configured");
            Ok(started)
        }
        Err(e) => {
            if let Some(j) = &layout.jail {
                j.remove();
            }
            Err(e)
        }
    }
}

/// Makes `<dir>/<name>` a symbolic link to each drive's disk (replacing
/// what is there).
fn link_drives(dir: &Path, links: &[(PathBuf, String)]) -> Result<()> {
    for (disk, name) in links {
        let link = dir.join(name);
        if link == *disk {
            continue;
        }
        crate::backend::process::remove_quiet(&link);
        std::os::unix::fs::symlink(disk, &link)
            .map_err(|e| BackendError::io(format!("linking {} to the disk {}", link.display(), disk.display()), e))?;
    }
    Ok(())
}

/// Loads a snapshot into a fresh Firecracker (its logger and metrics are on
/// its command line, not part of a snapshot): `PUT /snapshot/load`, then `GET /vm/config` and a `PATCH /drives/{id}`
/// for each drive whose file is not the one this VM's plan names (a
/// snapshot of a process that was given other paths), and `GET /`.
async fn load_snapshot(
    client: &UdsClient,
    plan: &Plan,
    params: &SnapshotLoadParams,
    timeout: Duration,
) -> std::result::Result<InstanceInfo, ApiError> {
    client.with_timeout(timeout).put("/snapshot/load", params).await?;
    let restored: FullVmConfiguration = client.get("/vm/config").await?;
    for d in &plan.drives {
        let now = restored.drives.iter().find(|r| r.drive_id == d.drive_id).and_then(|r| r.path_on_host.as_deref());
        if now != Some(d.path_on_host.as_str()) {
            let patch = PartialDrive { drive_id: d.drive_id.clone(), path_on_host: Some(d.path_on_host.clone()) };
            client.patch(&format!("/drives/{}", d.drive_id), &patch).await?;
        }
    }
    client.get("/").await
}

/// Sends the plan, then reads back `GET /vm/config` and `GET /`.
async fn configure(client: &UdsClient, plan: &Plan) -> std::result::Result<InstanceInfo, ApiError> {
    client.put("/machine-config", &plan.machine).await?;
    client.put("/boot-source", &plan.boot).await?;
    for d in &plan.drives {
        client.put(&format!("/drives/{}", d.drive_id), d).await?;
    }
    if !plan.nics.is_empty() {
        // The VM's network step: its NICs, attached to their TAP devices.
        let nics = async {
            for n in &plan.nics {
                client.put(&format!("/network-interfaces/{}", n.iface_id), n).await?;
            }
            Ok::<_, ApiError>(())
        };
        let count = i64::try_from(plan.nics.len()).unwrap_or(i64::MAX);
        nics.instrument(info_span!("network", nics = count)).await?;
    }
    let applied: FullVmConfiguration = client.get("/vm/config").await?;
    let machine = applied.machine_config.as_ref().map(|m| (m.vcpu_count, m.mem_size_mib));
    if machine != Some((plan.machine.vcpu_count, plan.machine.mem_size_mib))
        || applied.drives.len() != plan.drives.len()
        || applied.network_interfaces.len() != plan.nics.len()
    {
        warn!(?applied, "Firecracker reports a configuration different from the one sent");
    }
    client.get("/").await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn required_boot_args_are_added_once() {
        assert_eq!(boot_args(""), "console=ttyS0 reboot=k panic=1 metald.stop=reboot");
        assert_eq!(boot_args("quiet console=hvc0 panic=5"), "quiet console=hvc0 panic=5 reboot=k metald.stop=reboot");
    }

    #[test]
    fn network_overrides_need_firecracker_1_12() {
        for (v, ok) in [("1.16.1", true), ("1.12.0", true), ("v1.12.0", true), ("1.11.9", false), ("1.10.1", false)] {
            assert_eq!(supports_network_overrides(v), ok, "{v}");
        }
        assert!(supports_network_overrides("2.0.0"));
        assert!(!supports_network_overrides("garbage"));
    }

    #[test]
    fn the_generation_device_needs_firecracker_1_9() {
        for (v, ok) in [
            ("1.16.1", true),
            ("v1.9.0", true),
            ("1.8.0", false),
            ("2.0.0", true),
            ("garbage", false),
            ("Firecracker v1.16.1", true),
        ] {
            assert_eq!(has_vmgenid(v), ok, "{v}");
        }
    }
}
