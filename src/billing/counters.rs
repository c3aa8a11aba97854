//! What the stages count: the per-VM [`VmCounters`] and pipeline gauges in
//! [`Shared`] (read by `/_/health` through the facade), and the
//! [`BillingMetrics`] sink they report to. A leaf: it imports nothing of
//! billing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::model::VmId;

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
    /// `metald_billing_spool_corrupt_frames_total`: damaged spool regions
    /// skipped at start (each answered with gap notices).
    fn spool_corrupt_frames(&self, _n: u64) {}
    /// `metald_billing_spool_write_errors_total`: one spool commit failed.
    fn spool_write_failed(&self) {}
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
    fn spool_corrupt_frames(&self, n: u64) {
        crate::telemetry::BillingMetrics::spool_corrupt_frames(self, n);
    }
    fn spool_write_failed(&self) {
        crate::telemetry::BillingMetrics::spool_write_failed(self);
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
    pub(super) spool_bytes: AtomicU64,
    pub(super) spool_chunks: AtomicU64,
    /// Unix ns of the oldest unsent record, 0 when none.
    pub(super) oldest_unsent_ns: AtomicU64,
    pub(super) endpoint_down: AtomicBool,
    pub(super) lateness: Mutex<std::collections::VecDeque<Duration>>,
    pub(super) rounds: AtomicU64,
    /// Unix seconds since when spool commits fail; 0 while they work.
    pub(super) spool_failing_since: std::sync::atomic::AtomicI64,
    /// Spool commits that failed since start.
    pub(super) spool_write_errors: AtomicU64,
}

/// How many recent tick latenesses are kept.
const LATENESS_WINDOW: usize = 4096;

impl Shared {
    /// Every VM's counters now.
    pub(super) fn counters(&self) -> HashMap<String, VmCounters> {
        let mut out = self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (vm, n) in self.collected.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.entry(vm.clone()).or_default().collected = n.load(Ordering::Relaxed);
        }
        out
    }

    /// The spool writer's `collected` counter of `vm` (it keeps the `Arc`,
    /// so each commit adds without a map lookup).
    pub(super) fn collected_cell(&self, vm: &str) -> Arc<AtomicU64> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner()).entry(vm.to_owned()).or_default().clone()
    }

    pub(super) fn bump(&self, vm: &str, f: impl FnOnce(&mut VmCounters)) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(vm) {
            Some(v) => f(v),
            None => f(c.entry(vm.to_owned()).or_default()),
        }
    }

    pub(super) fn record_lateness(&self, d: Duration) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lateness.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATENESS_WINDOW {
            l.pop_front();
        }
        l.push_back(d);
    }
}
