//! Firecracker's block and network counters, read from a named pipe.
//!
//! Firecracker writes one JSON line of *increments since the previous
//! flush* (~5.4 KB) to its `--metrics-path` at every `FlushMetrics` and
//! every 60 s by itself. A regular file there grows without bound (at
//! metald's one flush a second, ~470 MB a day per VM, and Firecracker
//! opens it without `O_APPEND`, so it cannot be truncated under it), so
//! metald makes the path a FIFO ([`make_fifo`]) and reads what is in it
//! after each flush ([`Acc::read`]): nothing is kept on disk but the
//! totals. Firecracker opens the path read-write and non-blocking, so it
//! never blocks on the pipe and never gets `SIGPIPE`; while metald does not
//! read (it is down) the pipe's 64 KiB hold about a dozen lines — ten
//! minutes of Firecracker's own flushes — and Firecracker drops the lines
//! that do not fit (their increments are lost, an undercount of disk and
//! network bytes only).
//!
//! The totals are cumulative (billing samples are), so they outlive a
//! metald restart: after every read that added lines they are written to
//! `<vm dir>/metrics-totals.json` with the process they belong to, before
//! anyone sees them; a restarted metald continues from there
//! ([`Acc::resume`]). A new Firecracker process (reboot, restore) starts
//! from zero, as its counters do.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::debug;

use super::api::MetricsLine;
use crate::backend::process::ProcessId;
use crate::backend::{BackendError, Result};

/// The FIFO's name (in the VM directory, or `/metrics.fifo` in the jail).
pub const FIFO: &str = "metrics.fifo";
/// The persisted totals, in the VM directory.
pub const TOTALS_FILE: &str = "metrics-totals.json";
/// At most this much is read per call (a full pipe is 64 KiB).
const MAX_READ: u64 = 1 << 20;

/// Makes `path` a fresh FIFO (mode 0600), owned by `owner` when given (a
/// jailed Firecracker's uid/gid).
pub fn make_fifo(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    crate::backend::process::remove_quiet(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR)
        .map_err(|e| BackendError::io(format!("creating the metrics FIFO {}", path.display()), e.into()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| BackendError::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// The totals file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    pid: u32,
    start_ticks: u64,
    totals: MetricsLine,
}

/// One Firecracker process's totals so far.
#[derive(Debug, Default)]
pub struct Acc {
    pub pid: Option<ProcessId>,
    pub totals: MetricsLine,
    pub last_flush: Option<Instant>,
    /// The start of a line not fully read yet.
    pending: Vec<u8>,
}

impl Acc {
    /// The totals of `pid` kept in `totals_file` (a restarted metald), or
    /// zero (a new process).
    pub fn resume(totals_file: &Path, pid: ProcessId) -> Acc {
        let saved = std::fs::read(totals_file).ok().and_then(|b| serde_json::from_slice::<Saved>(&b).ok());
        let totals = saved
            .filter(|s| s.pid == pid.pid && s.start_ticks == pid.start_ticks)
            .map(|s| s.totals)
            .unwrap_or_default();
        Acc { pid: Some(pid), totals, ..Acc::default() }
    }

    /// Adds the complete lines waiting in `fifo` and, when there were any,
    /// writes the totals to `totals_file` (replaced by rename).
    pub fn read(&mut self, fifo: &Path, totals_file: &Path) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(fifo)?;
        let mut buf = std::mem::take(&mut self.pending);
        match f.take(MAX_READ).read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |e| e + 1);
        self.pending = buf.split_off(end);
        if end == 0 {
            return Ok(());
        }
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<MetricsLine>(line) {
                Ok(m) => self.totals.add(&m),
                Err(e) => debug!(error = %e, "unparsable Firecracker metrics line"),
            }
        }
        let Some(pid) = self.pid else { return Ok(()) };
        let saved = Saved { pid: pid.pid, start_ticks: pid.start_ticks, totals: self.totals };
        let tmp = totals_file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved).unwrap_or_default())?;
        std::fs::rename(&tmp, totals_file)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    fn line(read_bytes: u64) -> String {
        format!(
            "{{\"utc_timestamp_ms\":1,\"block\":{{\"read_bytes\":{read_bytes}}},\"net\":{{\"rx_bytes_count\":1}}}}\n"
        )
    }

    #[test]
    fn lines_in_the_fifo_add_up_and_the_totals_outlive_the_reader() {
        let tmp = tempfile::tempdir().unwrap();
        let (fifo, totals) = (tmp.path().join(FIFO), tmp.path().join(TOTALS_FILE));
        make_fifo(&fifo, None).unwrap();
        // The writer end as Firecracker opens it: read-write, non-blocking.
        let mut fc =
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let me = ProcessId::of(std::process::id()).unwrap();
        let mut acc = Acc::resume(&totals, me);
        acc.read(&fifo, &totals).unwrap();
        assert_eq!(acc.totals, MetricsLine::default(), "an empty pipe adds nothing");
        assert!(!totals.exists());

        // Two lines and half of a third: the half waits for its end.
        let third = line(300);
        let (a, b) = third.split_at(10);
        fc.write_all(format!("{}{}{a}", line(100), line(200)).as_bytes()).unwrap();
        acc.read(&fifo, &totals).unwrap();
        assert_eq!((acc.totals.block.read_bytes, acc.totals.net.rx_bytes_count), (300, 2));
        fc.write_all(b.as_bytes()).unwrap();
        acc.read(&fifo, &totals).unwrap();
        assert_eq!(acc.totals.block.read_bytes, 600);

        // A restarted reader continues the same process's totals; another process starts at zero.
        assert_eq!(Acc::resume(&totals, me).totals.block.read_bytes, 600);
        let other = ProcessId { pid: me.pid, start_ticks: me.start_ticks + 1 };
        assert_eq!(Acc::resume(&totals, other).totals, MetricsLine::default());
        assert_eq!(std::fs::metadata(&fifo).unwrap().len(), 0, "nothing kept in the pipe's path");
    }
}
