//! Applying OCI image layers, lowest first, onto a staging directory
//! ([`Unpacker`]): tar, tar+gzip and tar+zstd ([`Compression`]); files,
//! directories, symbolic links, hard links, device nodes and FIFOs with
//! their owner, mode (setuid/setgid/sticky included) and modification time;
//! whiteouts (`.wh.<name>` removes `<name>` of a lower layer) and opaque
//! directories (`.wh..wh..opq` hides everything lower layers put in its
//! directory).
//!
//! Safety: every path goes through [`tree`](super::tree) (components
//! checked, each parent reached with `openat(O_NOFOLLOW)` from the root
//! descriptor, single-name `*at` calls), not through the `tar` crate's
//! `unpack_in`, whose per-layer checks say nothing about links left by an
//! earlier layer. Entries with `..`, absolute paths, paths through a
//! symbolic link (of this or an earlier layer) and hard links whose target
//! is not inside the root are refused with [`ImageError::Unsafe`] naming the
//! entry. Nothing outside the destination is created or changed.
//!
//! Limits ([`Limits`]) count over all layers of one [`Unpacker`]: bytes of
//! uncompressed tar stream (so a decompression bomb stops after the limit,
//! not at the end of the disk), bytes of file content written (a sparse
//! entry can expand beyond its stream), and entries.
//!
//! On any error the staging directory is left as it is, partly applied: the
//! caller removes it (`std::fs::remove_dir_all` does not follow links) and
//! never uses it.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev, mkdirat, mknodat,
    utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, linkat, symlinkat};
use tar::EntryType;

use super::error::ImageError;
use super::tree::{Tree, TreeError, split};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// tar + gzip.
    Gzip,
    /// tar + zstd.
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Result<Compression, ImageError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(ImageError::UnsupportedMediaType(other.to_string())),
        }
    }
}

/// Upper bounds for one image (all its layers together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of uncompressed tar stream, and (separately) bytes of file
    /// content written.
    pub max_bytes: u64,
    /// Archive entries (headers), whiteouts included.
    pub max_entries: u64,
}

impl Default for Limits {
    /// 8 GiB and one million entries.
    fn default() -> Limits {
        Limits { max_bytes: 8 << 30, max_entries: 1_000_000 }
    }
}

/// What one layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries read.
    pub entries: u64,
    /// Bytes of uncompressed tar stream read.
    pub bytes: u64,
}

/// Applies the layers of one image, lowest first, onto a staging directory.
#[derive(Debug)]
pub struct Unpacker {
    tree: Tree,
    limits: Limits,
    owners: bool,
    layer: usize,
    /// Uncompressed stream bytes read so far (shared with the reader).
    stream: Rc<Cell<u64>>,
    written: u64,
    entries: u64,
    /// File content goes through this (256 KiB: far fewer read/write calls
    /// than `io::copy`'s 8 KiB for multi-megabyte files).
    buf: Vec<u8>,
}

const COPY_BUF: usize = 256 << 10;

/// `io::copy` through `buf`.
fn copy_with(buf: &mut [u8], r: &mut impl Read, w: &mut File) -> io::Result<u64> {
    let mut n = 0u64;
    loop {
        let k = match r.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        io::Write::write_all(w, &buf[..k])?;
        n += k as u64;
    }
}

/// Counts the uncompressed bytes read and fails once past the limit.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    limit: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.count.get() > self.limit {
            return Err(io::Error::other("unpacked size limit reached"));
        }
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        if self.count.get() > self.limit {
            return Err(io::Error::other("unpacked size limit reached"));
        }
        Ok(n)
    }
}

/// One entry's identity for error messages and its checked components.
struct Named {
    entry: String,
    comps: Vec<OsString>,
}

impl Unpacker {
    /// An unpacker for the existing directory `dest` (normally empty).
    /// Owners are applied (metald runs as root); see [`Self::preserve_owners`].
    pub fn new(dest: &Path, limits: Limits) -> Result<Unpacker, ImageError> {
        let tree = Tree::open(dest).map_err(|source| ImageError::Io {
            op: "open staging directory",
            path: dest.display().to_string(),
            source,
        })?;
        Ok(Unpacker {
            tree,
            limits,
            owners: true,
            layer: 0,
            stream: Rc::default(),
            written: 0,
            entries: 0,
            buf: vec![0; COPY_BUF],
        })
    }

    /// Whether entries get the archive's uid/gid (needs `CAP_CHOWN`);
    /// without it everything belongs to the caller.
    pub fn preserve_owners(mut self, yes: bool) -> Unpacker {
        self.owners = yes;
        self
    }

    /// Applies the next layer (the first call is the lowest layer).
    pub fn apply(&mut self, blob: impl Read, compression: Compression) -> Result<LayerStats, ImageError> {
        let layer = self.layer;
        self.layer += 1;
        let start = (self.stream.get(), self.entries);
        let malformed = |source| ImageError::Malformed { layer, source };
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob).map_err(malformed)?),
        };
        let counted = Counted { inner: decoded, count: Rc::clone(&self.stream), limit: self.limits.max_bytes };
        let mut archive = tar::Archive::new(counted);
        // Paths this layer wrote (and their parents): an opaque directory
        // keeps them and removes the rest.
        let mut touched: HashSet<Vec<OsString>> = HashSet::new();
        // Directory times are set after the layer: entries inside change them.
        let mut dir_times: Vec<(Vec<OsString>, TimeSpec)> = Vec::new();
        let entries = archive.entries().map_err(|e| self.stream_error(e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.stream_error(e))?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ImageError::TooLarge {
                    layer,
                    entry: String::new(),
                    what: "entries",
                    limit: self.limits.max_entries,
                });
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let refused = |reason: String| ImageError::Unsafe { layer, entry: name.clone(), reason };
            let path = entry.path().map_err(|e| refused(e.to_string()))?.into_owned();
            let comps = split(&path).map_err(|e| self.tree_error(&name, e))?;
            let named = Named { entry: name.clone(), comps };
            self.entry(&mut entry, named, &mut touched, &mut dir_times)?;
        }
        for (comps, mtime) in dir_times.iter().rev() {
            // Gone or replaced by a later entry of this layer: nothing to do.
            if let Ok(Some(fd)) = self.tree.dir(comps, false) {
                futimens(fd.as_fd(), mtime, mtime).map_err(|e| ImageError::Apply {
                    layer,
                    entry: comps.join(OsString::from("/").as_os_str()).to_string_lossy().into_owned(),
                    op: "futimens",
                    source: e.into(),
                })?;
            }
        }
        Ok(LayerStats { entries: self.entries - start.1, bytes: self.stream.get() - start.0 })
    }

    fn stream_error(&self, source: io::Error) -> ImageError {
        let layer = self.layer.saturating_sub(1);
        if self.stream.get() > self.limits.max_bytes {
            ImageError::TooLarge { layer, entry: String::new(), what: "bytes", limit: self.limits.max_bytes }
        } else {
            ImageError::Malformed { layer, source }
        }
    }

    fn tree_error(&self, entry: &str, e: TreeError) -> ImageError {
        let layer = self.layer.saturating_sub(1);
        match e {
            TreeError::Refused(reason) => ImageError::Unsafe { layer, entry: entry.to_string(), reason },
            TreeError::Io { op, source } => ImageError::Apply { layer, entry: entry.to_string(), op, source },
        }
    }

    fn sys(&self, entry: &str, op: &'static str) -> impl FnOnce(Errno) -> ImageError + use<> {
        let (layer, entry) = (self.layer.saturating_sub(1), entry.to_string());
        move |e| ImageError::Apply { layer, entry, op, source: e.into() }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        named: Named,
        touched: &mut HashSet<Vec<OsString>>,
        dir_times: &mut Vec<(Vec<OsString>, TimeSpec)>,
    ) -> Result<(), ImageError> {
        let header = entry.header();
        let kind = header.entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let Named { entry: name, comps } = named;
        let Some((last, parent)) = comps.split_last() else {
            // `./`: the root itself keeps the staging directory's metadata.
            return Ok(());
        };
        let last_bytes = last.as_encoded_bytes();
        // Whiteouts: nothing is created for them.
        if last_bytes == b".wh..wh..opq" {
            let Some(dir) = self.tree.dir(parent, true).map_err(|e| self.tree_error(&name, e))? else {
                return Ok(());
            };
            mark(touched, parent);
            let mut prefix = parent.to_vec();
            Tree::prune(dir, &mut prefix, &mut |p| touched.contains(p), 0).map_err(|e| self.tree_error(&name, e))?;
            return Ok(());
        }
        if let Some(hidden) = last_bytes.strip_prefix(b".wh.") {
            if hidden.starts_with(b".wh.") {
                return Ok(()); // aufs bookkeeping (`.wh..wh.plnk`): nothing to apply
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(self.tree_error(&name, TreeError::Refused("an invalid whiteout".into())));
            }
            let hidden = OsStr::from_bytes(hidden).to_os_string();
            if let Some(dir) = self.tree.dir(parent, false).map_err(|e| self.tree_error(&name, e))? {
                Tree::remove(dir.as_fd(), &hidden).map_err(|e| self.tree_error(&name, e))?;
            }
            return Ok(());
        }

        let mode = Mode::from_bits_truncate(header.mode().map_err(|e| self.bad_header(&name, e))? & 0o7777);
        let mtime = header.mtime().map_err(|e| self.bad_header(&name, e))?;
        let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        let owner = if self.owners {
            let uid = header.uid().map_err(|e| self.bad_header(&name, e))?;
            let gid = header.gid().map_err(|e| self.bad_header(&name, e))?;
            let id = |v: u64| {
                u32::try_from(v)
                    .map_err(|_| self.tree_error(&name, TreeError::Refused(format!("owner id {v} out of range"))))
            };
            Some((Uid::from_raw(id(uid)?), Gid::from_raw(id(gid)?)))
        } else {
            None
        };
        let (uid, gid) = (owner.map(|o| o.0), owner.map(|o| o.1));
        let dev = (header.device_major(), header.device_minor());
        let link = entry.link_name().map_err(|e| self.bad_header(&name, e))?.map(|l| l.into_owned());

        let dir = self.tree.dir(parent, true).map_err(|e| self.tree_error(&name, e))?;
        let Some(dir) = dir else {
            return Err(self.tree_error(&name, TreeError::Refused("parent missing".into())));
        };
        let dir = dir.as_fd();
        mark(touched, &comps);
        match kind {
            EntryType::Directory => {
                let keep = matches!(fstatat(dir, last.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW),
                    Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
                if !keep {
                    Tree::remove(dir, last).map_err(|e| self.tree_error(&name, e))?;
                    mkdirat(dir, last.as_os_str(), Mode::from_bits_truncate(0o700))
                        .map_err(self.sys(&name, "mkdirat"))?;
                }
                let fd = openat(dir, last.as_os_str(), FLAGS_DIR, Mode::empty()).map_err(self.sys(&name, "openat"))?;
                self.own_and_mode(&name, fd.as_fd(), uid, gid, mode)?;
                dir_times.push((comps.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                Tree::remove(dir, last).map_err(|e| self.tree_error(&name, e))?;
                let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = openat(dir, last.as_os_str(), flags, Mode::from_bits_truncate(0o600))
                    .map_err(self.sys(&name, "create"))?;
                let mut file = File::from(fd);
                let room = self.limits.max_bytes.saturating_sub(self.written);
                let copied = copy_with(&mut self.buf, &mut entry.by_ref().take(room.saturating_add(1)), &mut file)
                    .map_err(|e| match self.stream_error(e) {
                        ImageError::TooLarge { layer, what, limit, .. } => {
                            ImageError::TooLarge { layer, entry: name.clone(), what, limit }
                        }
                        other => other,
                    })?;
                self.written = self.written.saturating_add(copied);
                if copied > room {
                    return Err(ImageError::TooLarge {
                        layer: self.layer.saturating_sub(1),
                        entry: name.clone(),
                        what: "bytes",
                        limit: self.limits.max_bytes,
                    });
                }
                // chown first: it clears setuid/setgid, the chmod restores them.
                self.own_and_mode(&name, file.as_fd(), uid, gid, mode)?;
                futimens(file.as_fd(), &mtime, &mtime).map_err(self.sys(&name, "futimens"))?;
            }
            EntryType::Symlink => {
                let target = link.filter(|t| !t.as_os_str().is_empty());
                let Some(target) = target else {
                    return Err(self.tree_error(&name, TreeError::Refused("a symbolic link without target".into())));
                };
                // The target is not checked: links are stored, never followed.
                Tree::remove(dir, last).map_err(|e| self.tree_error(&name, e))?;
                symlinkat(&target, dir, last.as_os_str()).map_err(self.sys(&name, "symlinkat"))?;
                if owner.is_some() {
                    fchownat(dir, last.as_os_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(self.sys(&name, "lchown"))?;
                }
                utimensat(dir, last.as_os_str(), &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
                    .map_err(self.sys(&name, "utimensat"))?;
            }
            EntryType::Link => {
                let Some(target) = link else {
                    return Err(self.tree_error(&name, TreeError::Refused("a hard link without target".into())));
                };
                let tcomps = split(&target).map_err(|e| {
                    let TreeError::Refused(r) = e else { return self.tree_error(&name, e) };
                    self.tree_error(&name, TreeError::Refused(format!("hard link target {}: {r}", target.display())))
                })?;
                let Some((tlast, tparent)) = tcomps.split_last() else {
                    return Err(self.tree_error(&name, TreeError::Refused("a hard link to the root".into())));
                };
                if tcomps == comps {
                    return Ok(());
                }
                let tdir = self.tree.dir(tparent, false).map_err(|e| self.tree_error(&name, e))?;
                let Some(tdir) = tdir else {
                    return Err(self.tree_error(
                        &name,
                        TreeError::Refused(format!("hard link target {} missing", target.display())),
                    ));
                };
                Tree::remove(dir, last).map_err(|e| self.tree_error(&name, e))?;
                // No AT_SYMLINK_FOLLOW: a link to a symbolic link is another
                // name for the link itself, not for what it points at.
                linkat(tdir.as_fd(), tlast.as_os_str(), dir, last.as_os_str(), AtFlags::empty())
                    .map_err(self.sys(&name, "linkat"))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = dev.0.map_err(|e| self.bad_header(&name, e))?.unwrap_or(0);
                let minor = dev.1.map_err(|e| self.bad_header(&name, e))?.unwrap_or(0);
                Tree::remove(dir, last).map_err(|e| self.tree_error(&name, e))?;
                mknodat(
                    dir,
                    last.as_os_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(self.sys(&name, "mknodat"))?;
                // Just created by metald (O_EXCL-like: mknod fails on an
                // existing name), so it is not a link.
                if owner.is_some() {
                    fchownat(dir, last.as_os_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(self.sys(&name, "lchown"))?;
                }
                fchmodat(dir, last.as_os_str(), mode, FchmodatFlags::FollowSymlink)
                    .map_err(self.sys(&name, "chmod"))?;
                utimensat(dir, last.as_os_str(), &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
                    .map_err(self.sys(&name, "utimensat"))?;
            }
            other => {
                return Err(self.tree_error(&name, TreeError::Refused(format!("unsupported entry type {other:?}"))));
            }
        }
        Ok(())
    }

    fn own_and_mode(
        &self,
        name: &str,
        fd: BorrowedFd<'_>,
        uid: Option<Uid>,
        gid: Option<Gid>,
        mode: Mode,
    ) -> Result<(), ImageError> {
        if uid.is_some() || gid.is_some() {
            fchown(fd, uid, gid).map_err(self.sys(name, "fchown"))?;
        }
        fchmod(fd, mode).map_err(self.sys(name, "fchmod"))
    }

    fn bad_header(&self, entry: &str, source: io::Error) -> ImageError {
        let layer = self.layer.saturating_sub(1);
        ImageError::Apply { layer, entry: entry.to_string(), op: "read header", source }
    }
}

const FLAGS_DIR: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Records `path` and its parents as written by this layer.
fn mark(touched: &mut HashSet<Vec<OsString>>, path: &[OsString]) {
    for n in 1..=path.len() {
        touched.insert(path[..n].to_vec());
    }
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;
