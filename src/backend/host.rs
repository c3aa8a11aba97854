//! Host facts the hypervisor backends and `/_/health` report: whether
//! `/dev/kvm` can be opened, a hypervisor binary's `--version`, and the
//! host's CPU model (a saved KVM guest's vCPU state depends on it).

use std::path::Path;
use std::time::Duration;

/// Whether `/dev/kvm` opens read-write (it may still not run guests well,
/// e.g. under nested virtualisation).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The host CPU's model name (`/proc/cpuinfo`), or "unknown".
pub fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_model_of(&text)
}

fn cpu_model_of(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "model name")
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The first non-empty line `binary --version` prints (stdout, else stderr).
pub async fn binary_version(binary: &Path) -> Result<String, String> {
    let run = tokio::process::Command::new(binary).arg("--version").kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| format!("{} --version did not finish within 10 s", binary.display()))?
        .map_err(|e| format!("running {} --version: {e}", binary.display()))?;
    let first = |b: &[u8]| String::from_utf8_lossy(b).lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned);
    match first(&out.stdout).or_else(|| first(&out.stderr)) {
        Some(v) if out.status.success() => Ok(v),
        Some(v) => Err(format!("{} --version failed ({}): {v}", binary.display(), out.status)),
        None => Err(format!("{} --version printed nothing ({})", binary.display(), out.status)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn version_of_a_real_binary() {
        let v = binary_version(Path::new("/bin/sh")).await;
        // dash has no --version; either way the answer is a clear string.
        match v {
            Ok(s) | Err(s) => assert!(!s.is_empty()),
        }
        assert!(binary_version(Path::new("/no/such/binary")).await.unwrap_err().contains("running"));
        let _ = kvm_available();
    }

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let info =
            "processor\t: 0\nmodel name\t: Intel(R)  Xeon(R) CPU @ 2.20GHz\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model_of(info), "Intel(R) Xeon(R) CPU @ 2.20GHz");
        assert_eq!(cpu_model_of("processor: 0\n"), "unknown");
        assert!(!cpu_model().is_empty());
    }
}
