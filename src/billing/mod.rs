//! Billing: 100 ms metering of every running VM, streamed to the billing
//! service (`billing.v1.BillingService`) with zero loss.
//!
//! Data flow (one direction, each stage owned by one task):
//! - [`BillingObserver`] (a [`crate::core::Observer`]) turns committed VM
//!   events into "start/stop metering" and keeps the set of metered VMs;
//! - [`collector`]: ONE tokio task ticks every interval and samples every
//!   metered VM through [`crate::backend::Backend::usage`] into the VM's
//!   sample buffer (no channel message, no map lookup per sample);
//! - [`spool`]: a dedicated OS thread owns the append-only log
//!   `<data dir>/billing-spool/` ([`log`]); at each group commit it drains
//!   the queued rounds and appends samples and start/stop/gap notices, one
//!   chunk per VM per commit, in per-VM order, as one frame;
//! - [`sender`]: reads committed chunks per VM strictly in order, sends them
//!   as batches or notices, and deletes them only once acknowledged.
//!
//! Configuration lives in [`config`]; a development billing service that
//! stores what it receives is in [`devserver`].

pub mod codec;
pub mod collector;
pub mod config;
pub mod devserver;
pub mod log;
pub mod sender;
pub mod spool;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::{Backend, Runtime};
use crate::core::spec::{VmId, VmSpec};
use crate::core::state::VmState;
use crate::core::{Cause, Manager, Observer, VmEvent};
pub use config::BillingConfig;

/// Counters the billing pipeline reports. The telemetry module implements
/// this with the `metald_*` metrics; [`NoopMetrics`] is the default.
pub trait BillingMetrics: Send + Sync + 'static {
    /// `metald_metrics_collected_total{vm_id}`: `n` usage samples of `vm`
    /// spooled (reported once per VM per group commit, not per sample).
    fn samples_collected(&self, vm: &str, n: u64);
    /// `metald_billing_batches_sent_total{vm_id}`: one batch acknowledged.
    fn batch_sent(&self, vm: &VmId);
    /// `metald_heartbeat_sent_total`: one heartbeat acknowledged.
    fn heartbeat_sent(&self);
}

/// Metrics sink that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopMetrics;

impl BillingMetrics for NoopMetrics {
    fn samples_collected(&self, _vm: &str, _n: u64) {}
    fn batch_sent(&self, _vm: &VmId) {}
    fn heartbeat_sent(&self) {}
}

/// The telemetry module's counters (no-ops when telemetry is off).
impl BillingMetrics for crate::telemetry::BillingMetrics {
    fn samples_collected(&self, vm: &str, n: u64) {
        crate::telemetry::BillingMetrics::samples_collected(self, vm, n);
    }
    fn batch_sent(&self, vm: &VmId) {
        crate::telemetry::BillingMetrics::batch_sent(self, vm);
    }
    fn heartbeat_sent(&self) {
        crate::telemetry::BillingMetrics::heartbeat_sent(self);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing spool {path}")]
    Spool {
        path: String,
        #[source]
        source: spool::SpoolError,
    },
    #[error("billing endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("starting the billing spool thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Unix nanoseconds derived from tokio's clock, anchored once at start, so
/// sample timestamps follow `tokio::time::pause`/`advance` in tests and stay
/// monotonic when the wall clock is stepped.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_unix_ns: i64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { base_unix_ns: crate::util::unix_nanos(), base: tokio::time::Instant::now() }
    }

    pub fn unix_ns(&self) -> i64 {
        let d = tokio::time::Instant::now().saturating_duration_since(self.base);
        self.base_unix_ns.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Per-VM counters, for tests and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VmCounters {
    /// Samples accepted into the spool.
    pub collected: u64,
    /// Samples acknowledged by the billing service.
    pub delivered: u64,
    /// Samples removed by thinning (covered by a gap notice).
    pub thinned: u64,
}

/// State shared by the pipeline stages and read by `/_/health`.
#[derive(Default)]
pub struct Shared {
    /// Delivered and thinned per VM (`collected` lives in `collected`).
    counters: Mutex<HashMap<String, VmCounters>>,
    collected: Mutex<HashMap<String, Arc<AtomicU64>>>,
    spool_bytes: AtomicU64,
    spool_chunks: AtomicU64,
    /// Unix ns of the oldest unsent record, 0 when none.
    oldest_unsent_ns: AtomicU64,
    endpoint_down: AtomicBool,
    lateness: Mutex<std::collections::VecDeque<Duration>>,
    rounds: AtomicU64,
}

/// How many recent tick latenesses are kept.
const LATENESS_WINDOW: usize = 4096;

impl Shared {
    /// Every VM's counters now.
    fn counters(&self) -> HashMap<String, VmCounters> {
        let mut out = self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (vm, n) in self.collected.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.entry(vm.clone()).or_default().collected = n.load(Ordering::Relaxed);
        }
        out
    }

    /// The spool writer's `collected` counter of `vm` (it keeps the `Arc`,
    /// so each commit adds without a map lookup).
    fn collected_cell(&self, vm: &str) -> Arc<AtomicU64> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner()).entry(vm.to_owned()).or_default().clone()
    }

    fn bump(&self, vm: &str, f: impl FnOnce(&mut VmCounters)) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(vm) {
            Some(v) => f(v),
            None => f(c.entry(vm.to_owned()).or_default()),
        }
    }

    fn record_lateness(&self, d: Duration) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lateness.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATENESS_WINDOW {
            l.pop_front();
        }
        l.push_back(d);
    }
}

/// What `/_/health` shows under `billing`.
#[derive(Debug, Clone, Serialize)]
pub struct BillingHealth {
    pub enabled: bool,
    pub mock_mode: bool,
    pub endpoint: String,
    pub endpoint_ok: bool,
    pub metered_vms: usize,
    pub spool_bytes: u64,
    pub spool_chunks: u64,
    pub oldest_unsent_age_ms: u64,
    pub collection_rounds: u64,
}

/// A VM being metered, as the collector needs it.
#[derive(Debug)]
pub struct Metered {
    pub id: VmId,
    pub key: Arc<str>,
    pub spec: Arc<VmSpec>,
    pub rt: Runtime,
    pub dir: PathBuf,
    /// Metering run; samples of an older run are dropped by the spool.
    pub generation: u64,
}

/// One collection round: `samples[k]` is `vms[k]`'s sample (`None` when
/// the backend could not measure it). The collector queues whole rounds —
/// one dense vector a tick, no per-VM buffer or lock — and the spool
/// writer reads them VM by VM at each group commit.
#[derive(Debug)]
pub(crate) struct Round {
    pub vms: Arc<Vec<Arc<Metered>>>,
    pub samples: Vec<Option<codec::Record>>,
}

/// The set of metered VMs, with a snapshot the collector reuses between
/// changes.
#[derive(Default)]
pub struct MeterSet {
    inner: Mutex<MeterSetInner>,
    /// Rounds collected since the spool writer last took them.
    rounds: Mutex<Vec<Round>>,
    /// Sample vectors the writer is done with, for the next rounds (at
    /// 10,000 VMs a round is ~700 KB: reusing it saves the page faults).
    spare: Mutex<Vec<Vec<Option<codec::Record>>>>,
}

/// Sample vectors kept for reuse (a commit's worth of rounds and some).
const SPARE_ROUNDS: usize = 16;

#[derive(Default)]
struct MeterSetInner {
    vms: HashMap<VmId, Arc<Metered>>,
    snapshot: Option<Arc<Vec<Arc<Metered>>>>,
}

impl MeterSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, MeterSetInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every metered VM (rebuilt only after a change).
    pub fn snapshot(&self) -> Arc<Vec<Arc<Metered>>> {
        let mut g = self.lock();
        if let Some(s) = &g.snapshot {
            return s.clone();
        }
        let s = Arc::new(g.vms.values().cloned().collect::<Vec<_>>());
        g.snapshot = Some(s.clone());
        s
    }

    pub fn len(&self) -> usize {
        self.lock().vms.len()
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, Vec<Round>> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push_round(&self, r: Round) {
        self.rounds().push(r);
    }

    pub(crate) fn take_rounds(&self) -> Vec<Round> {
        std::mem::take(&mut *self.rounds())
    }

    /// An empty sample vector, reused when one is spare.
    pub(crate) fn sample_vec(&self) -> Vec<Option<codec::Record>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default()
    }

    /// Gives the sample vectors of processed rounds back for reuse.
    pub(crate) fn recycle(&self, rounds: Vec<Round>) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        for mut r in rounds {
            if spare.len() >= SPARE_ROUNDS {
                break;
            }
            r.samples.clear();
            spare.push(r.samples);
        }
    }

    /// Takes the queued samples of run `generation` of `key` out of the
    /// rounds (a stop hands them over ahead of its notice), in order.
    pub(crate) fn take_samples(&self, key: &Arc<str>, generation: u64) -> Vec<codec::Record> {
        let mut out = Vec::new();
        for r in self.rounds().iter_mut() {
            // A run's key is one shared `Arc` from start to stop.
            let at = r.vms.iter().position(|m| Arc::ptr_eq(&m.key, key));
            if let Some(k) = at
                && r.vms[k].generation == generation
                && let Some(s) = r.samples[k].take()
            {
                out.push(s);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().vms.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }
}

/// Turns committed VM events into metering starts and stops.
pub struct BillingObserver {
    set: Arc<MeterSet>,
    spool: spool::SpoolHandle,
    clock: Clock,
    vms_dir: PathBuf,
    next_generation: AtomicU64,
}

impl BillingObserver {
    fn meter(
        &self,
        id: &VmId,
        customer: &str,
        spec: &Arc<VmSpec>,
        rt: Option<&Runtime>,
        running: bool,
        recovered: bool,
    ) {
        let mut g = self.set.lock();
        let was = g.vms.get(id).cloned();
        match (was, running, rt) {
            (None, true, Some(rt)) => {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                let key: Arc<str> = Arc::from(id.as_str());
                g.vms.insert(
                    id.clone(),
                    Arc::new(Metered {
                        id: id.clone(),
                        key: key.clone(),
                        spec: spec.clone(),
                        rt: rt.clone(),
                        dir: self.vms_dir.join(id.as_str()),
                        generation,
                    }),
                );
                g.snapshot = None;
                self.spool.start(key, customer.to_owned(), generation, recovered, self.clock.unix_ns());
            }
            (Some(m), true, Some(rt)) if &m.rt != rt => {
                // Same run, new runtime (e.g. a reboot that restarted the VMM).
                let updated = Metered {
                    rt: rt.clone(),
                    key: m.key.clone(),
                    id: m.id.clone(),
                    spec: m.spec.clone(),
                    dir: m.dir.clone(),
                    generation: m.generation,
                };
                g.vms.insert(id.clone(), Arc::new(updated));
                g.snapshot = None;
            }
            (Some(m), false, _) | (Some(m), true, None) => {
                g.vms.remove(id);
                g.snapshot = None;
                self.spool.stop(m.key.clone(), self.clock.unix_ns());
            }
            _ => {}
        }
    }
}

impl Observer for BillingObserver {
    fn on_event(&self, ev: &VmEvent) {
        let running = ev.to == Some(VmState::Running);
        self.meter(&ev.vm_id, &ev.customer.0, &ev.spec, ev.runtime.as_ref(), running, ev.cause == Cause::Recovered);
    }
}

/// Read side of the running pipeline (health, tests, benches); cheap to clone.
#[derive(Clone)]
pub struct BillingStatus {
    cfg: Arc<BillingConfig>,
    shared: Arc<Shared>,
    set: Arc<MeterSet>,
    spool: spool::SpoolHandle,
}

impl BillingStatus {
    pub fn health(&self) -> BillingHealth {
        let oldest = self.shared.oldest_unsent_ns.load(Ordering::Relaxed);
        let age_ns =
            if oldest == 0 { 0 } else { u64::try_from(crate::util::unix_nanos()).unwrap_or(0).saturating_sub(oldest) };
        BillingHealth {
            enabled: true,
            mock_mode: self.cfg.mock_mode,
            endpoint: self.cfg.endpoint.clone(),
            endpoint_ok: !self.shared.endpoint_down.load(Ordering::Relaxed),
            metered_vms: self.set.len(),
            spool_bytes: self.shared.spool_bytes.load(Ordering::Relaxed),
            spool_chunks: self.shared.spool_chunks.load(Ordering::Relaxed),
            oldest_unsent_age_ms: age_ns / 1_000_000,
            collection_rounds: self.shared.rounds.load(Ordering::Relaxed),
        }
    }

    /// Per-VM collected/delivered/thinned counters since this start.
    pub fn counters(&self) -> HashMap<String, VmCounters> {
        self.shared.counters()
    }

    /// Lateness of recent collection ticks (newest last).
    pub fn tick_lateness(&self) -> Vec<Duration> {
        self.shared.lateness.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }

    /// Ids of the VMs being metered.
    pub fn metered(&self) -> Vec<String> {
        self.set.ids()
    }

    /// Commits everything collected so far to disk.
    pub async fn flush(&self) {
        self.spool.flush().await;
    }
}

/// The running billing pipeline.
pub struct Billing {
    status: BillingStatus,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Billing {
    /// Opens the spool in `data_dir`, starts the collector and sender, and
    /// subscribes to `manager`. VMs that are running already (found again
    /// after a restart) are metered at once, with a gap notice when they
    /// were metered before. The tasks end when `stop` fires.
    pub async fn start(
        cfg: BillingConfig,
        data_dir: &Path,
        manager: &Manager,
        metrics: Arc<dyn BillingMetrics>,
        stop: CancellationToken,
    ) -> Result<Billing, BillingError> {
        let clock = Clock::new();
        let shared = Arc::new(Shared::default());
        let set = Arc::new(MeterSet::default());
        let (spool, writer, committed, backlog, reader) =
            spool::start(data_dir, cfg.commit_interval, set.clone(), shared.clone(), metrics.clone())?;
        let observer = Arc::new(BillingObserver {
            set: set.clone(),
            spool: spool.clone(),
            clock,
            vms_dir: data_dir.join("vms"),
            next_generation: AtomicU64::new(1),
        });
        manager.add_observer(observer.clone());
        for v in manager.active() {
            if v.state() == VmState::Running {
                observer.meter(&v.id, &v.customer.0, &v.spec, v.status.runtime(), true, true);
            }
        }
        spool.reconcile(clock.unix_ns());
        let backend: Arc<dyn Backend> = manager.backend().clone();
        let transport = sender::transport(&cfg)?;
        let sender = sender::Sender::new(
            &cfg,
            transport,
            reader,
            spool.clone(),
            set.clone(),
            metrics.clone(),
            shared.clone(),
            clock,
            backlog,
        )?;
        let collector = collector::Collector {
            backend,
            set: set.clone(),
            shared: shared.clone(),
            clock,
            interval: cfg.interval,
            concurrency: collector::DEFAULT_CONCURRENCY,
        };
        let tasks = vec![
            tokio::spawn(collector::run(collector, stop.clone())),
            tokio::spawn(sender::run(sender, committed, stop)),
        ];
        info!(
            endpoint = %cfg.endpoint,
            mock = cfg.mock_mode,
            interval_ms = u64::try_from(cfg.interval.as_millis()).unwrap_or(u64::MAX),
            metered = set.len(),
            "billing started"
        );
        let status = BillingStatus { cfg: Arc::new(cfg), shared, set, spool };
        Ok(Billing { status, tasks, writer: Some(writer) })
    }

    pub fn status(&self) -> BillingStatus {
        self.status.clone()
    }

    /// Waits for the tasks after the stop token fired, then commits and
    /// closes the spool.
    pub async fn wait(mut self) {
        for t in self.tasks.drain(..) {
            if let Err(e) = t.await {
                warn!(error = %e, "billing task failed");
            }
        }
        self.status.spool.close();
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }
}

/// An error and its sources on one line, printed once at the edge.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
