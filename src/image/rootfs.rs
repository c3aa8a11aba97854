//! The read-only base filesystem of an image: an ext4 file built from the
//! unpacked staging directory with `mkfs.ext4 -d` (e2fsprogs), without
//! mounting anything. ext4 because the Debian guest kernel has it built in
//! (erofs would need a module in the initramfs); no journal and no reserved
//! blocks, since the guest mounts it read-only under an overlay.
//!
//! The file appears atomically: it is built under a temporary name in the
//! destination's directory, synced and renamed; on failure the temporary
//! file is removed and nothing is left at the destination.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::ImageError;

/// How to run `mkfs.ext4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mkfs {
    /// The `mkfs.ext4` binary (a name looked up in `PATH`, or a path).
    pub program: PathBuf,
}

impl Default for Mkfs {
    fn default() -> Mkfs {
        Mkfs { program: PathBuf::from("mkfs.ext4") }
    }
}

/// What a directory needs: bytes of data (4 KiB blocks) and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    bytes: u64,
    inodes: u64,
}

const BLOCK: u64 = 4096;

/// Sums `dir` without following links (the staging directory is metald's).
fn usage(dir: &Path, seen: &mut HashSet<(u64, u64)>, out: &mut Usage) -> Result<(), ImageError> {
    let io_err = |op| move |source| ImageError::Io { op, path: dir.display().to_string(), source };
    for e in fs::read_dir(dir).map_err(io_err("read directory"))? {
        let e = e.map_err(io_err("read directory"))?;
        let md = fs::symlink_metadata(e.path()).map_err(io_err("stat"))?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue; // another name of a counted file
        }
        out.inodes += 1;
        out.bytes += md.len().div_ceil(BLOCK) * BLOCK + BLOCK;
        if md.is_dir() {
            usage(&e.path(), seen, out)?;
        }
    }
    Ok(())
}

/// The file size for `u`: data plus a tenth, inode tables (256 bytes each)
/// and 16 MiB of metadata room, rounded up to 4 MiB.
fn size_for(u: Usage) -> (u64, u64) {
    let inodes = u.inodes + u.inodes / 10 + 1024;
    let size = u.bytes + u.bytes / 10 + inodes * 256 + (16 << 20);
    (size.div_ceil(4 << 20) * (4 << 20), inodes)
}

/// Builds the ext4 base image of `dir` at `out` (replacing it atomically).
/// Returns the file's size. Tries once more at twice the size if the first
/// estimate was too small.
pub fn build_ext4(mkfs: &Mkfs, dir: &Path, out: &Path) -> Result<u64, ImageError> {
    let mut u = Usage::default();
    usage(dir, &mut HashSet::new(), &mut u)?;
    let (size, inodes) = size_for(u);
    let tmp = temp_name(out);
    let result = attempt(mkfs, dir, &tmp, size, inodes).or_else(|e| match e {
        ImageError::ToolFailed { .. } => attempt(mkfs, dir, &tmp, size * 2, inodes * 2),
        e => Err(e),
    });
    let result = result.and_then(|size| {
        let io_err = |op| move |source| ImageError::Io { op, path: out.display().to_string(), source };
        fs::rename(&tmp, out).map_err(io_err("rename into place"))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io_err("sync directory of"))?;
        }
        Ok(size)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Builds a VM's writable disk at `out`: a sparse ext4 of `size` bytes
/// (journaled: the guest writes to it) holding `metald/config.json` =
/// `config` (readable by root only), where metald-init reads it. Lazy
/// inode-table and journal initialisation keep the file sparse, so a new
/// disk costs a few MiB of host disk whatever its size. Atomic like
/// [`build_ext4`].
pub fn build_writable(mkfs: &Mkfs, config: &[u8], size: u64, out: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let io_err = |op, path: &Path| {
        let path = path.display().to_string();
        move |source| ImageError::Io { op, path, source }
    };
    let staging = tempfile::Builder::new()
        .prefix(".writable-")
        .tempdir_in(parent)
        .map_err(io_err("create staging directory in", parent))?;
    let meta = staging.path().join("metald");
    fs::DirBuilder::new().mode(0o700).create(&meta).map_err(io_err("create", &meta))?;
    let file = meta.join("config.json");
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file).map_err(io_err("create", &file))?;
    std::io::Write::write_all(&mut f, config).map_err(io_err("write", &file))?;
    drop(f);
    let tmp = temp_name(out);
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let disk = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err("create", &tmp))?;
        disk.set_len(size).map_err(io_err("size", &tmp))?;
        let output = Command::new(&mkfs.program)
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg("-d")
            .arg(staging.path())
            .arg(&tmp)
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| ImageError::ToolMissing { tool: mkfs.program.display().to_string(), source })?;
        if !output.status.success() {
            return Err(ImageError::ToolFailed {
                tool: mkfs.program.display().to_string(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().chars().take(2000).collect(),
            });
        }
        disk.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, out).map_err(io_err("rename into place", out))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_name(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn attempt(mkfs: &Mkfs, dir: &Path, tmp: &Path, size: u64, inodes: u64) -> Result<u64, ImageError> {
    let io_err = |op| move |source| ImageError::Io { op, path: tmp.display().to_string(), source };
    let _ = fs::remove_file(tmp);
    let file = OpenOptions::new().write(true).create_new(true).open(tmp).map_err(io_err("create"))?;
    file.set_len(size).map_err(io_err("size"))?;
    let output = Command::new(&mkfs.program)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256", "-O", "^has_journal"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(dir)
        .arg(tmp)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ImageError::ToolMissing { tool: mkfs.program.display().to_string(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.trim().chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(ImageError::ToolFailed {
            tool: mkfs.program.display().to_string(),
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    file.sync_all().map_err(io_err("sync"))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn builds_a_checked_ext4_with_modes_links_and_hard_links() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: mkfs.ext4 (e2fsprogs) is not installed");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("staging");
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        fs::write(dir.join("usr/bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(dir.join("usr/bin/tool"), dir.join("usr/bin/tool2")).unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
        fs::write(dir.join("big"), vec![7u8; 3 << 20]).unwrap();
        let out = base.path().join("base.ext4");
        fs::write(&out, b"old").unwrap();

        let size = build_ext4(&Mkfs::default(), &dir, &out).unwrap();
        assert_eq!(fs::metadata(&out).unwrap().len(), size);
        let names: Vec<_> = fs::read_dir(base.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&out).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        assert_eq!(debugfs(&out, "cat /usr/bin/tool"), "#!/bin/sh\necho hi\n");
        let stat = debugfs(&out, "stat /usr/bin/tool");
        assert!(stat.contains("Mode:  04755"), "{stat}");
        assert!(stat.contains("Links: 2"), "{stat}");
        assert!(debugfs(&out, "stat /bin").contains("Fast link dest: \"usr/bin\""));
    }

    #[test]
    fn a_writable_disk_is_sparse_and_holds_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("writable.ext4");
        build_writable(&Mkfs::default(), br#"{"version":1}"#, 1 << 30, &out).unwrap();
        assert_eq!(debugfs(&out, "cat /metald/config.json"), r#"{"version":1}"#);
        assert!(debugfs(&out, "stat /metald/config.json").contains("Mode:  0600"));
        let md = fs::metadata(&out).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert!(md.blocks() * 512 < 64 << 20, "sparse: {} bytes allocated", md.blocks() * 512);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["writable.ext4"], "no staging or temporary file left");
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&out).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    }

    #[test]
    fn a_failing_tool_leaves_nothing_behind() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("staging");
        fs::create_dir(&dir).unwrap();
        let out = base.path().join("base.ext4");
        let missing = Mkfs { program: PathBuf::from("/nonexistent/mkfs.ext4") };
        assert!(matches!(build_ext4(&missing, &dir, &out), Err(ImageError::ToolMissing { .. })));
        let failing = Mkfs { program: PathBuf::from("false") };
        assert!(matches!(build_ext4(&failing, &dir, &out), Err(ImageError::ToolFailed { .. })));
        let names: Vec<_> = fs::read_dir(base.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("staging")]);
    }
}
