//! The durable billing spool's interface: the [`SpoolHandle`] the other
//! stages send to the writer thread (`billing::writer`) through, the
//! [`Notice`]s of committed chunks ([`ChunkMeta`]) the writer sends on to
//! the sender, and where the spool lives. The spool is an append-only log
//! in `<data dir>/billing-spool/` ([`super::log`]) owned by that one
//! writer thread.
//!
//! Every group commit (≤ 1 s) appends ONE frame holding, per VM, one chunk
//! with all records of that VM since the previous commit (samples and
//! start/stop/gap notices), delta-encoded ([`Record::encode_all`] of
//! [`super::codec`]), plus the acknowledgements the sender reported. At
//! 10,000 VMs and 100 ms that is one ~1.3 MB write and one `fdatasync` a
//! second. Chunk ids grow, so per
//! VM the id order is the record order; the sender keeps the chunk ids per
//! VM in memory and reads chunks through a [`Reader`]. The log also
//! remembers which VMs were being metered and the time of their last
//! spooled record, which is what a gap notice after a crash or restart
//! reports.
//!
//! The sender acknowledges records: fully sent chunks are deleted, a partly
//! sent one gets its `skip` count. Thinning rewrites an old chunk keeping the
//! first and last sample of each run plus a gap notice for the removed span;
//! counters are cumulative, so totals stay exact.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

use super::codec::{Kind, Record};
use super::error::SpoolError;
use super::frame::{ChunkHead, Frame};
use super::log::Log;
pub use super::log::Reader;

/// Where the spool lives under the data dir.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("billing-spool")
}

/// A committed chunk as the sender tracks it.
#[derive(Debug, Clone)]
pub struct ChunkMeta {
    pub id: i64,
    pub vm: Arc<str>,
    pub customer: Arc<str>,
    pub records: u32,
    pub events: u32,
    pub first_ts: i64,
    pub bytes: u64,
    /// Records at the front already acknowledged.
    pub skip: u32,
    pub thinned: bool,
}

/// From the writer to the sender, after each commit.
#[derive(Debug)]
pub enum Notice {
    Committed(Vec<ChunkMeta>),
    /// Replacement metadata of chunks that were thinned.
    Thinned(Vec<ChunkMeta>),
}

pub(crate) enum Msg {
    Start {
        vm: Arc<str>,
        customer: String,
        generation: u64,
        recovered: bool,
        ts: i64,
    },
    /// The writer takes the run's queued samples out of the rounds first.
    Stop {
        vm: Arc<str>,
        ts: i64,
    },
    Reconcile {
        ts: i64,
    },
    Ack {
        vm: Arc<str>,
        delete: Vec<i64>,
        partial: Option<(i64, u32)>,
    },
    Thin(Vec<i64>),
    Flush(oneshot::Sender<()>),
    Close,
}

/// Messages for the writer, handled in order at its next commit.
pub(super) type Inbox = Arc<std::sync::Mutex<Vec<Msg>>>;

/// Cheap handle to the writer thread. Messages wait in the inbox until the
/// next group commit (which handles them before anything else); only a
/// flush or close wakes the writer early. Acknowledgements alone arrive
/// ~170 times a second at 10,000 VMs: a thread wake-up each would cost more
/// than handling them.
#[derive(Clone)]
pub struct SpoolHandle {
    inbox: Inbox,
    wake: std_mpsc::Sender<()>,
}

impl SpoolHandle {
    /// The handle of a writer that reads `inbox` and wakes on `wake`.
    pub(super) fn new(inbox: Inbox, wake: std_mpsc::Sender<()>) -> SpoolHandle {
        SpoolHandle { inbox, wake }
    }

    fn send(&self, m: Msg) {
        let urgent = matches!(m, Msg::Flush(_) | Msg::Close);
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        if urgent {
            // After close the writer is gone; nothing is left to record.
            let _ = self.wake.send(());
        }
    }

    pub fn start(&self, vm: Arc<str>, customer: String, generation: u64, recovered: bool, ts: i64) {
        self.send(Msg::Start { vm, customer, generation, recovered, ts });
    }

    pub fn stop(&self, vm: Arc<str>, ts: i64) {
        self.send(Msg::Stop { vm, ts });
    }

    /// VMs metered before the restart that were not started again since are
    /// gone: they get a gap and a stop notice.
    pub fn reconcile(&self, ts: i64) {
        self.send(Msg::Reconcile { ts });
    }

    pub fn ack(&self, vm: Arc<str>, delete: Vec<i64>, partial: Option<(i64, u32)>) {
        self.send(Msg::Ack { vm, delete, partial });
    }

    pub fn thin(&self, ids: Vec<i64>) {
        self.send(Msg::Thin(ids));
    }

    /// Commits now and waits for it.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Flush(tx));
        let _ = rx.await;
    }

    pub fn close(&self) {
        self.send(Msg::Close);
    }

    /// A handle whose messages stay in its inbox (tests of the stages).
    #[cfg(test)]
    pub(crate) fn detached() -> (SpoolHandle, Inbox) {
        let (wake, _) = std_mpsc::channel();
        let inbox = Inbox::default();
        (SpoolHandle { inbox: inbox.clone(), wake }, inbox)
    }
}

/// Appends chunks straight to the spool of `data_dir` while no writer runs
/// (tests and benches seed spools with it). Returns them as the sender
/// tracks them.
pub fn seed(data_dir: &Path, chunks: &[(&str, &str, Vec<Record>)]) -> Result<Vec<ChunkMeta>, SpoolError> {
    let (mut log, _) = Log::open(&spool_dir(data_dir))?;
    let mut frame = Frame::new();
    if log.needs_checkpoint() {
        frame.checkpoint(log.peek_next_id());
    }
    let mut out = Vec::new();
    for (vm, customer, records) in chunks {
        let id = log.next_id();
        let data = Record::encode_all(records);
        let m = meta(id, Arc::from(*vm), Arc::from(*customer), records, data.len(), false);
        let last_ts = records.iter().map(|r| r.ts_ns).max().unwrap_or(0);
        frame.chunk(&head(&m, vm, customer, last_ts), |b| b.extend_from_slice(&data));
        out.push(m);
    }
    log.append(frame)?;
    Ok(out)
}

pub(super) fn meta(
    id: i64,
    vm: Arc<str>,
    customer: Arc<str>,
    records: &[Record],
    bytes: usize,
    thinned: bool,
) -> ChunkMeta {
    ChunkMeta {
        id,
        vm,
        customer,
        records: u32::try_from(records.len()).unwrap_or(u32::MAX),
        events: u32::try_from(records.iter().filter(|r| r.kind != Kind::Sample).count()).unwrap_or(u32::MAX),
        first_ts: records.first().map(|r| r.ts_ns).unwrap_or(0),
        bytes: bytes as u64,
        skip: 0,
        thinned,
    }
}

pub(super) fn head<'a>(m: &ChunkMeta, vm: &'a str, customer: &'a str, last_ts: i64) -> ChunkHead<&'a str> {
    ChunkHead {
        id: m.id,
        vm,
        customer,
        records: m.records,
        events: m.events,
        first_ts: m.first_ts,
        last_ts,
        skip: m.skip,
        thinned: m.thinned,
    }
}
