//! Billing: 100 ms metering of every running VM, streamed to the billing
//! service (`billing.v1.BillingService`) with zero loss. This file only wires
//! the stages together ([`Billing::start`], [`Billing::wait`]) and holds the
//! facade the daemon and `/_/health` use ([`BillingStatus`],
//! [`BillingHealth`]); it re-exports the rest of the public API.
//!
//! Data flow (one direction, each stage owned by one task):
//! - [`observer`] ([`BillingObserver`], a [`crate::core::Observer`]) turns
//!   committed VM events into "start/stop metering" and keeps the set of
//!   metered VMs ([`meter::MeterSet`]);
//! - [`collector`]: ONE tokio task ticks every interval and samples every
//!   metered VM through [`crate::backend::Backend::usage`], queueing each
//!   round as one dense vector (no channel message, no map lookup per
//!   sample);
//! - [`writer`]: a dedicated OS thread owns the append-only log
//!   `<data dir>/billing-spool/` ([`log`], frames in [`frame`]); at each
//!   group commit it drains the queued rounds and appends samples and
//!   start/stop/gap notices ([`codec`]), one chunk per VM per commit, in
//!   per-VM order, as one frame; the others reach it through [`spool`]'s
//!   handle;
//! - [`sender`]: reads committed chunks per VM strictly in order, sends them
//!   as batches or notices through a [`transport`], and deletes them only
//!   once acknowledged.
//!
//! Imports go one way. Each file imports only files listed before it:
//!
//! 1. leaves: [`codec`] (records, varints, zigzag), [`config`],
//!    [`counters`] (shared counters, metrics sink), [`error`], [`meter`]
//!    (meter set, rounds, clock; imports `codec`);
//! 2. [`collector`] (leaves only);
//! 3. [`frame`] → [`log`] (the spool's storage);
//! 4. [`spool`] (handle, notices, chunk metadata) → [`writer`] (the spool
//!    writer thread);
//! 5. [`observer`] (leaves and `spool`);
//! 6. [`transport`] → [`sender`];
//! 7. this file, which imports any of them; nothing imports it.
//!
//! [`devserver`], a development billing service that stores what it receives,
//! stands apart (it imports none of the above).

pub mod codec;
pub mod collector;
pub mod config;
pub mod counters;
pub mod devserver;
pub mod error;
pub mod frame;
pub mod log;
pub mod meter;
pub mod observer;
pub mod sender;
pub mod spool;
pub mod transport;
pub mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::core::Manager;
use crate::model::VmState;
pub use config::BillingConfig;
pub use counters::{BillingMetrics, NoopMetrics, Shared, VmCounters};
pub use error::BillingError;
pub use meter::{Clock, MeterSet, Metered};
pub use observer::BillingObserver;
use spool::SpoolHandle;

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
    /// The last spool commit succeeded (samples are on disk).
    pub spool_ok: bool,
    /// Unix seconds since when spool commits fail, while they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_failing_since: Option<i64>,
    /// Spool commits that failed since start (a full disk, say).
    pub spool_write_errors: u64,
}

impl BillingHealth {
    /// Whether metering is safe: samples reach the disk. (An unreachable
    /// billing service is not unhealthy: the spool holds the samples.)
    pub fn ok(&self) -> bool {
        self.spool_ok
    }
}

/// Read side of the running pipeline (health, tests, benches); cheap to clone.
#[derive(Clone)]
pub struct BillingStatus {
    cfg: Arc<BillingConfig>,
    shared: Arc<Shared>,
    set: Arc<MeterSet>,
    spool: SpoolHandle,
}

impl BillingStatus {
    pub fn health(&self) -> BillingHealth {
        let oldest = self.shared.oldest_unsent_ns.load(Ordering::Relaxed);
        let failing_since = self.shared.spool_failing_since.load(Ordering::Relaxed);
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
            spool_ok: failing_since == 0,
            spool_failing_since: (failing_since != 0).then_some(failing_since),
            spool_write_errors: self.shared.spool_write_errors.load(Ordering::Relaxed),
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
            writer::start(data_dir, cfg.commit_interval, set.clone(), shared.clone(), metrics.clone())?;
        let observer = Arc::new(BillingObserver::new(set.clone(), spool.clone(), clock, data_dir.join("vms")));
        manager.add_observer(observer.clone());
        for v in manager.active() {
            if v.state() == VmState::Running {
                observer.meter(&v.host_id, &v.customer.0, &v.spec, v.status.runtime(), true, true);
            }
        }
        spool.reconcile(clock.unix_ns());
        let backend: Arc<dyn Backend> = manager.backend().clone();
        let transport = transport::transport(&cfg)?;
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
            net: manager.host_net(),
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
