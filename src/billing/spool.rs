//! The durable billing spool: `<data dir>/billing.db` (SQLite, WAL,
//! `synchronous=NORMAL`), owned by one dedicated writer thread.
//!
//! Layout: every group commit (≤ 1 s) writes ONE row per VM into `chunks`
//! holding all records of that VM since the previous commit (samples and
//! start/stop/gap notices), delta-encoded ([`Record::encode_all`]). At
//! 10,000 VMs and 100 ms that is 10,000 appends of ~130 bytes per second
//! instead of 100,000 row inserts, and no secondary index: the sender keeps the chunk
//! ids per VM in memory and reads blobs by rowid. Chunk ids grow, so per VM
//! the id order is the record order. `vm_meter` remembers which VMs were
//! being metered and the time of their last spooled record, which is what a
//! gap notice after a crash or restart reports.
//!
//! The sender acknowledges records: fully sent chunks are deleted, a partly
//! sent one gets its `skip` count. Thinning rewrites an old chunk keeping the
//! first and last sample of each run plus a gap notice for the removed span;
//! counters are cumulative, so totals stay exact.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{BillingError, BillingMetrics, MeterSet, Shared};
use crate::backend::Usage;

/// Bytes of one record in the first (fixed) blob format.
const RECORD_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migrating the schema")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("chunk {0} is corrupt")]
    Corrupt(i64),
}

/// What a spooled record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sample,
    Started,
    Stopped,
    /// `v[0]` holds `last_sent`, `ts_ns` the resume time.
    Gap,
}

impl Kind {
    fn code(self) -> i64 {
        match self {
            Kind::Sample => 0,
            Kind::Started => 1,
            Kind::Stopped => 2,
            Kind::Gap => 3,
        }
    }

    fn from_code(c: i64) -> Option<Kind> {
        match c {
            0 => Some(Kind::Sample),
            1 => Some(Kind::Started),
            2 => Some(Kind::Stopped),
            3 => Some(Kind::Gap),
            _ => None,
        }
    }
}

/// One sample or notice of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// Unix nanoseconds.
    pub ts_ns: i64,
    /// Sample: cpu ns, memory, disk read, disk write, net rx, net tx.
    pub v: [i64; 6],
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Record {
    pub fn sample(ts_ns: i64, u: &Usage) -> Record {
        Record {
            kind: Kind::Sample,
            ts_ns,
            v: [
                i(u.cpu_time_ns),
                i(u.memory_bytes),
                i(u.disk_read_bytes),
                i(u.disk_write_bytes),
                i(u.net_rx_bytes),
                i(u.net_tx_bytes),
            ],
        }
    }

    pub fn notice(kind: Kind, ts_ns: i64) -> Record {
        Record { kind, ts_ns, v: [0; 6] }
    }

    pub fn gap(last_sent: i64, resume: i64) -> Record {
        Record { kind: Kind::Gap, ts_ns: resume, v: [last_sent, 0, 0, 0, 0, 0] }
    }

    /// Encodes records for a chunk blob: a format byte, the count, then per
    /// record its kind and the zigzag-varint differences of its time and
    /// six counters from the previous record's. Cumulative counters move
    /// little between 100 ms samples, so a sample takes ~12 bytes instead of
    /// 64 — the spool's write volume, and with it most of its CPU, shrinks
    /// by about five. (Hand-written: a dozen lines over prost's varints; a
    /// general codec would not know to take differences.)
    pub fn encode_all(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + records.len() * 16);
        out.push(FORMAT_DELTA);
        put_varint(records.len() as u64, &mut out);
        let mut prev = (0i64, [0i64; 6]);
        for r in records {
            out.push(r.kind.code().to_le_bytes()[0]);
            put_varint(zigzag(r.ts_ns.wrapping_sub(prev.0)), &mut out);
            for (x, p) in r.v.iter().zip(prev.1) {
                put_varint(zigzag(x.wrapping_sub(p)), &mut out);
            }
            prev = (r.ts_ns, r.v);
        }
        out
    }

    /// Decodes a chunk blob of either format (`None`: corrupt).
    pub fn decode_all(b: &[u8]) -> Option<Vec<Record>> {
        if b.first() == Some(&FORMAT_DELTA) {
            return decode_delta(&b[1..]);
        }
        decode_fixed(b)
    }
}

/// First byte of a delta-encoded blob. Fixed-format blobs (written before
/// it) start with a kind code 0–3, so the two never collide.
const FORMAT_DELTA: u8 = 0x81;

/// LEB128, as protobuf and prost write it; inlined here because it runs
/// 700,000 times a second at 10,000 VMs (prost's `decode_varint` reads it).
#[inline]
fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v.to_le_bytes()[0] | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

// Zigzag maps small negative and positive differences to small unsigned
// numbers; the casts reinterpret bits on purpose.
#[allow(clippy::cast_sign_loss)]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[allow(clippy::cast_possible_wrap)]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn decode_delta(mut b: &[u8]) -> Option<Vec<Record>> {
    use prost::encoding::decode_varint;
    let n = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
    // Each record takes at least 8 bytes: a lying count cannot allocate much.
    let mut out = Vec::with_capacity(n.min(b.len() / 8));
    let mut prev = (0i64, [0i64; 6]);
    for _ in 0..n {
        let (&kind, rest) = b.split_first()?;
        b = rest;
        let kind = Kind::from_code(i64::from(kind))?;
        let ts_ns = prev.0.wrapping_add(unzigzag(decode_varint(&mut b).ok()?));
        let mut v = [0i64; 6];
        for (x, p) in v.iter_mut().zip(prev.1) {
            *x = p.wrapping_add(unzigzag(decode_varint(&mut b).ok()?));
        }
        prev = (ts_ns, v);
        out.push(Record { kind, ts_ns, v });
    }
    b.is_empty().then_some(out)
}

/// The first format: fixed 64-byte records of eight little-endian words.
fn decode_fixed(b: &[u8]) -> Option<Vec<Record>> {
    if !b.len().is_multiple_of(RECORD_BYTES) {
        return None;
    }
    let word =
        |c: &[u8], k: usize| -> Option<i64> { Some(i64::from_le_bytes(c.get(k * 8..k * 8 + 8)?.try_into().ok()?)) };
    b.chunks_exact(RECORD_BYTES)
        .map(|c| {
            let kind = Kind::from_code(word(c, 0)?)?;
            let mut v = [0i64; 6];
            for (k, x) in v.iter_mut().enumerate() {
                *x = word(c, k + 2)?;
            }
            Some(Record { kind, ts_ns: word(c, 1)?, v })
        })
        .collect()
}

/// Keeps every notice and the first and last sample of each run of samples;
/// a gap notice follows each thinned run's first sample. Returns the new
/// records and how many samples were removed.
pub fn thin(records: &[Record]) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut removed = 0u64;
    let mut k = 0;
    while k < records.len() {
        if records[k].kind != Kind::Sample {
            out.push(records[k]);
            k += 1;
            continue;
        }
        let start = k;
        while k < records.len() && records[k].kind == Kind::Sample {
            k += 1;
        }
        let run = &records[start..k];
        if let [first, .., last] = run
            && run.len() > 2
        {
            removed += u64::try_from(run.len() - 2).unwrap_or(0);
            out.extend([*first, Record::gap(first.ts_ns, last.ts_ns), *last]);
            continue;
        }
        out.extend_from_slice(run);
    }
    (out, removed)
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
type Inbox = Arc<std::sync::Mutex<Vec<Msg>>>;

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

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
        "CREATE TABLE chunks (
            id          INTEGER PRIMARY KEY,
            vm_id       TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            records     INTEGER NOT NULL,
            events      INTEGER NOT NULL,
            first_ts    INTEGER NOT NULL,
            last_ts     INTEGER NOT NULL,
            skip        INTEGER NOT NULL DEFAULT 0,
            thinned     INTEGER NOT NULL DEFAULT 0,
            data        BLOB NOT NULL
        ) STRICT;
        CREATE TABLE vm_meter (
            vm_id       TEXT PRIMARY KEY NOT NULL,
            customer_id TEXT NOT NULL,
            last_ts     INTEGER NOT NULL
        ) STRICT, WITHOUT ROWID;",
    )])
}

/// Opens (and migrates) the spool database.
pub fn open(path: &Path) -> Result<Connection, SpoolError> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The sender reads chunks written seconds ago; through a memory map that
    // is a page-cache hit, not a `pread` per B-tree page (the writer's
    // commits invalidate SQLite's own cache between reads).
    conn.pragma_update(None, "mmap_size", 1i64 << 30)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    migrations().to_latest(&mut conn)?;
    Ok(conn)
}

/// Reads one chunk's records (skipping none) and its customer.
pub fn load_chunk(conn: &Connection, id: i64) -> Result<Option<Vec<Record>>, SpoolError> {
    let blob: Option<Vec<u8>> =
        conn.prepare_cached("SELECT data FROM chunks WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()?;
    match blob {
        None => Ok(None),
        Some(b) => Record::decode_all(&b).map(Some).ok_or(SpoolError::Corrupt(id)),
    }
}

fn meta(id: i64, vm: Arc<str>, customer: Arc<str>, records: &[Record], bytes: usize, thinned: bool) -> ChunkMeta {
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

/// Inserts one chunk directly (tests and benches seed spools with it).
pub fn insert_chunk(conn: &Connection, vm: &str, customer: &str, records: &[Record]) -> Result<ChunkMeta, SpoolError> {
    let data = Record::encode_all(records);
    let m = meta(0, Arc::from(vm), Arc::from(customer), records, data.len(), false);
    let last_ts = records.iter().map(|r| r.ts_ns).max().unwrap_or(0);
    conn.prepare_cached(
        "INSERT INTO chunks (vm_id, customer_id, records, events, first_ts, last_ts, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![vm, customer, m.records, m.events, m.first_ts, last_ts, data])?;
    Ok(ChunkMeta { id: conn.last_insert_rowid(), ..m })
}

struct VmW {
    customer: Arc<str>,
    /// Run being metered now.
    generation: Option<u64>,
    /// Metered when the previous metald stopped, not settled yet.
    was_metered: bool,
    last_ts: i64,
    pending: Vec<Record>,
    /// `pending` holds records to write.
    dirty: bool,
    /// Metering started or stopped: the `vm_meter` row is written or deleted.
    meter_dirty: bool,
    /// Chunks were acknowledged: `vm_meter.last_ts` is brought up to date
    /// (chunks hold the latest times until they are deleted).
    acked: bool,
    /// Samples accepted since the last commit (published to the counters
    /// after it, so the 100 ms path takes no shared lock).
    collected: u64,
    /// This VM's entry of the shared `collected` counters, once known.
    collected_total: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl VmW {
    fn new(customer: Arc<str>) -> VmW {
        VmW {
            customer,
            generation: None,
            was_metered: false,
            last_ts: 0,
            pending: Vec::new(),
            dirty: false,
            meter_dirty: false,
            acked: false,
            collected: 0,
            collected_total: None,
        }
    }

    fn push(&mut self, r: Record) {
        self.last_ts = self.last_ts.max(r.ts_ns);
        self.pending.push(r);
        self.dirty = true;
    }
}

struct Writer {
    conn: Connection,
    vms: VmMap,
    deletes: Vec<i64>,
    partials: Vec<(i64, u32)>,
    thin: Vec<i64>,
    flushes: Vec<oneshot::Sender<()>>,
    notify: mpsc::UnboundedSender<Notice>,
    /// Metered VMs whose sample buffers each commit drains.
    set: Arc<MeterSet>,
    shared: Arc<Shared>,
    metrics: Arc<dyn BillingMetrics>,
    failing: bool,
}

/// What [`start`] returns: the handle, the writer thread, the receiver of
/// commit notices and the chunks left unsent by a previous run (id order).
pub(crate) type Started = (SpoolHandle, std::thread::JoinHandle<()>, mpsc::UnboundedReceiver<Notice>, Vec<ChunkMeta>);

/// Opens the spool and starts its writer thread.
pub(crate) fn start(
    path: &Path,
    commit_every: Duration,
    set: Arc<MeterSet>,
    shared: Arc<Shared>,
    metrics: Arc<dyn BillingMetrics>,
) -> Result<Started, BillingError> {
    let err = |source| BillingError::Spool { path: path.display().to_string(), source };
    let conn = open(path).map_err(err)?;
    let (vms, backlog) = load(&conn).map_err(err)?;
    let (wake, woken) = std_mpsc::channel();
    let inbox = Inbox::default();
    let (ntx, nrx) = mpsc::unbounded_channel();
    let mut w = Writer {
        conn,
        vms,
        deletes: Vec::new(),
        partials: Vec::new(),
        thin: Vec::new(),
        flushes: Vec::new(),
        notify: ntx,
        set,
        shared,
        metrics,
        failing: false,
    };
    let thread = std::thread::Builder::new()
        .name("billing-spool".into())
        .spawn({
            let inbox = inbox.clone();
            move || w.run(&inbox, &woken, commit_every)
        })
        .map_err(BillingError::Thread)?;
    Ok((SpoolHandle { inbox, wake }, thread, nrx, backlog))
}

/// The writer's per-VM state. Looked up once per VM per commit (10,000 a
/// second at scale): a fast seeded hash; keys are VM ids, at most
/// `MAX_VMS` of them.
type VmMap = HashMap<Arc<str>, VmW, foldhash::fast::RandomState>;

type Loaded = (VmMap, Vec<ChunkMeta>);

fn load(conn: &Connection) -> Result<Loaded, SpoolError> {
    let mut vms = VmMap::default();
    let mut st = conn.prepare("SELECT vm_id, customer_id, last_ts FROM vm_meter")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
    for row in rows {
        let (vm, customer, last_ts) = row?;
        let mut w = VmW::new(Arc::from(customer.as_str()));
        w.was_metered = true;
        w.last_ts = last_ts;
        vms.insert(Arc::from(vm.as_str()), w);
    }
    // Unsent chunks hold the latest times (vm_meter is brought up to date
    // when chunks are acknowledged, not at every commit).
    let mut st = conn.prepare("SELECT vm_id, max(last_ts) FROM chunks GROUP BY vm_id")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (vm, last_ts) = row?;
        if let Some(w) = vms.get_mut(vm.as_str()) {
            w.last_ts = w.last_ts.max(last_ts);
        }
    }
    let mut interned: HashMap<String, Arc<str>> = HashMap::new();
    let mut intern = |s: String| interned.entry(s.clone()).or_insert_with(|| Arc::from(s.as_str())).clone();
    let mut st = conn.prepare(
        "SELECT id, vm_id, customer_id, records, events, first_ts, skip, thinned, length(data) FROM chunks ORDER BY id",
    )?;
    let mut backlog = Vec::new();
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let records: u32 = r.get(3)?;
        backlog.push(ChunkMeta {
            id: r.get(0)?,
            vm: intern(r.get(1)?),
            customer: intern(r.get(2)?),
            records,
            events: r.get(4)?,
            first_ts: r.get(5)?,
            bytes: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
            skip: r.get(6)?,
            thinned: r.get::<_, i64>(7)? != 0,
        });
    }
    Ok((vms, backlog))
}

impl Writer {
    fn run(&mut self, inbox: &Inbox, woken: &std_mpsc::Receiver<()>, every: Duration) {
        let mut deadline = Instant::now() + every;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            // Every handle gone: commit what is left and stop.
            let mut close = matches!(woken.recv_timeout(wait), Err(std_mpsc::RecvTimeoutError::Disconnected));
            let mut now_please = false;
            // Messages come first: a start sent before the queued rounds
            // were collected, a stop that takes its run's samples, acks.
            let msgs = std::mem::take(&mut *inbox.lock().unwrap_or_else(|p| p.into_inner()));
            for m in msgs {
                match m {
                    Msg::Close => close = true,
                    Msg::Flush(done) => {
                        self.flushes.push(done);
                        now_please = true;
                    }
                    m => self.handle(m),
                }
            }
            if close || now_please || Instant::now() >= deadline {
                self.commit();
                if close {
                    return;
                }
                deadline = Instant::now() + every;
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Start { vm, customer, generation, recovered, ts } => {
                let w = self.vms.entry(vm).or_insert_with(|| VmW::new(Arc::from(customer.as_str())));
                if *w.customer != *customer {
                    w.customer = Arc::from(customer.as_str());
                }
                if w.was_metered {
                    w.was_metered = false;
                    let last = w.last_ts;
                    w.push(Record::gap(last, ts));
                    if !recovered {
                        // The previous run ended while metald was away.
                        w.push(Record::notice(Kind::Stopped, ts));
                        w.push(Record::notice(Kind::Started, ts));
                    }
                } else if w.generation.is_none() {
                    w.push(Record::notice(Kind::Started, ts));
                }
                w.generation = Some(generation);
                w.meter_dirty = true;
            }
            Msg::Stop { vm, ts } => {
                let rest = match self.vms.get(&vm).and_then(|w| w.generation) {
                    Some(generation) => self.set.take_samples(&vm, generation),
                    None => Vec::new(),
                };
                if let Some(w) = self.vms.get_mut(&vm)
                    && w.generation.take().is_some()
                {
                    w.collected += rest.len() as u64;
                    for r in rest {
                        w.push(r);
                    }
                    w.push(Record::notice(Kind::Stopped, ts));
                    w.meter_dirty = true;
                }
            }
            Msg::Reconcile { ts } => {
                for w in self.vms.values_mut().filter(|w| w.was_metered) {
                    w.was_metered = false;
                    let last = w.last_ts;
                    w.push(Record::gap(last, ts));
                    w.push(Record::notice(Kind::Stopped, ts));
                    w.meter_dirty = true;
                }
            }
            Msg::Ack { vm, delete, partial } => {
                if let Some(w) = self.vms.get_mut(&vm) {
                    w.acked = true;
                }
                self.deletes.extend(delete);
                self.partials.extend(partial);
            }
            Msg::Thin(ids) => self.thin.extend(ids),
            Msg::Flush(_) | Msg::Close => {}
        }
    }

    /// Moves the samples of the queued collection rounds into the VMs'
    /// pending records (only for runs whose start this thread has seen).
    /// Consecutive rounds over the same snapshot are read VM by VM: one map
    /// lookup per VM per commit, not one per sample.
    fn drain_rounds(&mut self) {
        let rounds = self.set.take_rounds();
        let mut from = 0;
        while from < rounds.len() {
            let vms = &rounds[from].vms;
            let to = from + rounds[from..].iter().take_while(|r| Arc::ptr_eq(&r.vms, vms)).count();
            let group = &rounds[from..to];
            for (k, m) in vms.iter().enumerate() {
                let Some(w) = self.vms.get_mut(&m.key) else { continue };
                if w.generation != Some(m.generation) {
                    continue;
                }
                let before = w.pending.len();
                for s in group.iter().filter_map(|r| r.samples[k]) {
                    w.push(s);
                }
                w.collected += (w.pending.len() - before) as u64;
            }
            from = to;
        }
        self.set.recycle(rounds);
    }

    fn commit(&mut self) {
        self.drain_rounds();
        match self.try_commit() {
            Ok((committed, thinned)) => {
                if self.failing {
                    self.failing = false;
                    warn!("billing spool writes work again");
                }
                for (vm, w) in self.vms.iter_mut() {
                    if w.dirty {
                        w.pending.clear();
                        w.dirty = false;
                    }
                    w.meter_dirty = false;
                    w.acked = false;
                    if w.collected > 0 {
                        self.metrics.samples_collected(vm, w.collected);
                        let shared = &self.shared;
                        w.collected_total
                            .get_or_insert_with(|| shared.collected_cell(vm))
                            .fetch_add(w.collected, std::sync::atomic::Ordering::Relaxed);
                        w.collected = 0;
                    }
                }
                self.vms.retain(|_, w| w.generation.is_some() || w.was_metered);
                self.deletes.clear();
                self.partials.clear();
                self.thin.clear();
                if !committed.is_empty() {
                    let _ = self.notify.send(Notice::Committed(committed));
                }
                if !thinned.is_empty() {
                    let _ = self.notify.send(Notice::Thinned(thinned));
                }
            }
            Err(e) => {
                // Records stay in memory and are retried at the next commit.
                if !self.failing {
                    self.failing = true;
                    warn!(error = %super::chain(&e), "billing spool commit failed; keeping records in memory");
                }
            }
        }
        for f in self.flushes.drain(..) {
            let _ = f.send(());
        }
    }

    fn try_commit(&mut self) -> Result<(Vec<ChunkMeta>, Vec<ChunkMeta>), SpoolError> {
        let dirty = self.vms.values().any(|w| w.dirty || w.meter_dirty || w.acked);
        if !dirty && self.deletes.is_empty() && self.partials.is_empty() && self.thin.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let started = Instant::now();
        let tx = self.conn.transaction()?;
        let mut committed = Vec::new();
        let mut thinned = Vec::new();
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO chunks (vm_id, customer_id, records, events, first_ts, last_ts, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut touch = tx.prepare_cached("UPDATE vm_meter SET last_ts = ?2 WHERE vm_id = ?1")?;
            let mut upsert = tx.prepare_cached(
                "INSERT INTO vm_meter (vm_id, customer_id, last_ts) VALUES (?1, ?2, ?3)
                 ON CONFLICT (vm_id) DO UPDATE SET customer_id = excluded.customer_id, last_ts = excluded.last_ts",
            )?;
            let mut unmeter = tx.prepare_cached("DELETE FROM vm_meter WHERE vm_id = ?1")?;
            for (vm, w) in self.vms.iter().filter(|(_, w)| w.dirty || w.meter_dirty || w.acked) {
                if !w.pending.is_empty() {
                    let data = Record::encode_all(&w.pending);
                    let m = meta(0, vm.clone(), w.customer.clone(), &w.pending, data.len(), false);
                    ins.execute(params![&**vm, &*w.customer, m.records, m.events, m.first_ts, w.last_ts, data])?;
                    committed.push(ChunkMeta { id: tx.last_insert_rowid(), ..m });
                }
                let metered = w.generation.is_some() || w.was_metered;
                if w.meter_dirty && metered {
                    upsert.execute(params![&**vm, &*w.customer, w.last_ts])?;
                } else if w.meter_dirty {
                    unmeter.execute([&**vm])?;
                } else if w.acked {
                    touch.execute(params![&**vm, w.last_ts])?;
                }
            }
            let mut del = tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?;
            for id in &self.deletes {
                del.execute([id])?;
            }
            let mut skip = tx.prepare_cached("UPDATE chunks SET skip = ?2 WHERE id = ?1")?;
            for (id, n) in &self.partials {
                skip.execute(params![id, n])?;
            }
            let mut read = tx.prepare_cached("SELECT vm_id, customer_id, data, skip FROM chunks WHERE id = ?1")?;
            let mut rewrite = tx.prepare_cached(
                "UPDATE chunks SET data = ?2, records = ?3, events = ?4, first_ts = ?5, thinned = 1 WHERE id = ?1",
            )?;
            for id in &self.thin {
                let row: Option<(String, String, Vec<u8>, u32)> =
                    read.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional()?;
                let Some((vm, customer, data, skip)) = row else { continue };
                let records = Record::decode_all(&data).ok_or(SpoolError::Corrupt(*id))?;
                if skip != 0 {
                    continue;
                }
                let (kept, removed) = thin(&records);
                let data = Record::encode_all(&kept);
                let m = meta(*id, Arc::from(vm.as_str()), Arc::from(customer.as_str()), &kept, data.len(), true);
                rewrite.execute(params![id, data, m.records, m.events, m.first_ts])?;
                self.shared.bump(&vm, |c| c.thinned += removed);
                thinned.push(m);
            }
        }
        tx.commit()?;
        debug!(
            chunks = committed.len(),
            deleted = self.deletes.len(),
            thinned = thinned.len(),
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "billing spool commit"
        );
        Ok((committed, thinned))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::billing::NoopMetrics;

    fn s(ts: i64, cpu: i64) -> Record {
        Record { kind: Kind::Sample, ts_ns: ts, v: [cpu, 1, 2, 3, 4, 5] }
    }

    #[test]
    fn varints_match_prost() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_varint(v, &mut ours);
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
        }
    }

    #[test]
    fn records_round_trip() {
        let rs = vec![
            s(1, 10),
            Record::notice(Kind::Started, 2),
            Record::gap(3, 4),
            s(5, -1),
            s(i64::MAX, i64::MIN),
            s(i64::MIN, i64::MAX),
        ];
        let blob = Record::encode_all(&rs);
        assert_eq!(Record::decode_all(&blob).unwrap(), rs);
        assert_eq!(Record::decode_all(&Record::encode_all(&[])).unwrap(), vec![]);
        // Truncated, padded or lying about its count: corrupt, not garbage.
        assert!(Record::decode_all(&blob[..blob.len() - 1]).is_none());
        assert!(Record::decode_all(&[blob.as_slice(), &[0]].concat()).is_none());
        assert!(Record::decode_all(&[FORMAT_DELTA, 200]).is_none());
        assert!(Record::decode_all(&[0u8; 63]).is_none());
    }

    /// Spools written before the delta format still decode.
    #[test]
    fn fixed_format_blobs_still_decode() {
        let rs = vec![s(7, 10), Record::gap(3, 4)];
        let mut blob = Vec::new();
        for r in &rs {
            for w in [r.kind.code(), r.ts_ns].into_iter().chain(r.v) {
                blob.extend_from_slice(&w.to_le_bytes());
            }
        }
        assert_eq!(Record::decode_all(&blob).unwrap(), rs);
    }

    /// Ten 100 ms samples of a VM take ~12 bytes each, not 64.
    #[test]
    fn delta_format_is_compact() {
        let rs: Vec<Record> = (0..10)
            .map(|k| Record {
                kind: Kind::Sample,
                ts_ns: 1_764_000_000_000_000_000 + k * 100_000_123,
                v: [k * 9_876_543, 256 << 20, k * 4096, k * 1024, k * 1500, k * 500],
            })
            .collect();
        let n = Record::encode_all(&rs).len();
        assert!(n < 10 * 20, "{n} bytes");
    }

    #[test]
    fn thinning_keeps_first_and_last_of_each_run() {
        let stop = Record::notice(Kind::Stopped, 50);
        let rs: Vec<Record> = (0..10).map(|k| s(k, k * 100)).chain([stop]).chain((60..62).map(|k| s(k, k))).collect();
        let (kept, removed) = thin(&rs);
        assert_eq!(removed, 8);
        assert_eq!(kept, vec![s(0, 0), Record::gap(0, 9), s(9, 900), stop, s(60, 60), s(61, 61)]);
        // Thinning again removes nothing more.
        assert_eq!(thin(&kept).1, 0);
    }

    #[tokio::test]
    async fn writer_commits_orders_and_recovers() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("billing.db");
        let shared = Arc::new(Shared::default());
        let set = Arc::new(MeterSet::default());
        let (h, t, mut notices, backlog) =
            start(&path, Duration::from_secs(60), set.clone(), shared.clone(), Arc::new(NoopMetrics)).unwrap();
        assert!(backlog.is_empty());
        let vm: Arc<str> = Arc::from("vm-a");
        let metered = |generation| {
            Arc::new(crate::billing::Metered {
                id: crate::core::spec::VmId::parse("vm-a").unwrap(),
                key: vm.clone(),
                spec: Arc::default(),
                rt: crate::backend::Runtime::default(),
                dir: std::path::PathBuf::new(),
                generation,
            })
        };
        // A sample of another run (generation 6) is dropped.
        let round = |m: &Arc<crate::billing::Metered>, r: Record| crate::billing::Round {
            vms: Arc::new(vec![m.clone()]),
            samples: vec![Some(r)],
        };
        let (m6, m7) = (metered(6), metered(7));
        h.start(vm.clone(), "cust".into(), 7, false, 100);
        set.push_round(round(&m7, s(110, 1)));
        set.push_round(round(&m6, s(111, 2)));
        set.push_round(round(&m7, s(120, 3)));
        h.flush().await;
        let Some(Notice::Committed(c)) = notices.recv().await else { panic!("no commit") };
        assert_eq!((c.len(), c[0].records, c[0].events), (1, 3, 1));
        let conn = open(&path).unwrap();
        let recs = load_chunk(&conn, c[0].id).unwrap().unwrap();
        assert_eq!(recs, vec![Record::notice(Kind::Started, 100), s(110, 1), s(120, 3)]);
        assert_eq!(shared.counters()["vm-a"].collected, 2);
        h.close();
        t.join().unwrap();
        // Restart: the VM was metered; it is gone now → gap + stop.
        let (h, t, mut notices, backlog) =
            start(&path, Duration::from_secs(60), Arc::default(), shared, Arc::new(NoopMetrics)).unwrap();
        assert_eq!(backlog.len(), 1);
        h.reconcile(500);
        h.flush().await;
        let Some(Notice::Committed(c)) = notices.recv().await else { panic!("no commit") };
        let recs = load_chunk(&conn, c[0].id).unwrap().unwrap();
        assert_eq!(recs, vec![Record::gap(120, 500), Record::notice(Kind::Stopped, 500)]);
        h.ack(vm.clone(), vec![backlog[0].id], None);
        h.close();
        t.join().unwrap();
        assert!(load_chunk(&conn, backlog[0].id).unwrap().is_none());
        let n: i64 = conn.query_row("SELECT count(*) FROM vm_meter", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }
}
