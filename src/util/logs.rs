//! Bounded log files that another process writes: the per-VM logs the
//! hypervisors keep in a VM's directory (serial console, the VMM's own
//! output and log).
//!
//! The writers are hypervisor processes that outlive metald, so metald
//! cannot reopen their files; it rotates them in place. When a file holds
//! more than the cap, its bytes are copied to `<name>.1` (replacing the old
//! `.1` by a rename) and then dropped from the original:
//!
//! - [`Writer::Appends`] (the file is open with `O_APPEND`: QEMU's
//!   `append=on` chardev, the stdout/stderr metald opens for a VMM): the
//!   original is truncated to zero; the writer's next write lands at the new
//!   end.
//! - [`Writer::KeepsOffset`] (opened without `O_APPEND`, e.g. Firecracker's
//!   own log file): truncating would leave the writer writing at its old
//!   offset, so the bytes are deallocated instead (a hole punched over
//!   them, the size kept); the file's apparent size grows but the disk it
//!   takes is bounded. Its live bytes are those after the hole.
//!
//! Bytes written between the copy and the truncation are lost (the window
//! is one copy of at most the cap; the usual copy-truncate trade-off).
//! Readers: [`history`] (the rotated part then the current one) and
//! [`tail`].

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

/// How the process writing a log file opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// With `O_APPEND`: every write goes to the current end.
    Appends,
    /// Without `O_APPEND`: the writer keeps its own offset.
    KeepsOffset,
}

/// A log file metald keeps bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub path: PathBuf,
    pub writer: Writer,
}

impl LogFile {
    pub fn appended(path: PathBuf) -> LogFile {
        LogFile { path, writer: Writer::Appends }
    }

    pub fn at_offset(path: PathBuf) -> LogFile {
        LogFile { path, writer: Writer::KeepsOffset }
    }
}

/// `<path>.1`: where the bytes of the last rotation are.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Where the live bytes of `f` start: 0, or after a punched hole (the
/// size when the file has no data at all).
fn data_start(f: &File, len: u64) -> io::Result<u64> {
    match lseek(f.as_fd(), 0, Whence::SeekData) {
        Ok(off) => Ok(u64::try_from(off).unwrap_or(0)),
        // No data after offset 0: all hole (or empty).
        Err(Errno::ENXIO) => Ok(len),
        // A file system without SEEK_DATA: the whole file is data.
        Err(Errno::EINVAL) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The live bytes of the file at `path`: `(start, end)` offsets.
pub fn live_range(path: &Path) -> io::Result<(u64, u64)> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    Ok((data_start(&f, len)?, len))
}

/// Rotates `log` when it holds more than `max_bytes` (see the module doc).
/// Returns whether it did; a missing file is not an error (the VM has not
/// written it yet).
pub fn rotate(log: &LogFile, max_bytes: u64) -> io::Result<bool> {
    let mut f = match std::fs::OpenOptions::new().read(true).write(true).open(&log.path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len <= max_bytes {
        return Ok(false);
    }
    let start = match log.writer {
        Writer::Appends => 0,
        Writer::KeepsOffset => data_start(&f, len)?,
    };
    if len - start <= max_bytes {
        return Ok(false);
    }
    let rotated = rotated_path(&log.path);
    let mut tmp = rotated.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut out = File::create(&tmp)?;
        f.seek(SeekFrom::Start(start))?;
        // `io::copy` between files uses copy_file_range.
        io::copy(&mut (&f).take(len - start), &mut out)?;
        out.flush()?;
    }
    std::fs::rename(&tmp, &rotated)?;
    match log.writer {
        Writer::Appends => f.set_len(0)?,
        Writer::KeepsOffset => {
            let end = i64::try_from(len).unwrap_or(i64::MAX);
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            fallocate(f.as_fd(), flags, 0, end)?;
        }
    }
    Ok(true)
}

/// One part of a log's history: bytes `start..end` of `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

/// The history of the log at `path` as parts in order: the rotated part
/// (when there is one), then the live bytes of the current file; at most
/// the last `max` bytes of them when `max` is given. Missing files are
/// empty.
pub fn history(path: &Path, max: Option<u64>) -> io::Result<Vec<Part>> {
    let range = |p: &Path| match live_range(p) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let rotated = rotated_path(path);
    let mut parts = Vec::new();
    for p in [rotated.as_path(), path] {
        if let Some((start, end)) = range(p)?
            && end > start
        {
            parts.push(Part { path: p.to_path_buf(), start, end });
        }
    }
    if let Some(mut budget) = max {
        for part in parts.iter_mut().rev() {
            let n = (part.end - part.start).min(budget);
            part.start = part.end - n;
            budget -= n;
        }
        parts.retain(|p| p.end > p.start);
    }
    Ok(parts)
}

/// Reads bytes `start..end` of `path`, at most `limit` of them (fewer when
/// the file is shorter now).
pub fn read_range(path: &Path, start: u64, end: u64, limit: usize) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(start))?;
    let want = end.saturating_sub(start).min(u64::try_from(limit).unwrap_or(u64::MAX));
    let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(limit));
    f.take(want).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The last `max` bytes of the log at `path` across a rotation (the end of
/// `.1` first when the current file holds fewer).
pub fn tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for part in history(path, Some(max))? {
        let limit = usize::try_from(part.end - part.start).unwrap_or(usize::MAX);
        out.extend(read_range(&part.path, part.start, part.end, limit)?);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn an_appended_log_over_the_cap_is_copied_then_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::appended(dir.path().join("console.log"));
        assert!(!rotate(&log, 10).unwrap(), "a missing file is left alone");
        append(&log.path, b"0123456789");
        assert!(!rotate(&log, 10).unwrap(), "at the cap: kept");
        // The writer keeps its descriptor across the rotation.
        let mut writer = std::fs::OpenOptions::new().append(true).open(&log.path).unwrap();
        writer.write_all(b"abc").unwrap();
        assert!(rotate(&log, 10).unwrap());
        assert_eq!(std::fs::read(rotated_path(&log.path)).unwrap(), b"0123456789abc");
        assert_eq!(std::fs::metadata(&log.path).unwrap().len(), 0);
        writer.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&log.path).unwrap(), b"new", "the writer's next bytes start the file");
        // A second rotation replaces `.1`.
        writer.write_all(b"-0123456789").unwrap();
        assert!(rotate(&log, 10).unwrap());
        assert_eq!(std::fs::read(rotated_path(&log.path)).unwrap(), b"new-0123456789");
        assert!(!dir.path().join("console.log.1.tmp").exists());
    }

    #[test]
    fn a_log_written_at_an_offset_gets_a_hole_and_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::at_offset(dir.path().join("firecracker.log"));
        let mut writer = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&log.path).unwrap();
        let block = vec![b'x'; 64 * 1024];
        for _ in 0..4 {
            writer.write_all(&block).unwrap();
        }
        assert!(rotate(&log, 100 * 1024).unwrap());
        assert_eq!(std::fs::metadata(rotated_path(&log.path)).unwrap().len(), 256 * 1024);
        let meta = std::fs::metadata(&log.path).unwrap();
        assert_eq!(meta.len(), 256 * 1024, "the writer's offset stays valid");
        assert!(meta.blocks() * 512 < 64 * 1024, "the bytes are deallocated: {} blocks", meta.blocks());
        writer.write_all(b"after").unwrap();
        let (start, end) = live_range(&log.path).unwrap();
        assert!(start >= 192 * 1024 && end == 256 * 1024 + 5, "{start}..{end}");
        assert!(!rotate(&log, 100 * 1024).unwrap(), "the live bytes are under the cap");
        let t = tail(&log.path, 5).unwrap();
        assert_eq!(t, b"after");
    }

    #[test]
    fn history_is_the_rotated_part_then_the_current_one_and_tail_spans_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert!(history(&path, None).unwrap().is_empty());
        append(&rotated_path(&path), b"old-old");
        append(&path, b"new");
        let parts = history(&path, None).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].path.clone(), parts[0].start, parts[0].end), (rotated_path(&path), 0, 7));
        assert_eq!((parts[1].path.clone(), parts[1].start, parts[1].end), (path.clone(), 0, 3));
        assert_eq!(tail(&path, 5).unwrap(), b"ldnew");
        assert_eq!(tail(&path, 2).unwrap(), b"ew");
        assert_eq!(tail(&path, 100).unwrap(), b"old-oldnew");
        let parts = history(&path, Some(3)).unwrap();
        assert_eq!(parts.len(), 1, "the rotated part is not needed: {parts:?}");
        assert_eq!(read_range(&path, 1, 3, 1).unwrap(), b"e");
    }
}
