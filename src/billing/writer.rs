//! The spool writer: ONE dedicated OS thread that owns the log
//! ([`super::log`]). At each group commit it handles the messages queued
//! through the [`SpoolHandle`] (starts, stops, acknowledgements, thinning),
//! drains the collection rounds queued in the [`MeterSet`] VM by VM into
//! per-VM delta-encoded records, appends one frame, and sends the sender a
//! [`Notice`] of what it committed. `start` opens the spool and starts the
//! thread. Imports the leaves, the log and [`super::spool`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::codec::{FORMAT_DELTA, Kind, Prev, Record, put_varint, thin};
use super::counters::{BillingMetrics, Shared};
use super::error::{BillingError, SpoolError};
use super::frame::Frame;
use super::log::{Log, Reader, Recovered};
use super::meter::{MeterSet, Metered};
use super::spool::{ChunkMeta, Inbox, Msg, Notice, SpoolHandle, head, meta, spool_dir};
use crate::util::chain;

struct VmW {
    key: Arc<str>,
    customer: Arc<str>,
    /// Run being metered now.
    generation: Option<u64>,
    /// Metered when the previous metald stopped, not settled yet.
    was_metered: bool,
    last_ts: i64,
    /// Records to write, delta-encoded as they arrive (a chunk blob
    /// without its format byte and count): ~13 bytes a sample stay in
    /// memory until the commit instead of a 64-byte record that would be
    /// read again to encode it.
    enc: Vec<u8>,
    /// Records in `enc`, notices among them, the first one's time, and the
    /// last one (the base of the next difference).
    records: u32,
    events: u32,
    first_ts: i64,
    prev: Prev,
    /// `enc` holds records to write.
    dirty: bool,
    /// Metering started or stopped: the metered-VM entry is written.
    meter_dirty: bool,
    /// Chunks were acknowledged: the metered-VM entry's time is brought up
    /// to date (chunks hold the latest times until they are deleted).
    acked: bool,
    /// Samples accepted since the last commit (published to the counters
    /// after it, so the 100 ms path takes no shared lock).
    collected: u64,
    /// This VM's entry of the shared `collected` counters, once known.
    collected_total: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl VmW {
    fn new(key: Arc<str>, customer: Arc<str>) -> VmW {
        VmW {
            key,
            customer,
            generation: None,
            was_metered: false,
            last_ts: 0,
            enc: Vec::new(),
            records: 0,
            events: 0,
            first_ts: 0,
            prev: Prev::default(),
            dirty: false,
            meter_dirty: false,
            acked: false,
            collected: 0,
            collected_total: None,
        }
    }

    fn push(&mut self, r: Record) {
        if self.records == 0 {
            self.first_ts = r.ts_ns;
            self.prev = Prev::default();
        }
        self.last_ts = self.last_ts.max(r.ts_ns);
        r.encode_after(&mut self.prev, &mut self.enc);
        self.records += 1;
        self.events += u32::from(r.kind != Kind::Sample);
        self.dirty = true;
    }

    /// After a commit wrote the records.
    fn written(&mut self) {
        self.enc.clear();
        self.records = 0;
        self.events = 0;
        self.dirty = false;
    }

    fn metered(&self) -> bool {
        self.generation.is_some() || self.was_metered
    }
}

/// A round snapshot, the slab layout, and each snapshot VM's slot.
/// (The run's generation rides along so the per-commit pass does not touch
/// each `Metered` — a cache miss apiece at 10,000 VMs.)
type Positions = (Arc<Vec<Arc<Metered>>>, u64, Vec<Option<(usize, u64)>>);

/// The writer's per-VM state: a slab, so the per-commit pass over the
/// queued rounds indexes it by position instead of hashing 10,000 VM ids
/// a second; `by_key` finds a VM's slot for messages.
#[derive(Default)]
struct Vms {
    slots: Vec<Option<VmW>>,
    by_key: HashMap<Arc<str>, usize, foldhash::fast::RandomState>,
    free: Vec<usize>,
    /// Bumped whenever a slot is taken or freed (invalidates `positions`).
    layout: u64,
    /// The slot of each VM of the last round snapshot seen, and the
    /// snapshot and layout it was computed for.
    positions: Option<Positions>,
}

impl Vms {
    fn get_mut(&mut self, key: &str) -> Option<&mut VmW> {
        let i = *self.by_key.get(key)?;
        self.slots.get_mut(i)?.as_mut()
    }

    fn entry(&mut self, key: Arc<str>, customer: &str) -> &mut VmW {
        let i = match self.by_key.get(&key) {
            Some(&i) => i,
            None => {
                let w = VmW::new(key.clone(), Arc::from(customer));
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slots[i] = Some(w);
                        i
                    }
                    None => {
                        self.slots.push(Some(w));
                        self.slots.len() - 1
                    }
                };
                self.by_key.insert(key, i);
                self.layout += 1;
                i
            }
        };
        self.slots[i].get_or_insert_with(unreachable_slot)
    }

    fn iter(&self) -> impl Iterator<Item = &VmW> {
        self.slots.iter().flatten()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut VmW> {
        self.slots.iter_mut().flatten()
    }

    /// Frees the slots of VMs neither metered nor waiting to be settled,
    /// and retires their counters.
    fn retain_metered(&mut self, shared: &Shared) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|w| !w.metered() && !w.dirty)
                && let Some(w) = slot.take()
            {
                self.by_key.remove(&w.key);
                self.free.push(i);
                self.layout += 1;
                drop(w.collected_total);
                shared.retire(&w.key);
            }
        }
    }

    /// Each VM of `snapshot`'s slot (computed once per snapshot and layout).
    fn positions(&mut self, snapshot: &Arc<Vec<Arc<Metered>>>) -> Vec<Option<(usize, u64)>> {
        if let Some((s, layout, p)) = self.positions.take()
            && Arc::ptr_eq(&s, snapshot)
            && layout == self.layout
        {
            return p;
        }
        snapshot.iter().map(|m| self.by_key.get(&m.key).map(|&i| (i, m.generation))).collect()
    }

    fn keep_positions(&mut self, snapshot: Arc<Vec<Arc<Metered>>>, p: Vec<Option<(usize, u64)>>) {
        self.positions = Some((snapshot, self.layout, p));
    }
}

/// `Vms::entry` just filled the slot; this is never called.
#[cold]
fn unreachable_slot() -> VmW {
    VmW::new(Arc::from(""), Arc::from(""))
}

struct Writer {
    log: Log,
    vms: Vms,
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
    /// Size of the last frame: the next one is allocated that big at once.
    frame_hint: usize,
}

/// What [`start`] returns: the handle, the writer thread, the receiver of
/// commit notices, the chunks left unsent by a previous run (id order) and
/// a reader of chunks for the sender.
pub(crate) type Started =
    (SpoolHandle, std::thread::JoinHandle<()>, mpsc::UnboundedReceiver<Notice>, Vec<ChunkMeta>, Reader);

/// Opens the spool of `data_dir` and starts its writer thread.
pub(crate) fn start(
    data_dir: &Path,
    commit_every: Duration,
    set: Arc<MeterSet>,
    shared: Arc<Shared>,
    metrics: Arc<dyn BillingMetrics>,
) -> Result<Started, BillingError> {
    let dir = spool_dir(data_dir);
    let err = |source| BillingError::Spool { path: dir.display().to_string(), source };
    let (log, recovered) = Log::open(&dir).map_err(|e| err(e.into()))?;
    if recovered.corrupt_frames > 0 {
        metrics.spool_corrupt_frames(recovered.corrupt_frames);
    }
    let (vms, backlog) = load(recovered);
    let reader = log.reader();
    let (wake, woken) = std_mpsc::channel();
    let inbox = Inbox::default();
    let (ntx, nrx) = mpsc::unbounded_channel();
    let mut w = Writer {
        log,
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
        frame_hint: 0,
    };
    let thread = std::thread::Builder::new()
        .name("billing-spool".into())
        .spawn({
            let inbox = inbox.clone();
            move || w.run(&inbox, &woken, commit_every)
        })
        .map_err(BillingError::Thread)?;
    Ok((SpoolHandle::new(inbox, wake), thread, nrx, backlog, reader))
}

fn load(rec: Recovered) -> (Vms, Vec<ChunkMeta>) {
    let mut vms = Vms::default();
    for (vm, (customer, last_ts)) in &rec.meter {
        let w = vms.entry(Arc::from(vm.as_str()), customer);
        w.was_metered = true;
        w.last_ts = *last_ts;
    }
    // Records of these VMs may have been in damaged frames: a gap notice
    // from the last record known before the damage to the latest one seen.
    for (vm, (customer, from)) in &rec.gaps {
        let w = vms.entry(Arc::from(vm.as_str()), customer);
        let last = w.last_ts;
        w.push(Record::gap(*from, rec.latest_ts.max(*from)));
        w.last_ts = last.max(*from);
    }
    let mut interned: HashMap<String, Arc<str>> = HashMap::new();
    let mut intern = |s: &str| interned.entry(s.to_owned()).or_insert_with(|| Arc::from(s)).clone();
    let mut backlog = Vec::with_capacity(rec.chunks.len());
    for (id, c) in rec.chunks {
        // Unsent chunks hold the latest times (the metered-VM entry is
        // brought up to date when chunks are acknowledged, not at every
        // commit).
        if let Some(w) = vms.get_mut(&c.head.vm) {
            w.last_ts = w.last_ts.max(c.head.last_ts);
        }
        backlog.push(ChunkMeta {
            id,
            vm: intern(&c.head.vm),
            customer: intern(&c.head.customer),
            records: c.head.records,
            events: c.head.events,
            first_ts: c.head.first_ts,
            bytes: c.bytes,
            skip: c.head.skip,
            thinned: c.head.thinned,
        });
    }
    (vms, backlog)
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
                let w = self.vms.entry(vm, &customer);
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
                let rest = match self.vms.get_mut(&vm).and_then(|w| w.generation) {
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
                for w in self.vms.iter_mut().filter(|w| w.was_metered) {
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
    /// Consecutive rounds over the same snapshot are read VM by VM, and
    /// VMs are found by position in the slab, not by hashing their ids.
    fn drain_rounds(&mut self) {
        let rounds = self.set.take_rounds();
        let mut from = 0;
        while from < rounds.len() {
            let vms = &rounds[from].vms;
            let to = from + rounds[from..].iter().take_while(|r| Arc::ptr_eq(&r.vms, vms)).count();
            let group = &rounds[from..to];
            let positions = self.vms.positions(vms);
            for (k, at) in positions.iter().enumerate() {
                let Some((i, generation)) = *at else { continue };
                let Some(w) = self.vms.slots.get_mut(i).and_then(Option::as_mut) else { continue };
                if w.generation != Some(generation) {
                    continue;
                }
                let before = w.records;
                for s in group.iter().filter_map(|r| r.samples[k]) {
                    w.push(s);
                }
                w.collected += u64::from(w.records - before);
            }
            self.vms.keep_positions(vms.clone(), positions);
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
                    self.shared.spool_failing_since.store(0, std::sync::atomic::Ordering::Relaxed);
                    warn!("billing spool writes work again");
                }
                for w in self.vms.iter_mut() {
                    if w.dirty {
                        w.written();
                    }
                    w.meter_dirty = false;
                    w.acked = false;
                    if w.collected > 0 {
                        self.metrics.samples_collected(&w.key, w.collected);
                        let shared = &self.shared;
                        let key = &w.key;
                        w.collected_total
                            .get_or_insert_with(|| shared.collected_cell(key))
                            .fetch_add(w.collected, std::sync::atomic::Ordering::Relaxed);
                        w.collected = 0;
                    }
                }
                self.vms.retain_metered(&self.shared);
                self.deletes.clear();
                self.partials.clear();
                self.thin.clear();
                self.log.collect();
                if !committed.is_empty() {
                    let _ = self.notify.send(Notice::Committed(committed));
                }
                if !thinned.is_empty() {
                    let _ = self.notify.send(Notice::Thinned(thinned));
                }
            }
            Err(e) => {
                // Records stay in memory and are retried at the next commit.
                self.shared.spool_write_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics.spool_write_failed();
                if !self.failing {
                    self.failing = true;
                    let now = crate::util::unix_now().max(1);
                    self.shared.spool_failing_since.store(now, std::sync::atomic::Ordering::Relaxed);
                    warn!(error = %chain(&e), "billing spool commit failed; keeping records in memory");
                }
            }
        }
        for f in self.flushes.drain(..) {
            let _ = f.send(());
        }
    }

    fn try_commit(&mut self) -> Result<(Vec<ChunkMeta>, Vec<ChunkMeta>), SpoolError> {
        let dirty = self.vms.iter().any(|w| w.dirty || w.meter_dirty || w.acked);
        if !dirty && self.deletes.is_empty() && self.partials.is_empty() && self.thin.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let started = Instant::now();
        if self.log.should_roll() {
            self.log.roll()?;
        }
        let mut frame = Frame::with_capacity(self.frame_hint);
        if self.log.needs_checkpoint() {
            // A new segment starts with the whole metered-VM table, so older
            // segments can go; this commit's own changes follow it.
            frame.checkpoint(self.log.peek_next_id());
            for w in self.vms.iter().filter(|w| w.metered()) {
                frame.meter(&w.key, &w.customer, w.last_ts);
            }
        }
        let mut committed = Vec::new();
        for w in self.vms.iter().filter(|w| w.dirty || w.meter_dirty || w.acked) {
            if w.records > 0 {
                let mut m = ChunkMeta {
                    id: self.log.next_id(),
                    vm: w.key.clone(),
                    customer: w.customer.clone(),
                    records: w.records,
                    events: w.events,
                    first_ts: w.first_ts,
                    bytes: 0,
                    skip: 0,
                    thinned: false,
                };
                let mut bytes = 0;
                frame.chunk(&head(&m, &w.key, &w.customer, w.last_ts), |b| {
                    let at = b.len();
                    b.push(FORMAT_DELTA);
                    put_varint(u64::from(w.records), b);
                    b.extend_from_slice(&w.enc);
                    bytes = b.len() - at;
                });
                m.bytes = bytes as u64;
                committed.push(m);
            }
            if w.meter_dirty && w.metered() {
                frame.meter(&w.key, &w.customer, w.last_ts);
            } else if w.meter_dirty {
                frame.unmeter(&w.key);
            } else if w.acked {
                frame.touch(&w.key, w.last_ts);
            }
        }
        for id in &self.deletes {
            frame.delete(*id);
        }
        for (id, n) in &self.partials {
            frame.skip(*id, *n);
        }
        let mut thinned = Vec::new();
        let mut removed_by_vm = Vec::new();
        for id in &self.thin {
            let Some((h, data)) = self.log.read_chunk(*id)? else { continue };
            if h.skip != 0 {
                continue;
            }
            let records = Record::decode_all(&data).ok_or(SpoolError::Corrupt(*id))?;
            let (kept, removed) = thin(&records);
            let data = Record::encode_all(&kept);
            let m = meta(*id, Arc::from(h.vm.as_str()), Arc::from(h.customer.as_str()), &kept, data.len(), true);
            frame.chunk(&head(&m, &h.vm, &h.customer, h.last_ts), |b| b.extend_from_slice(&data));
            removed_by_vm.push((h.vm, removed));
            thinned.push(m);
        }
        let moved = self.log.compact_into(&mut frame)?;
        self.frame_hint = frame.len() + frame.len() / 8;
        self.log.append(frame)?;
        for (vm, removed) in removed_by_vm {
            self.shared.bump(&vm, |c| c.thinned += removed);
        }
        debug!(
            chunks = committed.len(),
            deleted = self.deletes.len(),
            thinned = thinned.len(),
            moved,
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
    use crate::billing::counters::NoopMetrics;
    use crate::billing::meter::{Metered, Round};

    fn s(ts: i64, cpu: i64) -> Record {
        Record { kind: Kind::Sample, ts_ns: ts, v: [cpu, 1, 2, 3, 4, 5] }
    }

    #[tokio::test]
    async fn writer_commits_orders_and_recovers() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path();
        let shared = Arc::new(Shared::default());
        let set = Arc::new(MeterSet::default());
        let (h, t, mut notices, backlog, reader) =
            start(path, Duration::from_secs(60), set.clone(), shared.clone(), Arc::new(NoopMetrics)).unwrap();
        assert!(backlog.is_empty());
        let vm: Arc<str> = Arc::from("vm-a");
        let metered = |generation| {
            Arc::new(Metered {
                id: crate::model::VmId::parse("vm-a").unwrap(),
                key: vm.clone(),
                spec: Arc::new(crate::model::ValidSpec::unchecked(crate::model::VmSpec::default())),
                rt: crate::model::Runtime::default(),
                dir: std::path::PathBuf::new(),
                generation,
            })
        };
        // A sample of another run (generation 6) is dropped.
        let round = |m: &Arc<Metered>, r: Record| Round { vms: Arc::new(vec![m.clone()]), samples: vec![Some(r)] };
        let (m6, m7) = (metered(6), metered(7));
        h.start(vm.clone(), "cust".into(), 7, false, 100);
        set.push_round(round(&m7, s(110, 1)));
        set.push_round(round(&m6, s(111, 2)));
        set.push_round(round(&m7, s(120, 3)));
        h.flush().await;
        let Some(Notice::Committed(c)) = notices.recv().await else { panic!("no commit") };
        assert_eq!((c.len(), c[0].records, c[0].events), (1, 3, 1));
        let load = |r: &Reader, id| r.read(&[id]).unwrap()[0].as_ref().map(|b| Record::decode_all(b).unwrap());
        let recs = load(&reader, c[0].id).unwrap();
        assert_eq!(recs, vec![Record::notice(Kind::Started, 100), s(110, 1), s(120, 3)]);
        assert_eq!(shared.counters()["vm-a"].collected, 2);
        h.close();
        t.join().unwrap();
        // Restart: the VM was metered; it is gone now → gap + stop.
        let (h, t, mut notices, backlog, reader) =
            start(path, Duration::from_secs(60), Arc::default(), shared, Arc::new(NoopMetrics)).unwrap();
        assert_eq!(backlog.len(), 1);
        h.reconcile(500);
        h.flush().await;
        let Some(Notice::Committed(c)) = notices.recv().await else { panic!("no commit") };
        let recs = load(&reader, c[0].id).unwrap();
        assert_eq!(recs, vec![Record::gap(120, 500), Record::notice(Kind::Stopped, 500)]);
        h.ack(vm.clone(), vec![backlog[0].id], None);
        h.close();
        t.join().unwrap();
        assert!(load(&reader, backlog[0].id).is_none());
        // Nothing is metered any more, and the acknowledged chunk stays gone.
        let (_, rec) = Log::open(&spool_dir(path)).unwrap();
        assert!(rec.meter.is_empty(), "{:?}", rec.meter);
        assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), vec![c[0].id]);
    }
}
