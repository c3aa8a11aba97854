//! Daemon configuration from `UNKEY_METALD_*` variables.
//!
//! [`Config::from_source`] reads from any key/value source (tests inject a
//! map instead of touching the process environment) and reports every bad
//! variable at once.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

pub const PREFIX: &str = "UNKEY_METALD_";

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

/// QEMU accelerator (`UNKEY_METALD_QEMU_ACCEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if `/dev/kvm` opens and a probe guest boots with it, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err("must be one of auto, kvm, tcg".into()),
        }
    }
}

/// Settings of the QEMU backend (`UNKEY_METALD_QEMU_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    /// Binary name (looked up in PATH) or path.
    pub binary: String,
    pub accel: AccelChoice,
    /// TCG translation cache in MiB; 0 keeps QEMU's default.
    pub tb_size_mb: u32,
    /// Host TSC kHz for the guest's `tsc_early_khz=` under TCG; 0 detects
    /// it from /proc/cpuinfo.
    pub tsc_khz: u64,
    /// Guest used by the `auto` KVM probe; unset: looked up in the asset
    /// directories.
    pub probe_kernel: Option<PathBuf>,
    pub probe_initrd: Option<PathBuf>,
    pub probe_timeout_secs: u64,
}

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            binary: "qemu-system-x86_64".into(),
            accel: AccelChoice::Auto,
            tb_size_mb: 0,
            tsc_khz: 0,
            probe_kernel: None,
            probe_initrd: None,
            probe_timeout_secs: 20,
        }
    }
}

impl QemuSettings {
    fn read(r: &mut Reader<'_>) -> QemuSettings {
        let d = QemuSettings::default();
        let binary = r.string("QEMU_BINARY", &d.binary);
        let accel = match r.raw("QEMU_ACCEL") {
            None => d.accel,
            Some(v) => v.parse().unwrap_or_else(|e| {
                r.error("QEMU_ACCEL", format!("{v:?} {e}"));
                d.accel
            }),
        };
        let tb_size_mb = r.range("QEMU_TB_SIZE_MB", d.tb_size_mb, 0, 65536);
        let tsc_khz = r.range("QEMU_TSC_KHZ", d.tsc_khz, 0, 100_000_000);
        fn path(r: &mut Reader<'_>, name: &str) -> Option<PathBuf> {
            let p = PathBuf::from(r.raw(name)?);
            if !p.is_absolute() {
                r.error(name, format!("{} is not an absolute path", p.display()));
            }
            Some(p)
        }
        let probe_kernel = path(r, "QEMU_PROBE_KERNEL");
        let probe_initrd = path(r, "QEMU_PROBE_INITRD");
        if probe_initrd.is_some() && probe_kernel.is_none() {
            r.error("QEMU_PROBE_INITRD", "is set without UNKEY_METALD_QEMU_PROBE_KERNEL");
        }
        let probe_timeout_secs = r.range("QEMU_PROBE_TIMEOUT_SECONDS", d.probe_timeout_secs, 1, 600);
        QemuSettings { binary, accel, tb_size_mb, tsc_khz, probe_kernel, probe_initrd, probe_timeout_secs }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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
    pub auth_tokens_file: Option<PathBuf>,
    pub auth_dev_tokens: bool,
    pub backend: BackendChoice,
    pub log_format: LogFormat,
    /// How long graceful daemon shutdown waits for in-flight calls.
    pub shutdown_grace_secs: u64,
    pub qemu: QemuSettings,
    pub firecracker: crate::backend::firecracker::config::FirecrackerSettings,
    pub cloud_hypervisor: crate::backend::cloudhypervisor::config::CloudHypervisorSettings,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub billing: crate::billing::BillingConfig,
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads variables, collecting errors instead of stopping at the first.
pub struct Reader<'a> {
    src: &'a HashMap<String, String>,
    errors: Vec<String>,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a HashMap<String, String>) -> Self {
        Reader { src, errors: Vec::new() }
    }

    pub fn raw(&self, name: &str) -> Option<&'a str> {
        self.src.get(&format!("{PREFIX}{name}")).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    pub fn error(&mut self, name: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{PREFIX}{name}: {msg}"));
    }

    /// Parses `name`, or returns `default` when unset.
    pub fn parse<T: FromStr>(&mut self, name: &str, default: T, expect: &str) -> T {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.error(name, format!("{v:?} is not valid: expected {expect}"));
                    default
                }
            },
        }
    }

    /// Parses an integer within `[min, max]`.
    pub fn range<T>(&mut self, name: &str, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let expect = format!("an integer from {min} to {max}");
        let v = self.parse(name, default, &expect);
        if v < min || v > max {
            self.error(name, format!("{v} is out of range: expected {expect}"));
            return default;
        }
        v
    }

    pub fn bool(&mut self, name: &str, default: bool) -> bool {
        match self.raw(name).map(|s| s.to_ascii_lowercase()) {
            None => default,
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    self.error(name, format!("{v:?} is not valid: expected true or false"));
                    default
                }
            },
        }
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() { Ok(()) } else { Err(ConfigError(self.errors)) }
    }
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
        let qemu = QemuSettings::read(&mut r);
        let firecracker = crate::backend::firecracker::config::FirecrackerSettings::read(&mut r);
        let cloud_hypervisor = crate::backend::cloudhypervisor::config::CloudHypervisorSettings::read(&mut r);
        let billing = crate::billing::BillingConfig::read(&mut r);
        let telemetry = crate::telemetry::TelemetryConfig::read(&mut r);
        if auth_tokens_file.is_none() && !auth_dev_tokens {
            r.errors.push(format!(
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
            auth_tokens_file,
            auth_dev_tokens,
            backend,
            log_format,
            shutdown_grace_secs,
            qemu,
            firecracker,
            cloud_hypervisor,
            telemetry,
            billing,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
    fn asset_dirs_are_colon_separated() {
        let c = Config::from_source(&src(&[("AUTH_DEV_TOKENS", "1"), ("ASSET_DIRS", "/a:/b/c")])).unwrap();
        assert_eq!(c.asset_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b/c")]);
    }
}
