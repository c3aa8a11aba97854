//! Running Firecracker under its `jailer` (see Firecracker's
//! `docs/jailer.md`).
//!
//! metald builds the jail directory `<chroot base>/<firecracker file
//! name>/<vm id>/root` itself before starting the jailer and puts into it
//! only what this VM uses: the kernel, initrd and disk images (hard links,
//! or copies when linking fails, e.g. across filesystems), plus an empty
//! log file and the metrics FIFO ([`super::metrics`]). metald never changes the owner or mode of a file it
//! did not make: files in the VM's own directory (an image VM's writable
//! disk, a clone's disk copies) and the jail's logs are chowned to the
//! jail's uid/gid; a writable disk elsewhere (an operator's asset) is
//! linked only when that uid/gid may already write it, and otherwise
//! refused (`InvalidArgument` saying what to change: a copy would take the
//! guest's writes away from the file the operator named); read-only assets
//! are linked as they are when that uid may read them, else copied and the
//! copy chowned. The jailer
//! then chroots, joins the network namespace, sets the cgroup limits,
//! drops to uid/gid and execs Firecracker; every path metald sends over
//! the API is relative to the jail root. metald itself needs no `unsafe`:
//! chroot, setns and setuid happen in the jailer.
//!
//! A restore's saved state and memory files go into the new jail the same
//! way (`/restore-vmstate`, `/restore-memory`, unlinked once loaded); a
//! save is written by Firecracker into its jail and moved out by metald
//! (see [`super::snapshot`]). Drives have the same jailed names in every
//! VM's jail (`/drive-<id>`), which is what lets a clone's jail hold its
//! own disk copies under the names its snapshot recorded.
//!
//! The jailer does not clean up: when the VM releases its process,
//! [`Jail::remove_cgroups`] removes the VM's cgroup directories (found from
//! `/proc/mounts`, see [`super::cgroups`]) and then [`Jail::remove`] the
//! jail; a jail directory left is the mark of a cleanup a crash cut short,
//! which the backend's start-up sweep finishes ([`Jail::sweep`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::cgroups;
use super::config::JailerSettings;
use crate::backend::process::ProcessId;
use crate::backend::{BackendError, Result};
use crate::model::{ValidSpec, VmId};

/// Path of the API socket inside the jail (`--api-sock`).
pub const JAILED_SOCKET: &str = "/firecracker.sock";
const CPU_PERIOD_US: u64 = 100_000;

/// One VM's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot base>/<exec file name>/<vm id>`, removed whole on cleanup.
    pub vm_dir: PathBuf,
    /// `<vm_dir>/root`, the jailed process's `/`.
    pub root: PathBuf,
    pub vm_id: VmId,
    exec_name: String,
}

impl Jail {
    pub fn new(settings: &JailerSettings, firecracker: &Path, vm_id: &VmId) -> Jail {
        let exec_name = exec_name(firecracker);
        let vm_dir = settings.chroot_base.join(&exec_name).join(vm_id.as_str());
        Jail { root: vm_dir.join("root"), vm_dir, vm_id: vm_id.clone(), exec_name }
    }

    /// The host path of a jail-relative path like `/vmlinux`.
    pub fn host_path(&self, jailed: &str) -> PathBuf {
        self.root.join(jailed.trim_start_matches('/'))
    }

    /// The netns path for this VM, when configured.
    pub fn netns(&self, settings: &JailerSettings) -> Option<String> {
        settings.netns.as_ref().map(|t| t.replace("{vm_id}", self.vm_id.as_str()))
    }

    /// Creates a fresh jail root holding `files` (`(host source, jailed
    /// name, writable)`) and the empty files in `empty` (jailed names).
    /// `own` is the VM's directory: what is in it is metald's to chown.
    pub fn prepare(
        &self,
        settings: &JailerSettings,
        files: &[(PathBuf, String, bool)],
        empty: &[&str],
        own: &Path,
    ) -> Result<()> {
        if !self.exec_name.contains("firecracker") {
            return Err(BackendError::unavailable(format!(
                "the jailer only runs binaries whose file name contains \"firecracker\", not {:?}",
                self.exec_name
            )));
        }
        if let Some(ns) = self.netns(settings)
            && !Path::new(&ns).exists()
        {
            return Err(BackendError::unavailable(format!(
                "network namespace {ns} does not exist (UNKEY_METALD_JAILER_NETNS); create it before the VM"
            )));
        }
        let owner = settings.owner();
        let own = own.canonicalize().unwrap_or_else(|_| own.to_path_buf());
        for (src, _, writable) in files {
            if *writable
                && let Some((uid, gid)) = owner
                && !src.canonicalize().is_ok_and(|s| s.starts_with(&own))
            {
                check_writable_by(src, uid, gid)?;
            }
        }
        self.remove();
        std::fs::create_dir_all(&self.root)
            .map_err(|e| BackendError::io(format!("creating jail {}", self.root.display()), e))?;
        for (src, name, writable) in files {
            let dst = self.host_path(name);
            if *writable && !src.canonicalize().is_ok_and(|s| s.starts_with(&own)) {
                link_shared(src, &dst)?;
            } else {
                link_or_copy(src, &dst, *writable, owner)?;
            }
        }
        for name in empty {
            let dst = self.host_path(name);
            std::fs::File::create(&dst).map_err(|e| BackendError::io(format!("creating {}", dst.display()), e))?;
            chown(&dst, owner)?;
        }
        Ok(())
    }

    /// The jailer's command line: its options, then `--` and Firecracker's.
    pub fn args(&self, settings: &JailerSettings, firecracker: &Path, spec: &ValidSpec) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.vm_id.as_str().into());
        push("--exec-file", firecracker.into());
        push("--uid", settings.uid.to_string().into());
        push("--gid", settings.gid.to_string().into());
        push("--chroot-base-dir", settings.chroot_base.clone().into());
        if let Some(ns) = self.netns(settings) {
            push("--netns", ns.into());
        }
        push("--cgroup-version", settings.cgroup_version.to_string().into());
        if let Some(p) = &settings.parent_cgroup {
            push("--parent-cgroup", p.into());
        }
        for c in cgroup_limits(settings, spec) {
            push("--cgroup", c.into());
        }
        a.push("--".into());
        a.push("--api-sock".into());
        a.push(JAILED_SOCKET.into());
        a
    }

    /// Deletes the jail and the VM's cgroups; missing pieces are fine.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.vm_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            debug!(dir = %self.vm_dir.display(), error = %e, "could not remove jail");
        }
    }

    /// The cgroup directories the jailer made for this VM (under every
    /// cgroup mount of the configured version).
    pub fn cgroup_dirs(&self, settings: &JailerSettings) -> Vec<PathBuf> {
        cgroups::dirs_of(
            &cgroups::roots(settings.cgroup_version),
            &parent_cgroup(settings, &self.exec_name),
            self.vm_id.as_str(),
        )
    }

    /// Removes the cgroup directories the jailer created for this VM. They
    /// can only go once the process has ended and been reaped: a busy one
    /// is retried for up to [`cgroups::BUSY_PATIENCE`]. Returns those left.
    pub async fn remove_cgroups(&self, settings: &JailerSettings) -> Vec<PathBuf> {
        cgroups::remove(self.cgroup_dirs(settings), cgroups::BUSY_PATIENCE).await
    }

    /// Cleans up after VMs that no longer exist: every jail under this
    /// backend's chroot base whose VM id is not in `live` (a cleanup a
    /// crash cut short) loses its remaining processes (the pids in its
    /// cgroups: a jailed VMM is found by its cgroup), its cgroups and its
    /// jail. Returns how many jails were swept.
    pub async fn sweep(settings: &JailerSettings, firecracker: &Path, live: &HashSet<String>) -> usize {
        let Ok(entries) = std::fs::read_dir(settings.chroot_base.join(exec_name(firecracker))) else { return 0 };
        let mut swept = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if live.contains(&name) || !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(id) = VmId::parse(&name) else { continue };
            let jail = Jail::new(settings, firecracker, &id);
            for d in jail.cgroup_dirs(settings) {
                for pid in cgroups::pids_in(&d) {
                    if let Ok(p) = ProcessId::of(pid) {
                        warn!(vm_id = %name, pid, "killing a jailed Firecracker no VM owns");
                        let _ = p.kill().await;
                    }
                }
            }
            let left = jail.remove_cgroups(settings).await;
            jail.remove();
            info!(vm_id = %name, cgroups_left = left.len(), "removed the jail and cgroups of a VM that no longer exists");
            swept += 1;
        }
        swept
    }
}

/// The file name of the Firecracker binary: the jailer's directory level
/// under the chroot base (and its default parent cgroup).
fn exec_name(firecracker: &Path) -> String {
    firecracker.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `--parent-cgroup`, or the jailer's default: the exec file's name.
fn parent_cgroup(settings: &JailerSettings, exec_name: &str) -> String {
    settings.parent_cgroup.clone().unwrap_or_else(|| exec_name.to_owned())
}

/// `--cgroup <file>=<value>` limits: CPU quota of `vcpus` whole CPUs and
/// guest memory plus the configured overhead.
pub fn cgroup_limits(settings: &JailerSettings, spec: &ValidSpec) -> Vec<String> {
    let mut out = Vec::new();
    let v2 = settings.cgroup_version == 2;
    if settings.cpu_limit {
        let quota = u64::from(spec.vcpus().max(1)) * CPU_PERIOD_US;
        out.push(if v2 { format!("cpu.max={quota} {CPU_PERIOD_US}") } else { format!("cpu.cfs_quota_us={quota}") });
    }
    if settings.memory_overhead_mb > 0 {
        let bytes = spec.memory_bytes().saturating_add(settings.memory_overhead_mb << 20);
        out.push(if v2 { format!("memory.max={bytes}") } else { format!("memory.limit_in_bytes={bytes}") });
    }
    out
}

/// An operator's writable disk must already be writable by the jail's
/// uid/gid: metald does not change its owner or mode.
fn check_writable_by(src: &Path, uid: u32, gid: u32) -> Result<()> {
    let meta = std::fs::metadata(src).map_err(|e| BackendError::io(format!("reading {}", src.display()), e))?;
    let mode = meta.mode();
    let ok = (meta.uid() == uid && mode & 0o200 != 0) || (meta.gid() == gid && mode & 0o020 != 0) || mode & 0o002 != 0;
    if ok {
        return Ok(());
    }
    Err(BackendError::unsupported(format!(
        "disk {} is writable in the VM's configuration but the jail's uid {uid} / gid {gid} \
         (UNKEY_METALD_JAILER_UID/_GID) cannot write it (owner {}:{}, mode {:o}); metald does not change an \
         asset's owner or mode: give that uid or gid write access, or make the disk read-only",
        src.display(),
        meta.uid(),
        meta.gid(),
        mode & 0o7777
    )))
}

/// An operator's writable disk goes into the jail as a hard link, owner and
/// mode untouched; never as a copy (the guest's writes would not reach the
/// file the operator named).
fn link_shared(src: &Path, dst: &Path) -> Result<()> {
    std::fs::hard_link(src, dst).map_err(|e| {
        BackendError::unsupported(format!(
            "disk {} is writable, so it must be linked into the jail (a copy would not get the guest's writes), \
             and linking failed: keep writable disks on the file system of UNKEY_METALD_JAILER_CHROOT_DIR",
            src.display()
        ))
        .caused_by(e)
    })
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let Some((uid, gid)) = owner else { return Ok(()) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| BackendError::io(format!("chown {}", path.display()), e))
}

/// Hard-links `src` to `dst`, copying when linking is impossible or when a
/// read-only source is neither world-readable nor the jail user's (a copy
/// can be chowned without touching the shared original). `chown_link`: the
/// file is metald's (in the VM's directory) and the jail writes it, so the
/// link is chowned (an operator's writable disk goes through
/// [`link_shared`] instead).
fn link_or_copy(src: &Path, dst: &Path, chown_link: bool, owner: Option<(u32, u32)>) -> Result<()> {
    let meta = std::fs::metadata(src).map_err(|e| BackendError::io(format!("reading {}", src.display()), e))?;
    let world_readable = meta.mode() & 0o004 != 0;
    let jail_users = owner.is_some_and(|(uid, _)| meta.uid() == uid && meta.mode() & 0o400 != 0);
    let may_link = chown_link || owner.is_none() || world_readable || jail_users;
    if may_link && std::fs::hard_link(src, dst).is_ok() {
        if chown_link {
            chown(dst, owner)?;
        }
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(|e| BackendError::io(format!("copying {} into the jail", src.display()), e))?;
    chown(dst, owner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    fn settings(base: &Path) -> JailerSettings {
        JailerSettings {
            uid: 123,
            gid: 100,
            chroot_base: base.to_path_buf(),
            netns: Some("/var/run/netns/{vm_id}".into()),
            ..JailerSettings::default()
        }
    }

    #[test]
    fn arguments_follow_the_jailer_usage() {
        let s = settings(Path::new("/srv/j"));
        let id = VmId::parse("vm-1").unwrap();
        let jail = Jail::new(&s, Path::new("/usr/bin/firecracker"), &id);
        assert_eq!(jail.root, Path::new("/srv/j/firecracker/vm-1/root"));
        let mut spec = VmSpec::default();
        spec.cpu.vcpus = 2;
        spec.memory.size_bytes = 256 << 20;
        let args: Vec<String> = jail
            .args(&s, Path::new("/usr/bin/firecracker"), &ValidSpec::unchecked(spec.clone()))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--id vm-1 --exec-file /usr/bin/firecracker --uid 123 --gid 100 --chroot-base-dir /srv/j \
             --netns /var/run/netns/vm-1 --cgroup-version 1 --cgroup cpu.cfs_quota_us=200000 \
             --cgroup memory.limit_in_bytes=402653184 -- --api-sock /firecracker.sock"
        );
        let v2 = JailerSettings { cgroup_version: 2, ..s };
        assert_eq!(
            cgroup_limits(&v2, &ValidSpec::unchecked(spec.clone())),
            vec!["cpu.max=200000 100000", "memory.max=402653184"]
        );
    }

    #[test]
    fn prepare_links_only_the_given_files_and_remove_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let s = JailerSettings { netns: None, uid: 0, gid: 0, ..settings(&tmp.path().join("jail")) };
        let jail = Jail::new(&s, Path::new("/x/firecracker"), &VmId::parse("a").unwrap());
        jail.prepare(&s, &[(kernel.clone(), "/vmlinux".into(), false)], &["/firecracker.log"], tmp.path()).unwrap();
        let linked = std::fs::metadata(jail.host_path("/vmlinux")).unwrap();
        assert_eq!(linked.ino(), std::fs::metadata(&kernel).unwrap().ino(), "hard link");
        assert!(jail.host_path("firecracker.log").exists());
        let names: Vec<_> = std::fs::read_dir(&jail.root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2);
        jail.remove();
        assert!(!jail.vm_dir.exists());
        assert!(kernel.exists(), "the original stays");

        let bad = Jail::new(&s, Path::new("/x/qemu"), &VmId::parse("a").unwrap());
        assert!(bad.prepare(&s, &[], &[], tmp.path()).is_err());
    }

    #[test]
    fn assets_keep_their_owner_and_mode_and_only_metalds_files_are_chowned() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: not root; skipping (chown needs it; make test runs as root)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (own, assets) = (tmp.path().join("vm"), tmp.path().join("assets"));
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&assets).unwrap();
        let s = JailerSettings { netns: None, uid: 4242, gid: 4243, ..settings(&tmp.path().join("jail")) };
        let jail = Jail::new(&s, Path::new("/x/firecracker"), &VmId::parse("a").unwrap());
        let file = |path: &Path, gid: u32, mode: u32| {
            std::fs::write(path, b"disk").unwrap();
            std::os::unix::fs::chown(path, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // metald's own file (in the VM directory): linked and chowned to the jail.
        let mine = own.join("disk-root.img");
        file(&mine, 0, 0o600);
        // An operator's disk the jail may write (its group, g+w): linked, owner and mode kept.
        let shared = assets.join("shared.img");
        file(&shared, 4243, 0o660);
        let files = [(mine.clone(), "/drive-root".into(), true), (shared.clone(), "/drive-data".into(), true)];
        jail.prepare(&s, &files, &[], &own).unwrap();
        let m = std::fs::metadata(&mine).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4243), "metald's file is the jail's");
        let m = std::fs::metadata(&shared).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 4243, 0o660), "the asset is unchanged");
        assert_eq!(std::fs::metadata(jail.host_path("/drive-data")).unwrap().ino(), m.ino(), "linked, not copied");

        // An operator's disk the jail cannot write: refused before the jail is made, saying what
        // to change; the asset is unchanged.
        jail.remove();
        let theirs = assets.join("theirs.img");
        file(&theirs, 0, 0o644);
        let e = jail.prepare(&s, &[(theirs.clone(), "/drive-x".into(), true)], &[], &own).unwrap_err();
        assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("cannot write it") && msg.contains("UNKEY_METALD_JAILER_UID"), "{msg}");
        let m = std::fs::metadata(&theirs).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o644));
        assert!(!jail.root.exists(), "no jail for a refused start");
    }
}
