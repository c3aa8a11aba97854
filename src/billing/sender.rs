//! Sends spooled records to the billing service, per VM strictly in order.
//!
//! The sender owns, per VM, the queue of committed chunk ids (from the spool
//! writer). A VM is *due* when a notice is queued, when `batch_size` samples
//! wait, or when its oldest record is `flush` old. At most one call per VM is
//! in flight, so a newer batch can never overtake an older one; a failed
//! call is retried (capped exponential back-off with jitter) before anything
//! after it. Records are acknowledged to the spool — and only then deleted —
//! once the service answered `success = true`. Heartbeats are sent at start
//! and every `heartbeat`. When the spool exceeds its limit the oldest unsent
//! chunks are thinned.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, debug, info, info_span, warn};

use super::codec::{Kind, Record};
use super::config::BillingConfig;
use super::counters::{BillingMetrics, Shared};
use super::error::{BillingError, SpoolError};
use super::meter::{Clock, MeterSet};
use super::spool::{self, ChunkMeta, Notice, SpoolHandle};
use super::transport::{Request, SendError, Transport};
use crate::util::chain;

/// Delay before retry number `attempt` (1-based): `min·2^(attempt-1)`
/// capped at `max`, then jittered into its upper half (`jitter` in [0, 1)).
pub fn backoff(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max);
    exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0)).min(max)
}

/// What the next call of a VM is, given its unsent records in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Notice(Record),
    /// Up to `batch_size` samples, never across a notice.
    Batch(Vec<Record>),
}

/// Takes the records it plans with: a batch is the front of them, moved,
/// not copied (600 samples are ~38 KB).
pub fn plan(mut records: Vec<Record>, batch_size: usize) -> Option<Plan> {
    let first = records.first()?;
    if first.kind != Kind::Sample {
        return Some(Plan::Notice(*first));
    }
    let n = records.iter().take(batch_size).take_while(|r| r.kind == Kind::Sample).count();
    records.truncate(n);
    Some(Plan::Batch(records))
}

#[derive(Default)]
struct VmQueue {
    chunks: VecDeque<ChunkMeta>,
    /// Unsent records and notices among them.
    records: u64,
    events: u64,
    in_flight: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    thin_pending: u32,
    /// In `Sender::ready` already.
    queued: bool,
    /// The wake-up armed in `Sender::timers` for this queue; other entries
    /// of it there are stale and skipped.
    timer: Option<Instant>,
}

/// Arms a wake-up of `vm` at `at` unless one at or before it is armed: one
/// live entry per queue, so the heap does not fill with a VM's superseded
/// deadlines (with the default 60 s flush, every delivered batch used to
/// leave one behind for a minute).
fn arm(timers: &mut BinaryHeap<Reverse<(Instant, Arc<str>)>>, q: &mut VmQueue, vm: &Arc<str>, at: Instant) {
    if q.timer.is_some_and(|t| t <= at) {
        return;
    }
    q.timer = Some(at);
    timers.push(Reverse((at, vm.clone())));
}

struct Outcome {
    vm: Arc<str>,
    consumed: u64,
    events: u64,
    samples: u64,
    result: Result<(), SendError>,
}

enum Done {
    Vm(Outcome),
    Heartbeat(Result<(), SendError>),
}

/// The sender task's state.
pub struct Sender {
    transport: Arc<dyn Transport>,
    reader: spool::Reader,
    spool: SpoolHandle,
    set: Arc<MeterSet>,
    metrics: Arc<dyn BillingMetrics>,
    shared: Arc<Shared>,
    clock: Clock,
    batch_size: usize,
    flush_ns: i64,
    heartbeat: Duration,
    retry: (Duration, Duration),
    max_bytes: u64,
    instance_id: String,
    concurrency: usize,
    /// Keyed by VM id (metald's own VMs, at most `MAX_VMS`): a fast hash.
    queues: HashMap<Arc<str>, VmQueue, foldhash::fast::RandomState>,
    /// VMs found due while every call slot was taken.
    ready: VecDeque<Arc<str>>,
    /// Time-based wake-ups, earliest first: a front chunk's flush deadline
    /// or a retry. Armed when a queue's front chunk changes or a retry is
    /// scheduled, so a tick looks only at what is due instead of scanning
    /// every queue (10,000 at scale). Stale entries are harmless: a launch
    /// checks again.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// While the billing service is down: failed probes in a row and when
    /// the next probe may go (capped exponential back-off with jitter, for
    /// the endpoint as a whole on top of each VM's own).
    endpoint_attempts: u32,
    endpoint_retry_at: Option<Instant>,
    total_bytes: u64,
    total_chunks: u64,
    heartbeat_in_flight: bool,
}

/// Calls in flight at once, over all VMs.
pub const DEFAULT_CONCURRENCY: usize = 32;

impl Sender {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &BillingConfig,
        transport: Arc<dyn Transport>,
        reader: spool::Reader,
        spool: SpoolHandle,
        set: Arc<MeterSet>,
        metrics: Arc<dyn BillingMetrics>,
        shared: Arc<Shared>,
        clock: Clock,
        backlog: Vec<ChunkMeta>,
    ) -> Result<Sender, BillingError> {
        let mut s = Sender {
            transport,
            reader,
            spool,
            set,
            metrics,
            shared,
            clock,
            batch_size: cfg.batch_size,
            flush_ns: i64::try_from(cfg.flush.as_nanos()).unwrap_or(i64::MAX),
            heartbeat: cfg.heartbeat,
            retry: (cfg.retry_min, cfg.retry_max),
            max_bytes: cfg.spool_max_bytes,
            instance_id: cfg.instance_id.clone(),
            concurrency: DEFAULT_CONCURRENCY,
            queues: HashMap::default(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            endpoint_attempts: 0,
            endpoint_retry_at: None,
            total_bytes: 0,
            total_chunks: 0,
            heartbeat_in_flight: false,
        };
        if !backlog.is_empty() {
            info!(chunks = backlog.len(), "billing: delivering records spooled before the restart");
        }
        s.absorb(Notice::Committed(backlog));
        Ok(s)
    }

    fn absorb(&mut self, n: Notice) {
        let (now, now_ns) = (Instant::now(), self.clock.unix_ns());
        match n {
            Notice::Committed(chunks) => {
                for c in chunks {
                    self.total_bytes += c.bytes;
                    self.total_chunks += 1;
                    let q = self.queues.entry(c.vm.clone()).or_default();
                    q.records += u64::from(c.records.saturating_sub(c.skip));
                    q.events += u64::from(c.events);
                    if q.chunks.is_empty() {
                        let at = flush_at(self.flush_ns, c.first_ts, now, now_ns);
                        arm(&mut self.timers, q, &c.vm, at);
                    }
                    q.chunks.push_back(c);
                }
            }
            Notice::Thinned(chunks) => {
                for c in chunks {
                    let Some(q) = self.queues.get_mut(&c.vm) else { continue };
                    q.thin_pending = q.thin_pending.saturating_sub(1);
                    if let Some(old) = q.chunks.iter_mut().find(|o| o.id == c.id) {
                        q.records = q.records + u64::from(c.records.saturating_sub(c.skip))
                            - u64::from(old.records.saturating_sub(old.skip));
                        q.events = q.events + u64::from(c.events) - u64::from(old.events);
                        self.total_bytes = self.total_bytes + c.bytes - old.bytes;
                        *old = c;
                    }
                }
            }
        }
        self.publish_health();
    }

    fn due(&self, q: &VmQueue, now: Instant, now_ns: i64) -> bool {
        let Some(front) = q.chunks.front() else { return false };
        !q.in_flight
            && q.thin_pending == 0
            && q.retry_at.is_none_or(|t| now >= t)
            && (q.events > 0
                || q.records.saturating_sub(q.events) >= self.batch_size as u64
                || now_ns.saturating_sub(front.first_ts) >= self.flush_ns)
    }

    /// Starts the calls whose timers are due (on each tick), and a probe
    /// when the endpoint-wide back-off is over.
    fn fire_timers(&mut self, jobs: &mut JoinSet<Done>) {
        let (now, now_ns) = (Instant::now(), self.clock.unix_ns());
        if self.endpoint_retry_at.is_some() && !self.gated(now) {
            self.drain_ready(jobs);
        }
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, vm))) = self.timers.pop() else { break };
            let Some(q) = self.queues.get_mut(&vm) else { continue };
            if q.timer != Some(at) {
                continue;
            }
            q.timer = None;
            self.try_launch(&vm, jobs, now, now_ns);
            self.rearm(&vm, now, now_ns);
        }
    }

    /// After `vm`'s wake-up fired without starting a call: arms the next
    /// one (its retry, then its front chunk's flush deadline). A queue in
    /// flight or waiting for a slot is woken by that; one due now but held
    /// by thinning by the thinned notice.
    fn rearm(&mut self, vm: &Arc<str>, now: Instant, now_ns: i64) {
        let Some(q) = self.queues.get_mut(vm) else { return };
        if q.in_flight || q.queued {
            return;
        }
        let Some(front) = q.chunks.front() else { return };
        let at = match q.retry_at {
            Some(r) if r > now => r,
            _ => flush_at(self.flush_ns, front.first_ts, now, now_ns),
        };
        if at > now {
            arm(&mut self.timers, q, vm, at);
        }
    }

    /// Drops the stale wake-ups (of queues drained or re-armed earlier)
    /// once they outnumber the live ones, so the heap's size follows the
    /// number of queues, not the rate of deliveries.
    fn compact_timers(&mut self) {
        if self.timers.len() > 2 * self.queues.len() + 1024 {
            self.timers = self.queues.iter().filter_map(|(vm, q)| q.timer.map(|t| Reverse((t, vm.clone())))).collect();
        }
    }

    /// Finds every due VM by looking at every queue: the safety net under
    /// the timers (housekeeping runs it every few seconds).
    fn scan(&mut self, jobs: &mut JoinSet<Done>) {
        let (now, now_ns) = (Instant::now(), self.clock.unix_ns());
        let due: Vec<Arc<str>> =
            self.queues.iter().filter(|(_, q)| self.due(q, now, now_ns)).map(|(vm, _)| vm.clone()).collect();
        for vm in due {
            self.try_launch(&vm, jobs, now, now_ns);
        }
    }

    /// Queues `vm` to start when a call slot frees (once).
    fn mark_ready(&mut self, vm: &Arc<str>) {
        if let Some(q) = self.queues.get_mut(vm)
            && !q.queued
        {
            q.queued = true;
            self.ready.push_back(vm.clone());
        }
    }

    /// Call slots now: all of them, or one (a probe) while the billing
    /// service is down, so an outage costs one failing call at a time, not
    /// one per VM.
    fn slots(&self) -> usize {
        if self.endpoint_retry_at.is_some() { 1 } else { self.concurrency }
    }

    /// Whether the endpoint-wide back-off holds every call back now.
    fn gated(&self, now: Instant) -> bool {
        self.endpoint_retry_at.is_some_and(|at| now < at)
    }

    /// Starts calls of the ready VMs while slots are free.
    fn drain_ready(&mut self, jobs: &mut JoinSet<Done>) {
        let (now, now_ns) = (Instant::now(), self.clock.unix_ns());
        while jobs.len() < self.slots() && !self.gated(now) {
            let Some(vm) = self.ready.pop_front() else { break };
            if let Some(q) = self.queues.get_mut(&vm) {
                q.queued = false;
            }
            self.try_launch(&vm, jobs, now, now_ns);
            self.rearm(&vm, now, now_ns);
        }
    }

    /// Starts `vm`'s next call if it is due and a slot is free; queues it
    /// as ready when only the slot is missing.
    fn try_launch(&mut self, vm: &Arc<str>, jobs: &mut JoinSet<Done>, now: Instant, now_ns: i64) {
        let Some(q) = self.queues.get(vm) else { return };
        if !self.due(q, now, now_ns) {
            return;
        }
        if jobs.len() >= self.slots() || self.gated(now) {
            self.mark_ready(vm);
            return;
        }
        let Some(q) = self.queues.get_mut(vm) else { return };
        q.in_flight = true;
        // Chunks enough for one batch or up to the first notice.
        let mut ids = Vec::new();
        let mut samples = 0u64;
        for c in &q.chunks {
            ids.push((c.id, c.skip, c.records, c.events));
            samples += u64::from(c.records.saturating_sub(c.skip));
            if c.events > 0 || samples >= self.batch_size as u64 {
                break;
            }
        }
        let customer = q.chunks.front().map(|c| c.customer.clone()).unwrap_or_else(|| Arc::from(""));
        let transport = self.transport.clone();
        let batch = self.batch_size;
        let vm = vm.clone();
        // Exported with telemetry on (one per batch or notice; a failed send
        // is an Error span, kept at any sampling rate).
        let span = info_span!("billing.send", vm_id = %vm, outcome = Empty, otel.status_code = Empty);
        let loaded = span.in_scope(|| read_batch(&self.reader, &vm, ids));
        let job = async move {
            let done = send_one(transport, vm, customer, loaded, batch).await;
            let span = tracing::Span::current();
            match &done.result {
                Ok(()) => span.record("outcome", "ok"),
                Err(_) => span.record("outcome", "error").record("otel.status_code", "ERROR"),
            };
            Done::Vm(done)
        };
        jobs.spawn(job.instrument(span));
    }

    fn complete(&mut self, o: Outcome) {
        let Some(q) = self.queues.get_mut(&o.vm) else { return };
        q.in_flight = false;
        match o.result {
            Ok(()) => {
                let recovered = self.endpoint_retry_at.take().is_some();
                self.endpoint_attempts = 0;
                if self.shared.endpoint_down.swap(false, Ordering::Relaxed) {
                    info!("billing service reachable again; delivering the spool");
                }
                q.attempts = 0;
                q.retry_at = None;
                let mut left = o.consumed;
                let mut delete = Vec::new();
                let mut partial = None;
                while left > 0 {
                    let Some(front) = q.chunks.front_mut() else { break };
                    let avail = u64::from(front.records.saturating_sub(front.skip));
                    if left >= avail {
                        left -= avail;
                        delete.push(front.id);
                        self.total_bytes = self.total_bytes.saturating_sub(front.bytes);
                        self.total_chunks = self.total_chunks.saturating_sub(1);
                        q.chunks.pop_front();
                    } else {
                        front.skip += u32::try_from(left).unwrap_or(u32::MAX);
                        partial = Some((front.id, front.skip));
                        left = 0;
                    }
                }
                // A partly sent chunk deleted later must not be skipped twice.
                if let Some((id, _)) = partial
                    && delete.contains(&id)
                {
                    partial = None;
                }
                q.records = q.records.saturating_sub(o.consumed);
                q.events = q.events.saturating_sub(o.events);
                if o.samples > 0 {
                    self.shared.bump(&o.vm, |c| c.delivered += o.samples);
                    if let Ok(id) = crate::model::VmId::parse(&o.vm) {
                        self.metrics.batch_sent(&id);
                    }
                }
                self.spool.ack(o.vm.clone(), delete, partial);
                match q.chunks.front() {
                    None => {
                        self.queues.remove(&o.vm);
                    }
                    Some(front) => {
                        let at = flush_at(self.flush_ns, front.first_ts, Instant::now(), self.clock.unix_ns());
                        arm(&mut self.timers, q, &o.vm, at);
                    }
                }
                if recovered {
                    // Every VM waiting out a back-off may go now.
                    let waiting: Vec<Arc<str>> = self
                        .queues
                        .iter_mut()
                        .filter(|(_, q)| q.retry_at.is_some())
                        .map(|(vm, q)| {
                            q.retry_at = None;
                            vm.clone()
                        })
                        .collect();
                    for vm in waiting {
                        self.mark_ready(&vm);
                    }
                }
            }
            Err(e) => {
                q.attempts += 1;
                let delay = backoff(q.attempts, self.retry.0, self.retry.1, rand::random::<f64>());
                let now = Instant::now();
                let at = now + delay;
                q.retry_at = Some(at);
                arm(&mut self.timers, q, &o.vm, at);
                // Calls that were in flight when the outage began fail
                // together: only a probe's failure lengthens the back-off.
                if e.is_outage() && self.endpoint_retry_at.is_none_or(|at| now >= at) {
                    self.endpoint_attempts += 1;
                    let wait = backoff(self.endpoint_attempts, self.retry.0, self.retry.1, rand::random::<f64>());
                    self.endpoint_retry_at = Some(now + wait);
                }
                let msg = chain(&e);
                if !self.shared.endpoint_down.swap(true, Ordering::Relaxed) {
                    warn!(error = %msg, "billing service unavailable; spooling samples and retrying");
                } else {
                    debug!(vm_id = %o.vm, attempt = q.attempts, retry_ms = delay.as_millis(), error = %msg, "billing send failed");
                }
            }
        }
        self.publish_health();
    }

    /// Thins the oldest unsent chunks when the spool is over its limit.
    fn maybe_thin(&mut self) {
        if self.total_bytes <= self.max_bytes {
            return;
        }
        let target = self.total_bytes - self.max_bytes * 9 / 10;
        let mut candidates: Vec<(i64, Arc<str>, u64)> = Vec::new();
        for (vm, q) in &self.queues {
            if q.in_flight {
                continue;
            }
            for c in q.chunks.iter().skip(1) {
                let samples = c.records.saturating_sub(c.events);
                if !c.thinned && c.skip == 0 && samples > 3 {
                    // Thinning keeps three records of the run: estimate the rest's share.
                    let gain = c.bytes * u64::from(samples - 3) / u64::from(c.records.max(1));
                    candidates.push((c.id, vm.clone(), gain));
                }
            }
        }
        candidates.sort_unstable_by_key(|c| c.0);
        let mut saved = 0u64;
        let mut ids = Vec::new();
        for (id, vm, gain) in candidates {
            if saved >= target {
                break;
            }
            saved += gain;
            ids.push(id);
            if let Some(q) = self.queues.get_mut(&vm) {
                q.thin_pending += 1;
                if let Some(c) = q.chunks.iter_mut().find(|c| c.id == id) {
                    c.thinned = true;
                }
            }
        }
        if !ids.is_empty() {
            warn!(
                spool_bytes = self.total_bytes,
                limit_bytes = self.max_bytes,
                chunks = ids.len(),
                "billing spool over its limit: thinning the oldest unsent samples (gap notices follow)"
            );
            self.spool.thin(ids);
        }
    }

    fn publish_health(&self) {
        self.shared.spool_bytes.store(self.total_bytes, Ordering::Relaxed);
        self.shared.spool_chunks.store(self.total_chunks, Ordering::Relaxed);
    }

    fn publish_oldest(&self) {
        let oldest = self.queues.values().filter_map(|q| q.chunks.front()).map(|c| c.first_ts).min().unwrap_or(0);
        self.shared.oldest_unsent_ns.store(u64::try_from(oldest).unwrap_or(0), Ordering::Relaxed);
    }
}

/// Records of a batch: `(records, (records, notices) of leading chunks
/// that are gone)`.
type Loaded = Result<(Vec<Record>, (u64, u64)), SendError>;

/// Reads the chunks `ids` of `vm` (skipping what was sent of each). Runs
/// on the sender task itself: a few KB just written are in the page cache,
/// so this takes microseconds, and a thread hop per batch (a blocking-pool
/// task) cost more in wake-ups than the read.
fn read_batch(reader: &spool::Reader, vm: &str, ids: Vec<(i64, u32, u32, u32)>) -> Loaded {
    let mut records = Vec::new();
    let mut gone = (0u64, 0u64);
    let mut k = 0;
    let mut stop = false;
    reader.read_with(&ids.iter().map(|c| c.0).collect::<Vec<_>>(), |id, blob| {
        let (_, skip, n, events) = ids[k];
        k += 1;
        if stop {
            return Ok(());
        }
        match blob {
            Some(b) => Record::decode_into(b, usize::try_from(skip).unwrap_or(usize::MAX), &mut records)
                .ok_or(SpoolError::Corrupt(id)),
            // Cannot happen while this process is the only writer; keep
            // the accounting right and move on rather than stall the VM.
            None if records.is_empty() => {
                warn!(vm_id = %vm, chunk = id, "billing spool chunk vanished; skipping it");
                gone.0 += u64::from(n.saturating_sub(skip));
                gone.1 += u64::from(events);
                Ok(())
            }
            None => {
                stop = true;
                Ok(())
            }
        }
    })?;
    Ok((records, gone))
}

/// Makes one call with a VM's next records.
async fn send_one(
    transport: Arc<dyn Transport>,
    vm: Arc<str>,
    customer: Arc<str>,
    loaded: Loaded,
    batch: usize,
) -> Outcome {
    let mut out = Outcome { vm: vm.clone(), consumed: 0, events: 0, samples: 0, result: Ok(()) };
    let (records, gone) = match loaded {
        Ok(r) => r,
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    (out.consumed, out.events) = gone;
    let Some(p) = plan(records, batch) else { return out };
    let (req, samples) = match p {
        Plan::Batch(s) => {
            let n = s.len() as u64;
            (Request::Batch { vm: vm.clone(), customer, samples: s }, Some(n))
        }
        Plan::Notice(r) => match r.kind {
            Kind::Started => (Request::Started { vm: vm.clone(), customer, ts: r.ts_ns }, None),
            Kind::Stopped => (Request::Stopped { vm: vm.clone(), ts: r.ts_ns }, None),
            Kind::Gap | Kind::Sample => (Request::Gap { vm: vm.clone(), last_sent: r.v[0], resume: r.ts_ns }, None),
        },
    };
    out.result = transport.call(&req).await;
    match samples {
        Some(n) => {
            out.consumed += n;
            out.samples = n;
        }
        None => {
            out.consumed += 1;
            out.events += 1;
        }
    }
    out
}

/// When a front chunk whose first record is at `first_ts` is due by the
/// flush deadline, on tokio's clock.
fn flush_at(flush_ns: i64, first_ts: i64, now: Instant, now_ns: i64) -> Instant {
    let left = flush_ns.saturating_sub(now_ns.saturating_sub(first_ts)).max(0);
    now + Duration::from_nanos(u64::try_from(left).unwrap_or(0))
}

/// Runs until `stop` fires. Calls in flight are abandoned; their records
/// stay in the spool and are sent again after the next start.
pub async fn run(mut s: Sender, mut notices: mpsc::UnboundedReceiver<Notice>, stop: CancellationToken) {
    let mut jobs: JoinSet<Done> = JoinSet::new();
    // Flush deadlines and retries are found by a scan of every queue; new
    // records and finished calls are looked at as they come.
    let scan_every = (s.flush_ns / 10)
        .min(i64::try_from(s.retry.0.as_nanos() / 2).unwrap_or(i64::MAX))
        .clamp(10_000_000, 1_000_000_000);
    let mut tick = tokio::time::interval(Duration::from_nanos(u64::try_from(scan_every).unwrap_or(1_000_000_000)));
    let mut housekeeping = Instant::now();
    let mut rounds = 0u64;
    // Chunks left from before a restart may be due at once.
    s.scan(&mut jobs);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(s.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(n) = notices.recv() => {
                let vms: Vec<Arc<str>> = match &n {
                    Notice::Committed(c) | Notice::Thinned(c) => c.iter().map(|c| c.vm.clone()).collect(),
                };
                s.absorb(n);
                let (now, now_ns) = (Instant::now(), s.clock.unix_ns());
                for vm in vms {
                    s.try_launch(&vm, &mut jobs, now, now_ns);
                }
            }
            Some(done) = jobs.join_next(), if !jobs.is_empty() => match done {
                Ok(Done::Vm(o)) => {
                    let vm = o.vm.clone();
                    s.complete(o);
                    s.try_launch(&vm, &mut jobs, Instant::now(), s.clock.unix_ns());
                    s.drain_ready(&mut jobs);
                }
                Ok(Done::Heartbeat(r)) => {
                    s.heartbeat_in_flight = false;
                    match r {
                        Ok(()) => s.metrics.heartbeat_sent(),
                        Err(e) => debug!(error = %chain(&e), "billing heartbeat failed"),
                    }
                }
                Err(e) => warn!(error = %e, "billing send task failed"),
            },
            _ = tick.tick() => {
                s.fire_timers(&mut jobs);
                if housekeeping.elapsed() >= Duration::from_secs(1) {
                    housekeeping = Instant::now();
                    s.maybe_thin();
                    s.publish_oldest();
                    s.compact_timers();
                    rounds += 1;
                    if rounds.is_multiple_of(5) {
                        s.scan(&mut jobs);
                    }
                }
            }
            _ = heartbeat.tick() => {
                if !s.heartbeat_in_flight {
                    s.heartbeat_in_flight = true;
                    let req = Request::Heartbeat { instance: s.instance_id.clone(), vms: s.set.ids() };
                    let t = s.transport.clone();
                    jobs.spawn(async move { Done::Heartbeat(t.call(&req).await) });
                }
            }
        }
    }
    jobs.shutdown().await;
}

#[cfg(test)]
#[path = "sender_tests.rs"]
mod tests;
