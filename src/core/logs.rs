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
        let reader = ConsoleReader { manager: self.clone(), slot, path, q, parts: None, offset: 0, done: false };
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
    /// Following: how far into the current file has been sent.
    offset: u64,
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
                    self.offset = parts
                        .iter()
                        .find(|p| p.path == self.path)
                        .map_or_else(|| logs::live_range(&self.path).map_or(0, |(_, end)| end), |p| p.end);
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
            let (path, offset) = (self.path.clone(), self.offset);
            let found = blocking(move || new_output(&path, offset)).await;
            match found {
                Ok(Some((chunk, offset))) => {
                    self.offset = offset;
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

/// Output of the log at `path` after `offset`: a chunk and the offset after
/// it, or `None` when there is none yet. A file shorter than `offset` was
/// rotated: what was written after `offset` before the rotation is at the
/// same place in `.1` (the copy starts at 0 for a log written to append),
/// then the file goes on from its start.
fn new_output(path: &Path, offset: u64) -> Result<Option<(Vec<u8>, u64)>, Error> {
    let (start, end) = match logs::live_range(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", path, e)),
    };
    if end < offset {
        let rotated = logs::rotated_path(path);
        let missed = match logs::live_range(&rotated) {
            Ok((_, rend)) if rend > offset => {
                logs::read_range(&rotated, offset, rend, CHUNK).map_err(|e| io_error("reading", &rotated, e))?
            }
            _ => Vec::new(),
        };
        // The missed part first (when larger than a chunk, the rest is
        // dropped: the stream says nothing it did not read).
        return Ok(Some((missed, 0)));
    }
    if end == offset {
        return Ok(None);
    }
    let from = offset.max(start);
    let chunk = logs::read_range(path, from, end, CHUNK).map_err(|e| io_error("reading", path, e))?;
    let next = from + chunk.len() as u64;
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
        assert_eq!(new_output(&path, 0).unwrap(), None, "no file yet");
        append(&path, b"hello");
        assert_eq!(new_output(&path, 0).unwrap(), Some((b"hello".to_vec(), 5)));
        assert_eq!(new_output(&path, 5).unwrap(), None);
        append(&path, b" world");
        let log = logs::LogFile::appended(path.clone());
        assert!(logs::rotate(&log, 8).unwrap());
        append(&path, b"next");
        // The bytes after offset 5 that the rotation moved, then the new file.
        assert_eq!(new_output(&path, 5).unwrap(), Some((b" world".to_vec(), 0)));
        assert_eq!(new_output(&path, 0).unwrap(), Some((b"next".to_vec(), 4)));
    }
}
