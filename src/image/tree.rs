//! File system operations confined to one directory tree (the staging
//! directory a layer is applied to), safe by construction:
//!
//! * An archive path is split into components first ([`split`]): an
//!   absolute path, a `..` component or a path deeper than [`MAX_DEPTH`] is
//!   refused before anything is touched.
//! * A directory is reached from the tree's root descriptor one component at
//!   a time with `openat(O_DIRECTORY | O_NOFOLLOW)` ([`Tree::dir`]): a
//!   symbolic link anywhere on the way is refused (never followed), and so is
//!   anything that is not a directory. The descriptor reached therefore names
//!   a real directory inside the tree, whatever links earlier entries or
//!   earlier layers left in it (`a -> /etc` or `a -> ../..`, then `a/passwd`,
//!   is refused at `a`).
//! * Every change is then a `*at` system call on such a descriptor with a
//!   single component (never `.`, `..` or a `/`), and calls that could
//!   follow a final symbolic link use `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`,
//!   `O_EXCL` on creation, or act on a descriptor opened that way.
//!
//! So nothing here can create, change or remove anything outside the tree.
//! This assumes nobody else renames directories inside the tree meanwhile:
//! the staging directory is private to metald. (`openat2` with
//! `RESOLVE_BENEATH` would also do, but it resolves links *inside* the
//! tree, which image builders never need, and `nix` does not wrap it.)

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Deepest archive path accepted, in components. Also bounds the recursion
/// (and the descriptors held) when a directory is removed.
pub const MAX_DEPTH: usize = 128;

/// Why a tree operation did not happen.
#[derive(Debug)]
pub enum TreeError {
    /// The path (or what it walks through) is not allowed.
    Refused(String),
    /// A system call failed.
    Io {
        /// The operation.
        op: &'static str,
        /// What the system said.
        source: io::Error,
    },
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> TreeError {
    move |e| TreeError::Io { op, source: io::Error::from(e) }
}

/// The normal components of an archive path; `.` components are dropped
/// (`./` is the root itself: an empty list). Refused: absolute paths, `..`,
/// paths deeper than [`MAX_DEPTH`].
pub fn split(path: &Path) -> Result<Vec<OsString>, TreeError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err(TreeError::Refused("a `..` component".into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(TreeError::Refused("an absolute path".into()));
            }
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(TreeError::Refused(format!("deeper than {MAX_DEPTH} components")));
    }
    Ok(out)
}

/// A directory tree that operations are confined to (see the module doc).
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

impl Tree {
    /// Opens the tree rooted at `dir` (trusted: given by metald, not by an
    /// archive; it must exist and be a directory).
    pub fn open(dir: &Path) -> io::Result<Tree> {
        let root = nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(Tree { root })
    }

    /// The root's descriptor.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The directory at `comps` (from [`split`]), reached one component at a
    /// time without following links. A missing component is created (mode
    /// 0755, owned by metald) when `create` is set; otherwise `Ok(None)`.
    /// A symbolic link or non-directory on the way is refused.
    pub fn dir(&self, comps: &[OsString], create: bool) -> Result<Option<OwnedFd>, TreeError> {
        let mut fd = nix::unistd::dup(self.root.as_fd()).map_err(sys("dup"))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match openat(fd.as_fd(), c.as_os_str(), DIR_FLAGS, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(fd.as_fd(), c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(sys("mkdirat")(e)),
                    }
                    let next = openat(fd.as_fd(), c.as_os_str(), DIR_FLAGS, Mode::empty()).map_err(sys("openat"))?;
                    // Not the umask's choice: implicit parents are 0755.
                    fchmod(next.as_fd(), Mode::from_bits_truncate(0o755)).map_err(sys("fchmod"))?;
                    next
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let at = Path::new("").join(comps[..=i].iter().collect::<std::path::PathBuf>());
                    return Err(TreeError::Refused(format!(
                        "{} is a symbolic link or not a directory (never followed)",
                        at.display()
                    )));
                }
                Err(e) => return Err(sys("openat")(e)),
            };
            fd = next;
        }
        Ok(Some(fd))
    }

    /// Removes `name` in `dir` (a directory with everything in it; a
    /// symbolic link itself, never its target). `Ok(false)` if it did not
    /// exist.
    pub fn remove(dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool, TreeError> {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(sys("fstatat")(e)),
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            let sub = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(sys("openat"))?;
            Self::prune(sub, &mut Vec::new(), &mut |_| false, 0)?;
            unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(sys("unlinkat"))?;
        } else {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(sys("unlinkat"))?;
        }
        Ok(true)
    }

    /// Removes every entry below `dir` for which `keep(path)` is false
    /// (`path`: `prefix` plus the entry's components); directories that are
    /// kept are pruned the same way. Used for whiteouts (`keep` always
    /// false) and opaque directories (keep what this layer wrote).
    pub fn prune(
        dir: OwnedFd,
        prefix: &mut Vec<OsString>,
        keep: &mut dyn FnMut(&[OsString]) -> bool,
        depth: usize,
    ) -> Result<(), TreeError> {
        if depth > MAX_DEPTH {
            return Err(TreeError::Refused(format!("a tree deeper than {MAX_DEPTH} levels")));
        }
        let handle = nix::unistd::dup(dir.as_fd()).map_err(sys("dup"))?;
        let mut listing = Dir::from_fd(handle).map_err(sys("fdopendir"))?;
        let mut children = Vec::new();
        for e in listing.iter() {
            let e = e.map_err(sys("readdir"))?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name != "." && name != ".." {
                children.push((name.to_os_string(), e.file_type()));
            }
        }
        drop(listing);
        for (name, kind) in children {
            prefix.push(name);
            let name = prefix.last().map(OsString::as_os_str).unwrap_or_default();
            let result = if keep(prefix) {
                let is_dir = match kind {
                    Some(t) => t == Type::Directory,
                    None => {
                        let st = fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(sys("fstatat"))?;
                        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                    }
                };
                if is_dir {
                    let sub = openat(dir.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(sys("openat"))?;
                    Self::prune(sub, prefix, keep, depth + 1)
                } else {
                    Ok(())
                }
            } else {
                Self::remove(dir.as_fd(), name).map(drop)
            };
            prefix.pop();
            result?;
        }
        Ok(())
    }
}
