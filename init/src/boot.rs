//! From the initramfs to the workload's root: the early mounts, kernel modules (the initramfs
//! carries the `.ko` files of its kernel and ordered lists in `/etc/metald/`), the two disks
//! (read-only base as ext4 or erofs, writable ext4), the overlay over them, and the switch into
//! it: `/proc`, `/sys` and `/dev` are moved, the initramfs is emptied (as busybox `switch_root`
//! does: every file on the initramfs device, never crossing into a mount) and the new root is
//! moved over `/`.

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, chroot};

/// Where the base image is mounted inside the initramfs.
pub const BASE_MNT: &str = "/mnt/base";
/// Where the writable disk is mounted inside the initramfs.
pub const RW_MNT: &str = "/mnt/rw";
/// Where the overlay is assembled before it becomes `/`.
pub const NEW_ROOT: &str = "/newroot";
/// Base filesystem types, with the module list that provides each (`None`: built into the
/// kernel).
const EXT4: (&str, Option<&str>) = ("ext4", None);
const EROFS: (&str, Option<&str>) = ("erofs", Some("/etc/metald/modules-erofs"));
/// erofs's superblock magic, little-endian at byte 1024.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;

/// The order to try the base's types in, from its first 2 KiB: erofs first when its magic is
/// there (so the kernel does not log a failed ext4 mount on the console), else ext4 first.
pub fn base_types(head: &[u8]) -> [(&'static str, Option<&'static str>); 2] {
    let magic = head.get(1024..1028).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic == Some(EROFS_MAGIC) { [EROFS, EXT4] } else { [EXT4, EROFS] }
}

/// An error with what was being done.
#[derive(Debug)]
pub struct BootError(pub String);

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BootError {}

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BootError {
    BootError(format!("{what}: {e}"))
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> nix::Result<()> {
    mount(Some(src), target, Some(fstype), flags, data)
}

/// `/proc`, `/sys`, `/dev` (devtmpfs) of the initramfs, and the console as fds 0, 1, 2.
pub fn early_mounts() -> Result<(), BootError> {
    for (src, target, fstype) in
        [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs")]
    {
        fs::create_dir_all(target).map_err(|e| fail(target, e))?;
        match mount_fs(src, target, fstype, MsFlags::MS_NOSUID, None) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(fail(format!("mount {fstype} on {target}"), e)),
        }
    }
    // The kernel opened /dev/console (the initramfs has the node) as 0, 1, 2 for us; make sure.
    if let Ok(fd) = open("/dev/console", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = nix::unistd::dup2_stdin(&fd);
        let _ = nix::unistd::dup2_stdout(&fd);
        let _ = nix::unistd::dup2_stderr(&fd);
    }
    Ok(())
}

/// Loads the modules named in `list` (one a line, dependencies first) from
/// `/lib/modules/<release>/`; one already loaded (or built in) is skipped.
pub fn load_modules(list: &str) -> Result<(), BootError> {
    let names = fs::read_to_string(list).map_err(|e| fail(list, e))?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|e| fail("kernel release", e))?;
    let dir = Path::new("/lib/modules").join(release.trim());
    for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        if Path::new("/sys/module").join(name).exists() {
            continue;
        }
        let path = dir.join(format!("{name}.ko"));
        let file = File::open(&path).map_err(|e| fail(path.display(), e))?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(fail(format!("loading module {name}"), e)),
        }
    }
    Ok(())
}

/// Waits (up to `timeout`) for a path to appear, e.g. a block device node.
pub fn wait_for(path: &str, timeout: Duration) -> Result<(), BootError> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > timeout {
            return Err(BootError(format!("{path} did not appear within {} s", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Mounts the base image read-only, trying the types in [`base_types`] order; returns the type.
pub fn mount_base(dev: &str) -> Result<&'static str, BootError> {
    fs::create_dir_all(BASE_MNT).map_err(|e| fail(BASE_MNT, e))?;
    let mut head = [0u8; 2048];
    let _ = File::open(dev).and_then(|mut f| io::Read::read_exact(&mut f, &mut head));
    let mut tried = Vec::new();
    for (fstype, modules) in base_types(&head) {
        if let Some(Err(e)) = modules.map(load_modules) {
            tried.push(format!("{fstype}: {e}"));
            continue;
        }
        match mount_fs(dev, BASE_MNT, fstype, MsFlags::MS_RDONLY | MsFlags::MS_NODEV, None) {
            Ok(()) => return Ok(fstype),
            Err(e) => tried.push(format!("{fstype}: {e}")),
        }
    }
    Err(BootError(format!("cannot mount the base image {dev} read-only ({})", tried.join("; "))))
}

/// Mounts the writable disk, then the overlay (lower = base, upper = `<rw>/root`, work =
/// `<rw>/work`) on [`NEW_ROOT`]; returns an `O_PATH` descriptor of the writable disk's mount, so
/// it can be remounted read-only at power-off once it is out of sight.
pub fn mount_overlay(rw_dev: &str) -> Result<OwnedFd, BootError> {
    fs::create_dir_all(RW_MNT).map_err(|e| fail(RW_MNT, e))?;
    mount_fs(rw_dev, RW_MNT, "ext4", MsFlags::MS_NODEV, None)
        .map_err(|e| fail(format!("mount the writable disk {rw_dev} (ext4)"), e))?;
    for d in ["root", "work"] {
        let p = Path::new(RW_MNT).join(d);
        fs::create_dir_all(&p).map_err(|e| fail(p.display(), e))?;
    }
    load_modules("/etc/metald/modules-overlay")?;
    fs::create_dir_all(NEW_ROOT).map_err(|e| fail(NEW_ROOT, e))?;
    let opts = format!("lowerdir={BASE_MNT},upperdir={RW_MNT}/root,workdir={RW_MNT}/work");
    mount_fs("overlay", NEW_ROOT, "overlay", MsFlags::empty(), Some(&opts)).map_err(|e| fail("mount overlay", e))?;
    open(RW_MNT, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| fail(RW_MNT, e))
}

/// Moves `/proc`, `/sys`, `/dev` into [`NEW_ROOT`], empties the initramfs and makes
/// [`NEW_ROOT`] the root (`/`) of this process and of everything it starts.
pub fn switch_root() -> Result<(), BootError> {
    for d in ["proc", "sys", "dev"] {
        let target = format!("{NEW_ROOT}/{d}");
        fs::create_dir_all(&target).map_err(|e| fail(&target, e))?;
        mount(Some(format!("/{d}").as_str()), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| fail(format!("move /{d}"), e))?;
    }
    let root_dev = fs::symlink_metadata("/").map_err(|e| fail("/", e))?.dev();
    empty_dir(Path::new("/"), root_dev);
    chdir(NEW_ROOT).map_err(|e| fail(NEW_ROOT, e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| fail("move the new root", e))?;
    chroot(".").map_err(|e| fail("chroot", e))?;
    chdir("/").map_err(|e| fail("chdir /", e))
}

/// Removes everything under `dir` that lives on device `dev` (best effort: the initramfs is
/// memory, a file left behind only costs its size).
fn empty_dir(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if meta.dev() != dev {
            continue; // a mount point (the disks, the new root)
        }
        if meta.is_dir() {
            empty_dir(&path, dev);
            let _ = fs::remove_dir(&path); // fails (EBUSY) for a directory with a mount on it
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// In the new root: `/dev/pts`, `/dev/shm`, `/run` (tmpfs) and `/tmp` when the image has none.
pub fn late_mounts() -> Result<(), BootError> {
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 3] = [
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666")),
        ("shm", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=755")),
    ];
    for (src, target, fstype, flags, data) in mounts {
        fs::create_dir_all(target).map_err(|e| fail(target, e))?;
        mount_fs(src, target, fstype, flags, data).map_err(|e| fail(format!("mount {fstype} on {target}"), e))?;
    }
    if !Path::new("/tmp").exists() {
        fs::create_dir_all("/tmp").map_err(|e| fail("/tmp", e))?;
        fs::set_permissions("/tmp", std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .map_err(|e| fail("/tmp", e))?;
    }
    Ok(())
}

/// Writes `/etc/<name>` in the new root as a regular file (replacing a symlink, which could
/// point anywhere, e.g. into a systemd runtime directory the workload does not have).
pub fn write_etc(name: &str, content: &str) -> io::Result<()> {
    fs::create_dir_all("/etc")?;
    let path = Path::new("/etc").join(name);
    if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        fs::remove_file(&path)?;
    }
    fs::write(&path, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erofs_is_tried_first_only_with_its_magic() {
        let mut head = vec![0u8; 2048];
        assert_eq!(base_types(&head)[0].0, "ext4");
        head[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(base_types(&head)[0].0, "ext4");
        head[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        assert_eq!(base_types(&head).map(|t| t.0), ["erofs", "ext4"]);
        assert_eq!(base_types(&head[..100])[0].0, "ext4", "a short read");
    }
}
