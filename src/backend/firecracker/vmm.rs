//! Starting and configuring one Firecracker process: where its files live
//! ([`Layout`], jail-aware), the pre-boot requests derived from a VM spec
//! ([`Plan`]), and [`start`], which runs the shared REST-VMM launch
//! ([`crate::backend::restvmm`]: spawn, wait for the API socket) and sends
//! the plan. Used at create and again at every reboot
//! (Firecracker exits when its guest reboots), so a restarted VMM gets
//! exactly the same configuration.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{Instrument, debug, info_span, warn};

use super::api::{
    BootSource, Drive, FullVmConfiguration, InstanceInfo, LogLevel, Logger, MachineConfiguration, Metrics,
    NetworkInterface, RateLimiter, fault_message,
};
use super::config::FirecrackerSettings;
use super::jailer::{JAILED_SOCKET, Jail};
use crate::backend::process::ProcessId;
use crate::backend::restvmm::{self, Launch, Output, Running};
use crate::backend::uds_http::{ApiError, UdsClient};
use crate::backend::{BackendError, Result, VmContext};
use crate::model::ValidSpec;

/// Boot arguments Firecracker guests need: the serial console (Firecracker
/// writes it to its stdout), `reboot=k` so a guest reboot ends the VMM,
/// `panic=1` so a panicking guest reboots (and so ends) at once.
const REQUIRED_ARGS: [(&str, &str); 3] =
    [("console=", "console=ttyS0"), ("reboot=", "reboot=k"), ("panic=", "panic=1")];

pub const LOG_FILE: &str = "firecracker.log";
pub const METRICS_FILE: &str = "metrics.json";

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
    fn api_path(&self, host: &Path, jailed_name: &str) -> String {
        match &self.jail {
            Some(_) => format!("/{jailed_name}"),
            None => host.display().to_string(),
        }
    }

    pub fn client(&self, timeout: Duration) -> UdsClient {
        UdsClient::new(&self.socket, "firecracker", timeout, fault_message)
    }
}

/// The pre-boot requests for one VM, in the order they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub logger: Logger,
    pub metrics: Metrics,
    pub machine: MachineConfiguration,
    pub boot: BootSource,
    pub drives: Vec<Drive>,
    pub nics: Vec<NetworkInterface>,
    /// Files to put into the jail: (host source, jailed name, writable).
    pub jail_files: Vec<(PathBuf, String, bool)>,
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
            .map(|d| Drive {
                drive_id: d.id.clone(),
                path_on_host: place(&d.path, format!("drive-{}", d.id), !d.read_only),
                is_root_device: d.is_root,
                is_read_only: d.read_only,
                rate_limiter: None,
            })
            .collect();
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
            logger: Logger {
                log_path: layout.api_path(&layout.host_file(LOG_FILE), LOG_FILE),
                level: LogLevel::Info,
                show_level: true,
                show_log_origin: false,
            },
            metrics: Metrics { metrics_path: layout.api_path(&layout.host_file(METRICS_FILE), METRICS_FILE) },
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

/// Spawns Firecracker (directly or under the jailer), waits for its API and
/// sends the pre-boot configuration. On failure nothing is left running.
pub async fn start(
    settings: &FirecrackerSettings,
    binary: &Path,
    jailer: Option<&Path>,
    vm: &VmContext<'_>,
    layout: &Layout,
) -> Result<Started> {
    restvmm::prepare_socket(&layout.socket, "UNKEY_METALD_DATA_DIR or UNKEY_METALD_JAILER_CHROOT_DIR")?;
    let plan = Plan::new(vm.spec, layout);
    let (program, args): (&Path, Vec<OsString>) = match (&layout.jail, settings.jailer.as_ref(), jailer) {
        (Some(jail), Some(js), Some(jailer)) => {
            jail.prepare(js, &plan.jail_files, &[LOG_FILE, METRICS_FILE])?;
            (jailer, jail.args(js, binary, vm.spec))
        }
        _ => {
            for f in [LOG_FILE, METRICS_FILE] {
                let p = layout.host_file(f);
                std::fs::File::create(&p).map_err(|e| BackendError::io(format!("creating {}", p.display()), e))?;
            }
            let args = vec!["--api-sock".into(), layout.socket.clone().into(), "--id".into(), vm.id.as_str().into()];
            (binary, args)
        }
    };
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
    let c = &client;
    let configured = restvmm::launch(&launch, c, |pid, _: InstanceInfo| async move {
        checked(configure(c, &plan).await, Some(pid), layout).await
    })
    .await;
    match configured {
        Ok(started) => {
            debug!(vm_id = %vm.id, pid = started.pid.pid, version = %started.configured.vmm_version, "Firecracker configured");
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

/// Sends the plan, then reads back `GET /vm/config` and `GET /`.
async fn configure(client: &UdsClient, plan: &Plan) -> std::result::Result<InstanceInfo, ApiError> {
    client.put("/logger", &plan.logger).await?;
    client.put("/metrics", &plan.metrics).await?;
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
        assert_eq!(boot_args(""), "console=ttyS0 reboot=k panic=1");
        assert_eq!(boot_args("quiet console=hvc0 panic=5"), "quiet console=hvc0 panic=5 reboot=k");
    }
}
