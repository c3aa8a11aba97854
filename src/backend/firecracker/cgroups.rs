//! The cgroup directories the jailer makes for each VM, and their removal.
//!
//! The jailer creates `<mount>/<parent cgroup>/<vm id>` under the mount of
//! every controller it sets a limit on (cgroup v1) or under the unified
//! mount (v2), and never removes them. metald does, when the VM's process
//! has ended. The mounts come from `/proc/mounts` (hosts mount cgroups in
//! different places: `/sys/fs/cgroup` itself for v2, `/sys/fs/cgroup/<controller>`
//! or `cpu,cpuacct` for v1, `/sys/fs/cgroup/unified` for v2 on a hybrid host).
//!
//! A cgroup directory can only be removed once no task is in it; a VMM that
//! was killed but not yet reaped still counts (`EBUSY`), so removal is
//! retried for a bounded time. Leftovers (a metald killed between the VMM's
//! end and the removal) are swept at start ([`super::FirecrackerBackend`]'s
//! `sweep`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

/// How long a busy cgroup directory is retried (its last task being reaped).
pub const BUSY_PATIENCE: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(20);

/// The mount points of cgroup `version` (1: every v1 hierarchy; 2: the
/// unified one) in a `/proc/mounts` text.
pub fn roots_in(mounts: &str, version: u8) -> Vec<PathBuf> {
    let fstype = if version == 2 { "cgroup2" } else { "cgroup" };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == fstype).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// `/proc/mounts` writes space, tab, newline and backslash in paths as
/// octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mount points of this host for `version`.
pub fn roots(version: u8) -> Vec<PathBuf> {
    match std::fs::read_to_string("/proc/mounts") {
        Ok(m) => roots_in(&m, version),
        Err(e) => {
            warn!(error = %e, "cannot read /proc/mounts; jailed VMs' cgroups are not cleaned up");
            Vec::new()
        }
    }
}

/// The existing cgroup directories `<root>/<parent>/<name>` of one VM.
pub fn dirs_of(roots: &[PathBuf], parent: &str, name: &str) -> Vec<PathBuf> {
    roots.iter().map(|r| r.join(parent).join(name)).filter(|d| d.is_dir()).collect()
}

/// The pids in a cgroup directory (`cgroup.procs`).
pub fn pids_in(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes `dirs` (child cgroups first: a directory with children is busy
/// too), retrying a busy one for up to `patience`; returns those left.
pub async fn remove(dirs: Vec<PathBuf>, patience: Duration) -> Vec<PathBuf> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut left = Vec::new();
    for d in dirs {
        loop {
            match remove_tree(&d) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    warn!(dir = %d.display(), error = %e, "could not remove a VM's cgroup");
                    left.push(d);
                    break;
                }
            }
        }
    }
    left
}

/// `rmdir` of a cgroup and its child cgroups, deepest first (a cgroup's
/// control files cannot be unlinked; the directory goes with `rmdir`).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => {
            if r.is_ok() {
                debug!(dir = %dir.display(), "removed cgroup");
            }
            r
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
        cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
        cgroup2 /mnt/my\\040cgroups cgroup2 rw 0 0\n\
        proc /proc proc rw 0 0\n";

    #[test]
    fn mounts_of_each_version_are_found_in_proc_mounts() {
        let v1: Vec<String> = roots_in(HYBRID, 1).iter().map(|p| p.display().to_string()).collect();
        assert_eq!(v1, ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory"]);
        let v2: Vec<String> = roots_in(HYBRID, 2).iter().map(|p| p.display().to_string()).collect();
        assert_eq!(v2, ["/sys/fs/cgroup/unified", "/mnt/my cgroups"]);
        assert!(roots_in("garbage\n\n", 1).is_empty());
    }

    #[tokio::test]
    async fn removal_takes_child_directories_and_reports_what_is_left() {
        // Plain directories stand in for cgroups (rmdir works on both).
        let tmp = tempfile::tempdir().unwrap();
        let roots = vec![tmp.path().join("cpu"), tmp.path().join("memory"), tmp.path().join("pids")];
        for r in &roots[..2] {
            std::fs::create_dir_all(r.join("firecracker/vm-1/sub")).unwrap();
        }
        std::fs::create_dir_all(roots[0].join("firecracker/vm-2")).unwrap();
        let dirs = dirs_of(&roots, "firecracker", "vm-1");
        assert_eq!(dirs.len(), 2, "only where it exists");
        assert!(remove(dirs, Duration::from_millis(100)).await.is_empty());
        assert!(dirs_of(&roots, "firecracker", "vm-1").is_empty());
        assert!(roots[0].join("firecracker/vm-2").is_dir(), "another VM's stays");
        // A directory that cannot go (here: holds a file) is reported, not retried forever.
        std::fs::create_dir_all(roots[0].join("firecracker/vm-3")).unwrap();
        std::fs::write(roots[0].join("firecracker/vm-3/x"), b"").unwrap();
        let left = remove(dirs_of(&roots, "firecracker", "vm-3"), Duration::from_millis(100)).await;
        assert_eq!(left, [roots[0].join("firecracker/vm-3")]);
        assert!(pids_in(&roots[0].join("firecracker/vm-3")).is_empty());
    }
}
