//! Per-VM logs: keeping every log a VM's hypervisor writes bounded
//! ([`Manager::rotate_logs`], run by [`rotation_task`]; the files come from
//! [`crate::backend::Backend::log_files`], the mechanics from
//! [`crate::util::logs`]), and a VM's serial console as its owner reads it
//! ([`Manager::console`], `StreamConsole`): its history, the rotated part
//! first, then with `follow` new output as the guest writes it, across
//! rotations, until the VM is deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Manager, Slot};
use crate::error::Error;
use crate::model::{CustomerId, VmId};
use crate::util::logs::{self, Part};

/// Default cap of one VM log file (`UNKEY_METALD_VM_LOG_MAX_BYTES`).
pub const DEFAULT_VM_LOG_MAX_BYTES: u64 = 8 << 20;
/// Bounds of the cap: below this a boot's output would not fit; above, a
/// thousand VMs' logs would take terabytes.
pub const MIN_VM_LOG_MAX_BYTES: u64 = 64 << 10;
pub const MAX_VM_LOG_MAX_BYTES: u64 = 1 << 30;
/// How often the logs are checked against the cap.
pub const ROTATE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a following console stream looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Largest chunk of a console stream.
const CHUNK: usize = 64 << 10;

/// What a console stream sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleQuery {
    /// Go on with new output after the history, until the VM is deleted.
    pub follow: bool,
    /// At most this many bytes of history (its end); `None`: all that is kept.
    pub tail_bytes: Option<u64>,
}

impl Manager {
    /// Rotates every VM's logs that hold more than the cap (see
    /// [`crate::util::logs`]). Blocking file I/O: run it off the runtime.
    pub fn rotate_logs(&self) {
        let slots: Vec<Arc<Slot>> = self.index().by_id.values().cloned().collect();
        let max = self.inner.cfg.vm_log_max_bytes;
        for slot in slots {
            for log in self.inner.backend.log_files(&self.ctx(&slot)) {
                match logs::rotate(&log, max) {
                    Ok(true) => debug!(vm_id = %slot.id, log = %log.path.display(), "log rotated"),
                    Ok(false) => {}
                    Err(e) => warn!(vm_id = %slot.id, log = %log.path.display(), error = %e, "rotating a VM log"),
                }
            }
        }
    }

    /// The serial console of the caller's VM `id` as a stream of chunks
    /// (see the module doc). Another customer's VM is not found.
    pub fn console(
        &self,
        caller: &CustomerId,
        id: &VmId,
        q: ConsoleQuery,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static, Error> {
        let slot = self.lookup(caller, id)?;
        // Every backend writes the console to `console.log` in the VM's
        // directory; the runtime names it while a VMM runs.
        let path = slot
            .cell()
            .status
            .runtime()
            .and_then(|rt| rt.console_log.clone())
            .unwrap_or_else(|| self.vm_dir(&slot.id).join("console.log"));
        let reader =
            ConsoleReader { manager: self.clone(), slot, path, q, parts: None, pos: Pos::default(), done: false };
        Ok(futures::stream::unfold(reader, |mut r| async move {
            let next = r.next().await;
            next.map(|item| (item, r))
        }))
    }

    /// Whether `slot` is still the VM of its id (not deleted).
    fn exists(&self, slot: &Arc<Slot>) -> bool {
        self.index().by_id.get(&slot.id).is_some_and(|s| Arc::ptr_eq(s, slot))
    }
}

/// Checks every VM's logs each [`ROTATE_INTERVAL`] until `shutdown`.
pub async fn rotation_task(manager: Manager, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ROTATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = manager.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || m.rotate_logs()).await {
            warn!(error = %e, "log rotation task");
        }
    }
}

/// The state of one console stream.
struct ConsoleReader {
    manager: Manager,
    slot: Arc<Slot>,
    path: PathBuf,
    q: ConsoleQuery,
    /// History still to send (`None`: not looked at yet).
    parts: Option<Vec<Part>>,
    /// Following: how far has been sent.
    pos: Pos,
    done: bool,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{what} {}: {e}", path.display()))
}

/// A blocking read off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("console reader: {e}")))?
}

impl ConsoleReader {
    /// The next chunk; `None` when the stream ends.
    async fn next(&mut self) -> Option<Result<Vec<u8>, Error>> {
        if self.done {
            return None;
        }
        let r = self.step().await;
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }

    async fn step(&mut self) -> Option<Result<Vec<u8>, Error>> {
        if self.parts.is_none() {
            let (path, max) = (self.path.clone(), self.q.tail_bytes);
            match blocking(move || logs::history(&path, max).map_err(|e| io_error("reading", &path, e))).await {
                Ok(parts) => {
                    // Following goes on from the end of the current file as it was.
                    let offset = parts
                        .iter()
                        .find(|p| p.path == self.path)
                        .map_or_else(|| logs::live_range(&self.path).map_or(0, |(_, end)| end), |p| p.end);
                    self.pos = Pos { rotated: false, offset, seen: rotated_inode(&self.path) };
                    self.parts = Some(parts);
                }
                Err(e) => return Some(Err(e)),
            }
        }
        while let Some(part) = self.parts.as_mut().and_then(|p| p.first_mut()) {
            let (path, start, end) = (part.path.clone(), part.start, part.end);
            let chunk =
                blocking(move || logs::read_range(&path, start, end, CHUNK).map_err(|e| io_error("reading", &path, e)))
                    .await;
            let chunk = match chunk {
                // The file was rotated under the history: what is left of it is gone.
                Ok(c) if c.is_empty() => {
                    part.start = part.end;
                    None
                }
                Ok(c) => {
                    part.start += c.len() as u64;
                    Some(c)
                }
                Err(e) => return Some(Err(e)),
            };
            if part.start >= part.end
                && let Some(parts) = self.parts.as_mut()
            {
                parts.remove(0);
            }
            if let Some(c) = chunk {
                return Some(Ok(c));
            }
        }
        if !self.q.follow {
            return None;
        }
        self.follow().await
    }

    /// Waits for new output; `None` once the VM is deleted.
    async fn follow(&mut self) -> Option<Result<Vec<u8>, Error>> {
        loop {
            let (path, pos) = (self.path.clone(), self.pos);
            let found = blocking(move || new_output(&path, pos)).await;
            match found {
                Ok(Some((chunk, pos))) => {
                    self.pos = pos;
                    if !chunk.is_empty() {
                        return Some(Ok(chunk));
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if !self.manager.exists(&self.slot) {
                return None;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// Where a following stream is: `offset` into the current file, or into
/// its rotated part while it reads what a rotation moved there; `seen`:
/// the rotated part it knows (its inode, 0 for none; each rotation makes a
/// new one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pos {
    rotated: bool,
    offset: u64,
    seen: u64,
}

/// The inode of `path`'s rotated part (0 when there is none).
fn rotated_inode(path: &Path) -> u64 {
    std::fs::metadata(logs::rotated_path(path)).map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Output of the log at `path` after `pos`: a chunk (possibly empty) and
/// the position after it, or `None` when there is none yet. When the log
/// was rotated (a new `.1`, or the file is shorter than the offset), what
/// was written after the offset before the rotation is at the same place
/// in `.1` (copied from 0: the console is a log written to append), read
/// from there before the current file from its start. (Two rotations
/// between two looks lose the first one's part.)
fn new_output(path: &Path, pos: Pos) -> Result<Option<(Vec<u8>, Pos)>, Error> {
    let read =
        |p: &Path, start: u64, end: u64| logs::read_range(p, start, end, CHUNK).map_err(|e| io_error("reading", p, e));
    if pos.rotated {
        let rotated = logs::rotated_path(path);
        let chunk = match logs::live_range(&rotated) {
            Ok((_, end)) if end > pos.offset => read(&rotated, pos.offset, end)?,
            _ => Vec::new(),
        };
        let next = match chunk.len() {
            0 => Pos { rotated: false, offset: 0, seen: pos.seen },
            n => Pos { rotated: true, offset: pos.offset + n as u64, seen: pos.seen },
        };
        return Ok(Some((chunk, next)));
    }
    let (start, end) = match logs::live_range(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", path, e)),
    };
    let seen = rotated_inode(path);
    if seen != pos.seen || end < pos.offset {
        return Ok(Some((Vec::new(), Pos { rotated: true, offset: pos.offset, seen })));
    }
    if end == pos.offset {
        return Ok(None);
    }
    let from = pos.offset.max(start);
    let chunk = read(path, from, end)?;
    let next = Pos { rotated: false, offset: from + chunk.len() as u64, seen };
    Ok(Some((chunk, next)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn new_output_follows_a_log_across_its_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let at = |offset| Pos { rotated: false, offset, seen: 0 };
        assert_eq!(new_output(&path, at(0)).unwrap(), None, "no file yet");
        append(&path, b"hello");
        assert_eq!(new_output(&path, at(0)).unwrap(), Some((b"hello".to_vec(), at(5))));
        assert_eq!(new_output(&path, at(5)).unwrap(), None);
        // More than a chunk after offset 5, then a rotation, then more than
        // the offset again in the new file.
        let big = vec![b'x'; CHUNK + 10];
        append(&path, &big);
        let log = logs::LogFile::appended(path.clone());
        assert!(logs::rotate(&log, 8).unwrap());
        append(&path, b"next-and-more");
        let seen = rotated_inode(&path);
        assert_ne!(seen, 0);
        // A reader at offset 5 from before the rotation gets the bytes after
        // it that the rotation moved, chunk by chunk, then the new file from
        // its start.
        let mut pos = at(5);
        let at = |offset| Pos { rotated: false, offset, seen };
        let mut moved = Vec::new();
        loop {
            let (chunk, next) = new_output(&path, pos).unwrap().unwrap();
            moved.extend(chunk);
            pos = next;
            if pos == at(0) {
                break;
            }
        }
        assert_eq!(moved, big);
        assert_eq!(new_output(&path, at(0)).unwrap(), Some((b"next-and-more".to_vec(), at(13))));
    }
}
