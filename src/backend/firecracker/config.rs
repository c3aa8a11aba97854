//! Settings of the Firecracker backend and its jailer
//! (`UNKEY_METALD_FIRECRACKER_*`, `UNKEY_METALD_JAILER_*`), read through
//! [`crate::config::Reader`] so every bad value is reported at once.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Reader;

/// `UNKEY_METALD_FIRECRACKER_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerSettings {
    /// Binary name (looked up in PATH) or path.
    pub binary: String,
    /// Bound of every API request.
    pub api_timeout: Duration,
    /// Run Firecracker under the jailer when set.
    pub jailer: Option<JailerSettings>,
}

/// `UNKEY_METALD_JAILER_*` (used when `UNKEY_METALD_JAILER_ENABLED=true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerSettings {
    pub binary: String,
    pub uid: u32,
    pub gid: u32,
    /// `--chroot-base-dir`; a VM's jail is `<dir>/<firecracker file name>/<vm id>/root`.
    pub chroot_base: PathBuf,
    /// Network namespace path; `{vm_id}` is replaced by the VM's id
    /// (e.g. `/var/run/netns/{vm_id}`). Unset: the host namespace.
    pub netns: Option<String>,
    /// 1 or 2 (`--cgroup-version`).
    pub cgroup_version: u8,
    /// `--parent-cgroup`; unset: the jailer's default (the exec file name).
    pub parent_cgroup: Option<String>,
    /// Cap each VM's CPU time at its vCPU count (cgroup CPU quota).
    pub cpu_limit: bool,
    /// Memory cgroup limit = guest memory + this many MiB; 0 = no limit.
    pub memory_overhead_mb: u64,
}

impl Default for FirecrackerSettings {
    fn default() -> Self {
        FirecrackerSettings {
            binary: "/usr/bin/firecracker".into(),
            api_timeout: Duration::from_secs(10),
            jailer: None,
        }
    }
}

impl Default for JailerSettings {
    fn default() -> Self {
        JailerSettings {
            binary: "/usr/bin/jailer".into(),
            uid: 0,
            gid: 0,
            chroot_base: PathBuf::from("/srv/jailer"),
            netns: None,
            cgroup_version: 1,
            parent_cgroup: None,
            cpu_limit: true,
            memory_overhead_mb: 128,
        }
    }
}

impl FirecrackerSettings {
    pub fn read(r: &mut Reader<'_>) -> FirecrackerSettings {
        let d = FirecrackerSettings::default();
        let binary = r.string("FIRECRACKER_BINARY", &d.binary);
        let api_timeout = Duration::from_millis(r.range("FIRECRACKER_API_TIMEOUT_MS", 10_000u64, 100, 600_000));
        let jailer = r.bool("JAILER_ENABLED", false).then(|| JailerSettings::read(r));
        FirecrackerSettings { binary, api_timeout, jailer }
    }
}

impl JailerSettings {
    /// The uid/gid files for the jailed process are given to; `None` when
    /// it runs as root.
    pub fn owner(&self) -> Option<(u32, u32)> {
        (self.uid != 0 || self.gid != 0).then_some((self.uid, self.gid))
    }

    fn read(r: &mut Reader<'_>) -> JailerSettings {
        let d = JailerSettings::default();
        let binary = r.string("JAILER_BINARY", &d.binary);
        let uid = r.range("JAILER_UID", d.uid, 0, u32::MAX - 1);
        let gid = r.range("JAILER_GID", d.gid, 0, u32::MAX - 1);
        let chroot_base = PathBuf::from(r.string("JAILER_CHROOT_DIR", &d.chroot_base.display().to_string()));
        if !chroot_base.is_absolute() {
            r.error("JAILER_CHROOT_DIR", format!("{} is not an absolute path", chroot_base.display()));
        }
        let netns = r.raw("JAILER_NETNS").map(str::to_owned);
        if let Some(n) = &netns
            && !n.starts_with('/')
        {
            r.error("JAILER_NETNS", format!("{n:?} is not an absolute path (e.g. /var/run/netns/{{vm_id}})"));
        }
        let cgroup_version = r.range("JAILER_CGROUP_VERSION", d.cgroup_version, 1, 2);
        let parent_cgroup = r.raw("JAILER_PARENT_CGROUP").map(str::to_owned);
        if let Some(p) = &parent_cgroup
            && (p.starts_with('/') || p.split('/').any(|c| c == ".."))
        {
            r.error("JAILER_PARENT_CGROUP", format!("{p:?} must be a relative path without '..'"));
        }
        let cpu_limit = r.bool("JAILER_CGROUP_CPU_LIMIT", d.cpu_limit);
        let memory_overhead_mb = r.range("JAILER_CGROUP_MEMORY_OVERHEAD_MB", d.memory_overhead_mb, 0, 1 << 20);
        JailerSettings {
            binary,
            uid,
            gid,
            chroot_base,
            netns,
            cgroup_version,
            parent_cgroup,
            cpu_limit,
            memory_overhead_mb,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> (FirecrackerSettings, Vec<String>) {
        let src: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (format!("UNKEY_METALD_{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let s = FirecrackerSettings::read(&mut r);
        let errors = r.finish().err().map(|e| e.0).unwrap_or_default();
        (s, errors)
    }

    #[test]
    fn defaults_and_jailer() {
        let (s, e) = read(&[]);
        assert!(e.is_empty());
        assert_eq!(s, FirecrackerSettings::default());
        let (s, e) = read(&[
            ("JAILER_ENABLED", "true"),
            ("JAILER_UID", "123"),
            ("JAILER_GID", "100"),
            ("JAILER_NETNS", "/var/run/netns/{vm_id}"),
            ("JAILER_CGROUP_VERSION", "2"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        let j = s.jailer.unwrap();
        assert_eq!((j.uid, j.gid, j.cgroup_version), (123, 100, 2));
        assert_eq!(j.netns.as_deref(), Some("/var/run/netns/{vm_id}"));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let (_, e) = read(&[
            ("FIRECRACKER_API_TIMEOUT_MS", "5"),
            ("JAILER_ENABLED", "true"),
            ("JAILER_UID", "-1"),
            ("JAILER_CHROOT_DIR", "rel"),
            ("JAILER_NETNS", "ns"),
            ("JAILER_CGROUP_VERSION", "3"),
            ("JAILER_PARENT_CGROUP", "../x"),
        ]);
        assert_eq!(e.len(), 6, "{e:?}");
    }
}
