//! Settings of the QEMU backend (`UNKEY_METALD_QEMU_*`), read with
//! [`crate::config::Reader`] so every bad value is reported at once.

use std::path::PathBuf;
use std::str::FromStr;

use crate::config::Reader;

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
    pub fn read(r: &mut Reader<'_>) -> QemuSettings {
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
