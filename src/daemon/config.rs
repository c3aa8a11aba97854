//! The daemon's configuration: its own settings (address, directories,
//! limits, auth, backend choice) and every subsystem's, each read by the
//! subsystem's own settings type with one [`Reader`].
//!
//! [`Config::from_source`] reads from any key/value source (tests inject a
//! map instead of touching the process environment) and reports every bad
//! variable at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::backend::cloudhypervisor::config::CloudHypervisorSettings;
use crate::backend::firecracker::config::FirecrackerSettings;
use crate::backend::qemu::config::QemuSettings;
use crate::billing::BillingConfig;
pub use crate::config::ConfigError;
use crate::config::{PREFIX, Reader};
use crate::server::ConnSettings;
use crate::telemetry::{LogFormat, TelemetryConfig};

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Fake,
    Qemu,
    Firecracker,
    CloudHypervisor,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "fake" => Ok(BackendChoice::Fake),
            "qemu" => Ok(BackendChoice::Qemu),
            "firecracker" => Ok(BackendChoice::Firecracker),
            "cloudhypervisor" | "cloud-hypervisor" => Ok(BackendChoice::CloudHypervisor),
            _ => Err("must be one of auto, qemu, firecracker, cloudhypervisor, fake".into()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub address: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub asset_dirs: Vec<PathBuf>,
    pub max_vcpus: u32,
    pub max_memory_mb: u64,
    pub max_vms: usize,
    /// Bytes all saved guests (suspended VMs, snapshots) may take.
    pub snapshot_max_bytes: u64,
    /// Cap of each log file a VM's hypervisor writes (console, the VMM's
    /// output and log); one rotated part is kept beside it.
    pub vm_log_max_bytes: u64,
    pub auth_tokens_file: Option<PathBuf>,
    pub auth_dev_tokens: bool,
    pub backend: BackendChoice,
    pub log_format: LogFormat,
    /// How long graceful daemon shutdown waits for in-flight calls.
    pub shutdown_grace_secs: u64,
    /// The API port's timeouts and connection caps (`UNKEY_METALD_HTTP_*`).
    pub http: ConnSettings,
    pub qemu: QemuSettings,
    pub firecracker: FirecrackerSettings,
    pub cloud_hypervisor: CloudHypervisorSettings,
    pub telemetry: TelemetryConfig,
    pub billing: BillingConfig,
    /// Host networking of managed NICs (`UNKEY_METALD_NETWORK_*`).
    pub network: crate::network::NetSettings,
    /// Image pull and cache (`UNKEY_METALD_IMAGE_*`; the cache defaults to
    /// `<data_dir>/images`).
    pub images: crate::image::ImageSettings,
    /// How image VMs run (`UNKEY_METALD_GUEST_*`, `IMAGES_ENABLED`, ...).
    pub guest: super::images::GuestSettings,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_source(&vars)
    }

    pub fn from_source(src: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut r = Reader::new(src);
        let address = r.parse("ADDRESS", IpAddr::from([0, 0, 0, 0]), "an IP address such as 0.0.0.0 or 127.0.0.1");
        let port = r.parse("PORT", 8080u16, "a port number from 0 to 65535");
        let data_dir = PathBuf::from(r.string("DATA_DIR", "/var/lib/metald"));
        if !data_dir.is_absolute() {
            r.error("DATA_DIR", format!("{} is not an absolute path", data_dir.display()));
        }
        let asset_dirs: Vec<PathBuf> = match r.raw("ASSET_DIRS") {
            None => vec![data_dir.join("assets")],
            Some(v) => {
                let dirs: Vec<PathBuf> = v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
                for d in &dirs {
                    if !d.is_absolute() {
                        r.error("ASSET_DIRS", format!("{} is not an absolute path", d.display()));
                    }
                }
                if dirs.is_empty() {
                    r.error("ASSET_DIRS", "names no directory");
                }
                dirs
            }
        };
        let max_vcpus = r.range("MAX_VCPUS", 32u32, 1, 1024);
        let max_memory_mb = r.range("MAX_MEMORY_MB", 65536u64, 16, 16 * 1024 * 1024);
        let max_vms = r.range("MAX_VMS", 1000usize, 1, 100_000);
        let snapshot_max_bytes = r.range("SNAPSHOT_MAX_GB", 100u64, 1, 1 << 20) << 30;
        let vm_log_max_bytes = r.range(
            "VM_LOG_MAX_BYTES",
            crate::core::logs::DEFAULT_VM_LOG_MAX_BYTES,
            crate::core::logs::MIN_VM_LOG_MAX_BYTES,
            crate::core::logs::MAX_VM_LOG_MAX_BYTES,
        );
        let auth_tokens_file = r.raw("AUTH_TOKENS_FILE").map(PathBuf::from);
        let auth_dev_tokens = r.bool("AUTH_DEV_TOKENS", false);
        let backend = match r.raw("BACKEND") {
            None => BackendChoice::Auto,
            Some(v) => match v.parse() {
                Ok(b) => b,
                Err(e) => {
                    r.error("BACKEND", format!("{v:?} {e}"));
                    BackendChoice::Auto
                }
            },
        };
        let log_format = match r.string("LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                r.error("LOG_FORMAT", format!("{other:?} is not valid: expected text or json"));
                LogFormat::Text
            }
        };
        let shutdown_grace_secs = r.range("SHUTDOWN_GRACE_SECONDS", 30u64, 0, 3600);
        let http = ConnSettings::read(&mut r);
        let qemu = QemuSettings::read(&mut r);
        let firecracker = FirecrackerSettings::read(&mut r);
        let cloud_hypervisor = CloudHypervisorSettings::read(&mut r);
        let billing = BillingConfig::read(&mut r);
        let telemetry = TelemetryConfig::read(&mut r);
        let network = crate::network::NetSettings::read(&mut r);
        let images = crate::image::ImageSettings::read(&mut r, &data_dir);
        let guest = super::images::GuestSettings::read(&mut r);
        if auth_tokens_file.is_none() && !auth_dev_tokens {
            r.problem(format!(
                "no authentication configured: set {PREFIX}AUTH_TOKENS_FILE to a file of '<token> <customer_id>' lines, \
                 or {PREFIX}AUTH_DEV_TOKENS=true to accept 'dev_customer_<id>' tokens (development only)"
            ));
        }
        r.finish()?;
        Ok(Config {
            address,
            port,
            data_dir,
            asset_dirs,
            max_vcpus,
            max_memory_mb,
            max_vms,
            snapshot_max_bytes,
            vm_log_max_bytes,
            auth_tokens_file,
            auth_dev_tokens,
            backend,
            log_format,
            shutdown_grace_secs,
            http,
            qemu,
            firecracker,
            cloud_hypervisor,
            telemetry,
            billing,
            network,
            images,
            guest,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::qemu::config::AccelChoice;

    fn src(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_source(&src(&[("AUTH_DEV_TOKENS", "true")])).unwrap();
        assert_eq!(c.address.to_string(), "0.0.0.0");
        assert_eq!(c.port, 8080);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/metald"));
        assert_eq!(c.asset_dirs, vec![PathBuf::from("/var/lib/metald/assets")]);
        assert_eq!((c.max_vcpus, c.max_memory_mb, c.max_vms), (32, 65536, 1000));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.vm_log_max_bytes, 8 << 20);
    }

    #[test]
    fn the_vm_log_cap_is_bounded() {
        let with = |v: &str| Config::from_source(&src(&[("AUTH_DEV_TOKENS", "true"), ("VM_LOG_MAX_BYTES", v)]));
        assert_eq!(with("65536").unwrap().vm_log_max_bytes, 65536);
        assert_eq!(with("1073741824").unwrap().vm_log_max_bytes, 1 << 30);
        for bad in ["65535", "1073741825", "lots"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("UNKEY_METALD_VM_LOG_MAX_BYTES"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let e = Config::from_source(&src(&[
            ("PORT", "99999"),
            ("MAX_VCPUS", "0"),
            ("BACKEND", "xen"),
            ("AUTH_DEV_TOKENS", "maybe"),
            ("DATA_DIR", "relative"),
        ]))
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "UNKEY_METALD_PORT",
            "UNKEY_METALD_MAX_VCPUS",
            "UNKEY_METALD_BACKEND",
            "UNKEY_METALD_AUTH_DEV_TOKENS",
            "UNKEY_METALD_DATA_DIR",
            "no authentication configured",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
        assert_eq!(e.0.len(), 6, "{text}");
    }

    #[test]
    fn refuses_to_start_without_auth() {
        let e = Config::from_source(&src(&[])).unwrap_err();
        assert!(e.to_string().contains("AUTH_TOKENS_FILE"));
    }

    #[test]
    fn qemu_settings() {
        let c = Config::from_source(&src(&[("AUTH_DEV_TOKENS", "1")])).unwrap();
        assert_eq!(c.qemu, QemuSettings::default());
        let c = Config::from_source(&src(&[
            ("AUTH_DEV_TOKENS", "1"),
            ("QEMU_BINARY", "/opt/qemu/bin/qemu-system-x86_64"),
            ("QEMU_ACCEL", "tcg"),
            ("QEMU_TB_SIZE_MB", "64"),
            ("QEMU_PROBE_KERNEL", "/k"),
        ]))
        .unwrap();
        assert_eq!(c.qemu.binary, "/opt/qemu/bin/qemu-system-x86_64");
        assert_eq!((c.qemu.accel, c.qemu.tb_size_mb), (AccelChoice::Tcg, 64));
        assert_eq!(c.qemu.probe_kernel, Some(PathBuf::from("/k")));
        let e = Config::from_source(&src(&[
            ("AUTH_DEV_TOKENS", "1"),
            ("QEMU_ACCEL", "hvf"),
            ("QEMU_TB_SIZE_MB", "-1"),
            ("QEMU_PROBE_INITRD", "rel"),
            ("QEMU_PROBE_TIMEOUT_SECONDS", "0"),
        ]))
        .unwrap_err();
        // Bad accel, bad tb size, relative initrd, initrd without kernel, timeout.
        assert_eq!(e.0.len(), 5, "{e}");
    }

    #[test]
    fn http_connection_settings() {
        let c = Config::from_source(&src(&[("AUTH_DEV_TOKENS", "1")])).unwrap();
        assert_eq!(c.http, ConnSettings::default());
        let c = Config::from_source(&src(&[
            ("AUTH_DEV_TOKENS", "1"),
            ("HTTP_HEADER_TIMEOUT_SECONDS", "1"),
            ("HTTP_MAX_CONNECTIONS_PER_IP", "7"),
        ]))
        .unwrap();
        assert_eq!(c.http.header_timeout, std::time::Duration::from_secs(1));
        assert_eq!(c.http.max_connections_per_ip, 7);
        let e = Config::from_source(&src(&[
            ("AUTH_DEV_TOKENS", "1"),
            ("HTTP_IDLE_TIMEOUT_SECONDS", "0"),
            ("HTTP_MAX_CONNECTIONS", "lots"),
        ]))
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(e.to_string().contains("UNKEY_METALD_HTTP_IDLE_TIMEOUT_SECONDS"), "{e}");
    }

    #[test]
    fn asset_dirs_are_colon_separated() {
        let c = Config::from_source(&src(&[("AUTH_DEV_TOKENS", "1"), ("ASSET_DIRS", "/a:/b/c")])).unwrap();
        assert_eq!(c.asset_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b/c")]);
    }
}
