//! Host facts the QEMU backend needs once per daemon: the QEMU version,
//! the host TSC frequency, and the accelerator decision for
//! `UNKEY_METALD_QEMU_ACCEL=auto`.
//!
//! `auto` picks KVM only when `/dev/kvm` opens read-write AND a probe guest
//! booted with `-accel kvm` prints a userspace marker within the probe
//! timeout. The second step matters: on nested hosts `/dev/kvm` can open
//! and its ioctls succeed while guests die with "KVM internal error". Every
//! failed step falls back to TCG and says why; the decision is made once at
//! start and kept for the daemon's lifetime.
//!
//! The probe (up to `UNKEY_METALD_QEMU_PROBE_TIMEOUT_SECONDS`, 20 s on a host
//! where KVM is broken) runs once per host boot: its outcome is kept in
//! `<data dir>/kvm-probe.json` with what it depends on (the host's boot id,
//! `/proc/sys/kernel/random/boot_id`; QEMU's version; the probe kernel's
//! path, size and modification time), and a start with the same facts takes
//! it from there instead of booting the probe again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::cmdline::{Accel, accel_args};
use super::config::{AccelChoice, QemuSettings};
use crate::backend::process::{ProcessId, log_tail, spawn_detached};

/// Console lines that prove a probe guest reached userspace: the kernel's
/// own line before it executes init (any kernel), or the metald guest
/// image's ready marker.
const PROBE_MARKERS: [&str; 2] = ["as init process", "METALD_GUEST_READY"];

/// Runs `<binary> --version` and returns its first line.
pub async fn qemu_version(binary: &Path) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary).arg("--version").kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| format!("{} --version did not answer within 10 s", binary.display()))?
    .map_err(|e| format!("running {} --version: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_owned())
}

/// The host TSC frequency in kHz: the kernel's own figure when it exports
/// one (`/sys/devices/system/cpu/cpu0/tsc_freq_khz`), else `/proc/cpuinfo`
/// "cpu MHz" × 1000 (the TSC rate on hosts with an invariant TSC).
pub fn host_tsc_khz() -> Option<u64> {
    let sysfs = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok();
    if let Some(khz) = sysfs.and_then(|s| s.trim().parse().ok()).filter(|k| *k > 0) {
        return Some(khz);
    }
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&text)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if !(1.0..1_000_000.0).contains(&mhz) {
        return None;
    }
    // Bounded above, so the rounding cast cannot overflow.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((mhz * 1000.0).round() as u64)
}

/// The chosen accelerator and the reason, for logs and `backend_info`.
#[derive(Debug, Clone)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// The file, in the data directory, that keeps this host boot's probe outcome.
pub const PROBE_CACHE: &str = "kvm-probe.json";

/// A probe's outcome and the facts it holds for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// What the outcome depends on (see the module doc), as one string.
    pub key: String,
    /// `Ok`: KVM works (the reason); `Err`: why not.
    pub outcome: Result<String, String>,
}

/// The facts a probe's outcome holds for: host boot, QEMU version, probe kernel.
pub fn probe_key(boot_id: &str, qemu_version: &str, kernel: &Path) -> String {
    let meta = std::fs::metadata(kernel).ok();
    let modified = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!(
        "boot={} qemu={} kernel={} size={} mtime={modified}",
        boot_id.trim(),
        qemu_version.trim(),
        kernel.display(),
        meta.map_or(0, |m| m.len())
    )
}

/// The cached outcome in `file` when its key is `key`.
pub fn cached_outcome(file: &Path, key: &str) -> Option<Result<String, String>> {
    let raw = std::fs::read(file).ok()?;
    let rec: ProbeRecord = serde_json::from_slice(&raw).ok()?;
    (rec.key == key).then_some(rec.outcome)
}

/// Keeps `outcome` for `key` in `file` (written aside and renamed: a crash leaves the old
/// record or the new one).
pub fn store_outcome(file: &Path, key: &str, outcome: &Result<String, String>) {
    let rec = ProbeRecord { key: key.to_owned(), outcome: outcome.clone() };
    let tmp = file.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(&rec)
        .map_err(std::io::Error::other)
        .and_then(|raw| std::fs::write(&tmp, raw))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        debug!(file = %file.display(), error = %e, "could not keep the KVM probe's outcome");
    }
}

/// Decides the accelerator for this daemon's lifetime.
pub async fn decide(settings: &QemuSettings, binary: &Path, asset_dirs: &[PathBuf], work_dir: &Path) -> AccelDecision {
    let tcg = || Accel::Tcg {
        tb_size_mb: (settings.tb_size_mb > 0).then_some(settings.tb_size_mb),
        tsc_khz: if settings.tsc_khz > 0 { Some(settings.tsc_khz) } else { host_tsc_khz() },
    };
    let decision = match settings.accel {
        AccelChoice::Kvm => AccelDecision { accel: Accel::Kvm, reason: "UNKEY_METALD_QEMU_ACCEL=kvm".into() },
        AccelChoice::Tcg => AccelDecision { accel: tcg(), reason: "UNKEY_METALD_QEMU_ACCEL=tcg".into() },
        AccelChoice::Auto => match probe_kvm(settings, binary, asset_dirs, work_dir).await {
            Ok(why) => AccelDecision { accel: Accel::Kvm, reason: why },
            Err(why) => {
                warn!(reason = %why, "QEMU: KVM not usable, guests run under TCG (software emulation, slower)");
                AccelDecision { accel: tcg(), reason: why }
            }
        },
    };
    info!(accel = decision.accel.name(), reason = %decision.reason, "QEMU accelerator chosen");
    decision
}

/// The probe kernel and initrd: configured, or the guest image found in an
/// asset directory (`vmlinux` or `bzImage` plus `initramfs.cpio.gz`).
fn probe_files(settings: &QemuSettings, asset_dirs: &[PathBuf]) -> Option<(PathBuf, Option<PathBuf>)> {
    if let Some(k) = &settings.probe_kernel {
        return Some((k.clone(), settings.probe_initrd.clone()));
    }
    asset_dirs.iter().find_map(|d| {
        let initrd = d.join("initramfs.cpio.gz");
        let kernel = ["vmlinux", "bzImage"].iter().map(|k| d.join(k)).find(|k| k.is_file())?;
        initrd.is_file().then_some((kernel, Some(initrd)))
    })
}

async fn probe_kvm(
    settings: &QemuSettings,
    binary: &Path,
    asset_dirs: &[PathBuf],
    work_dir: &Path,
) -> Result<String, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    let (kernel, initrd) = probe_files(settings, asset_dirs).ok_or_else(|| {
        "/dev/kvm opens, but no probe guest to prove it works: set UNKEY_METALD_QEMU_PROBE_KERNEL \
         (and _PROBE_INITRD), put vmlinux|bzImage + initramfs.cpio.gz in an asset directory, \
         or set UNKEY_METALD_QEMU_ACCEL=kvm"
            .to_owned()
    })?;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let version = qemu_version(binary).await.unwrap_or_default();
    let key = probe_key(&boot_id, &version, &kernel);
    let cache = work_dir.join(PROBE_CACHE);
    if let Some(outcome) = cached_outcome(&cache, &key) {
        let from = format!(" (the probe's outcome earlier in this host boot, {})", cache.display());
        return outcome.map(|why| why + &from).map_err(|why| why + &from);
    }
    let dir = work_dir.join("kvm-probe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = run_probe(settings, binary, &kernel, initrd.as_deref(), &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    // Only a probe that ran to an answer is kept; "could not start QEMU" is not a fact of the host.
    if !boot_id.trim().is_empty() && result.as_ref().err().is_none_or(|e| !e.starts_with("KVM probe: ")) {
        store_outcome(&cache, &key, &result);
    }
    result
}

async fn run_probe(
    settings: &QemuSettings,
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    dir: &Path,
) -> Result<String, String> {
    let console = dir.join("console.log");
    let log = dir.join("qemu.log");
    let mut args: Vec<std::ffi::OsString> = vec!["-M".into(), "microvm".into()];
    args.extend(accel_args(&Accel::Kvm).into_iter().map(Into::into));
    args.extend(
        ["-nodefaults", "-no-user-config", "-display", "none", "-m", "128", "-smp", "1", "-kernel"].map(Into::into),
    );
    args.push(kernel.into());
    if let Some(i) = initrd {
        args.push("-initrd".into());
        args.push(i.into());
    }
    args.extend(["-append", "console=ttyS0 panic=-1", "-serial"].map(Into::into));
    args.push(format!("file:{}", console.display()).into());
    let mut child = spawn_detached(binary, &args, dir, &log).map_err(|e| format!("KVM probe: {e}"))?;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(settings.probe_timeout_secs);
    let outcome = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if PROBE_MARKERS.iter().any(|m| text.contains(m)) {
            break Ok(format!(
                "KVM probe guest ({}) reached userspace in {} ms",
                kernel.display(),
                started.elapsed().as_millis()
            ));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("KVM probe guest: QEMU exited ({status}): {}", log_tail(&log, 3)));
        }
        let qemu_log = std::fs::read_to_string(&log).unwrap_or_default();
        if qemu_log.contains("KVM internal error") || qemu_log.contains("emulation failure") {
            break Err(format!("KVM probe guest failed: {}", log_tail(&log, 2)));
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(format!("KVM probe guest did not reach userspace within {} s", settings.probe_timeout_secs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some(pid) = child.id().and_then(|p| ProcessId::of(p).ok()) {
        let _ = pid.kill().await;
    }
    let _ = child.wait().await;
    outcome
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_is_parsed() {
        assert_eq!(parse_cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2596.140\n"), Some(2_596_140));
        assert_eq!(parse_cpu_mhz("cpu MHz : nonsense\n"), None);
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }

    #[test]
    fn a_kept_probe_outcome_holds_for_its_boot_qemu_and_kernel_only() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let key = probe_key("b-1\n", "QEMU emulator version 7.2.22", &kernel);
        assert_eq!(key, probe_key("b-1", "QEMU emulator version 7.2.22", &kernel), "stable");
        assert_ne!(key, probe_key("b-2", "QEMU emulator version 7.2.22", &kernel), "another host boot");
        assert_ne!(key, probe_key("b-1", "QEMU emulator version 8.0.0", &kernel), "another QEMU");
        let file = dir.path().join(PROBE_CACHE);
        assert_eq!(cached_outcome(&file, &key), None, "nothing kept yet");
        let broken: Result<String, String> = Err("KVM probe guest failed: KVM internal error".into());
        store_outcome(&file, &key, &broken);
        assert_eq!(cached_outcome(&file, &key), Some(broken));
        std::fs::write(&kernel, b"another kernel").unwrap();
        let changed = probe_key("b-1", "QEMU emulator version 7.2.22", &kernel);
        assert_ne!(key, changed, "the kernel changed");
        assert_eq!(cached_outcome(&file, &changed), None);
        store_outcome(&file, &changed, &Ok("reached userspace".into()));
        assert_eq!(cached_outcome(&file, &changed), Some(Ok("reached userspace".into())));
        assert!(!file.with_extension("json.tmp").exists());
        std::fs::write(&file, b"{not json").unwrap();
        assert_eq!(cached_outcome(&file, &changed), None, "a damaged record is ignored");
    }

    #[test]
    fn probe_files_come_from_settings_or_asset_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = QemuSettings::default();
        assert!(probe_files(&s, &[dir.path().to_path_buf()]).is_none());
        std::fs::write(dir.path().join("bzImage"), b"k").unwrap();
        std::fs::write(dir.path().join("initramfs.cpio.gz"), b"i").unwrap();
        let (k, i) = probe_files(&s, &[dir.path().to_path_buf()]).unwrap();
        assert_eq!(k, dir.path().join("bzImage"));
        assert_eq!(i, Some(dir.path().join("initramfs.cpio.gz")));
        s.probe_kernel = Some("/x/k".into());
        assert_eq!(probe_files(&s, &[dir.path().to_path_buf()]).unwrap(), ("/x/k".into(), None));
    }
}
