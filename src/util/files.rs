//! Files the way saved guests need them: disk copies that cost no space
//! until written (a reflink where the file system shares extents, else a
//! sparse copy of the data extents only), durable directories (every file
//! and the directory itself synced before a rename publishes them), and
//! the space a tree takes.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Whence, lseek};

/// Copies `from` to `to` (created, must not exist): a reflink where the
/// file system can share extents (XFS, btrfs), else only the data extents
/// (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`), so a mostly empty disk
/// image costs what it holds. Returns the bytes copied (0 for a reflink).
pub fn copy_disk(from: &Path, to: &Path) -> io::Result<u64> {
    if reflink_copy::reflink(from, to).is_ok() {
        return Ok(0);
    }
    // reflink may have created `to` before failing.
    let _ = std::fs::remove_file(to);
    copy_sparse(from, to)
}

/// The sparse half of [`copy_disk`]; hand-written because no maintained
/// crate copies by extents (`std::fs::copy` writes the holes out).
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    dst.set_len(len)?;
    let len = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut copied = 0u64;
    let mut pos = 0i64;
    while pos < len {
        let data = match lseek(&src, pos, Whence::SeekData) {
            Ok(off) => off,
            // No data after `pos`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&src, data, Whence::SeekHole).map_err(io::Error::from)?.min(len);
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(1 << 30);
            let n = nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), want)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while copied", from.display()),
                ));
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Copies the first `len` bytes of the open file `src` (e.g. a guest's RAM
/// memfd) to a new sparse file `to`: ranges never written (holes) and
/// 4 KiB blocks of zeros are left as holes. Returns the bytes written.
pub fn copy_nonzero(src: &File, to: &Path, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    dst.set_len(len)?;
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos = 0i64;
    while pos < end {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(off) => off,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole).map_err(io::Error::from)?.min(end);
        let mut off = data;
        while off < hole {
            let n = usize::try_from(hole - off).unwrap_or(CHUNK).min(CHUNK);
            let at = u64::try_from(off).unwrap_or(0);
            src.read_exact_at(&mut buf[..n], at)?;
            for (k, block) in buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    dst.write_all_at(block, at + (k * BLOCK) as u64)?;
                    written += block.len() as u64;
                }
            }
            off += i64::try_from(n).unwrap_or(i64::MAX);
        }
        pos = hole;
    }
    Ok(written)
}

/// Syncs every regular file directly in `dir`, then `dir` itself.
pub fn sync_dir_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Syncs a directory's entries (after a create, rename or remove in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes of disk the regular files directly in `dir` occupy (allocated
/// blocks, so sparse disk copies count what they hold).
pub fn dir_usage(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("disk");
        let mut f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        drop(f);
        let to = dir.path().join("copy");
        let copied = copy_sparse(&from, &to).unwrap();
        assert!(copied < 1 << 20, "copied {copied} bytes of a 64 MiB file holding 10");
        let (a, b) = (std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        assert!(std::fs::metadata(&to).unwrap().blocks() * 512 < 1 << 20);
        // copy_disk: same contents whichever way it went; never overwrites.
        let other = dir.path().join("other");
        copy_disk(&from, &other).unwrap();
        assert!(std::fs::read(&other).unwrap() == a);
        assert!(copy_sparse(&from, &to).is_err());
        sync_dir_tree(dir.path()).unwrap();
        // Zero blocks become holes too.
        let mut z = File::create(dir.path().join("zeros")).unwrap();
        z.write_all(&vec![0u8; 1 << 20]).unwrap();
        z.write_all(b"tail").unwrap();
        drop(z);
        let z = File::open(dir.path().join("zeros")).unwrap();
        let n = copy_nonzero(&z, &dir.path().join("zeros.copy"), (1 << 20) + 4).unwrap();
        assert_eq!(n, 4);
        let copy = std::fs::read(dir.path().join("zeros.copy")).unwrap();
        assert_eq!(copy.len(), (1 << 20) + 4);
        assert!(copy.ends_with(b"tail") && copy[..1 << 20].iter().all(|b| *b == 0));
        assert!(dir_usage(dir.path()).unwrap() < 4 << 20);
    }
}
