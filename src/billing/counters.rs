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
    /// VMs whose metering ended, oldest first, with the generation of
    /// their latest retirement; past [`RETIRED_KEEP`] their counters go.
    retired: Mutex<Retired>,
}

/// How many VMs no longer metered keep their counters (for tests and
/// health): without a bound, a host creating VMs with fresh ids grows the
/// counter maps by one entry per VM forever.
pub(super) const RETIRED_KEEP: usize = 4096;

#[derive(Default)]
struct Retired {
    order: std::collections::VecDeque<(String, u64)>,
    latest: HashMap<String, u64>,
    next: u64,
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

    /// `vm` is no longer metered (its writer slot was freed). Once
    /// [`RETIRED_KEEP`] VMs retired after it, its counters are dropped,
    /// unless it is metered again by then (the writer holds its
    /// `collected` cell) or retired again later (a newer generation).
    /// A VM whose records are delivered only after that (a long billing
    /// outage) gets a fresh `delivered` entry: counters are for tests and
    /// health, the spool and the billing service hold the usage itself.
    pub(super) fn retire(&self, vm: &str) {
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let generation = r.next;
        r.next += 1;
        r.latest.insert(vm.to_owned(), generation);
        r.order.push_back((vm.to_owned(), generation));
        while r.order.len() > RETIRED_KEEP {
            let Some((old, generation)) = r.order.pop_front() else { break };
            if r.latest.get(&old) != Some(&generation) {
                continue;
            }
            r.latest.remove(&old);
            let mut collected = self.collected.lock().unwrap_or_else(|p| p.into_inner());
            if collected.get(&old).is_some_and(|c| Arc::strong_count(c) > 1) {
                continue;
            }
            collected.remove(&old);
            drop(collected);
            self.counters.lock().unwrap_or_else(|p| p.into_inner()).remove(&old);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn metered_once(shared: &Shared, vm: &str) {
        shared.collected_cell(vm).fetch_add(1, Ordering::Relaxed);
        shared.bump(vm, |c| c.delivered += 1);
        shared.retire(vm);
    }

    #[test]
    fn counters_of_retired_vms_are_bounded_and_live_or_recent_ones_kept() {
        let shared = Shared::default();
        // A VM metered again after retiring (its writer holds the cell),
        // and one retired early and again late: both keep their counters.
        let live = shared.collected_cell("live");
        shared.retire("live");
        metered_once(&shared, "again");
        // "again" retires a second time before its first retirement falls
        // out of the window: the stale entry must not take its counters.
        for i in 0..RETIRED_KEEP + RETIRED_KEEP / 4 {
            metered_once(&shared, &format!("vm-{i}"));
            if i == RETIRED_KEEP / 2 {
                metered_once(&shared, "again");
            }
        }
        let counters = shared.counters();
        assert!(counters.len() <= RETIRED_KEEP + 2, "{} counters kept", counters.len());
        assert!(counters.contains_key("live"));
        assert_eq!(counters["again"].collected, 2);
        assert!(!counters.contains_key("vm-0"));
        let newest = format!("vm-{}", RETIRED_KEEP + RETIRED_KEEP / 4 - 1);
        assert_eq!(counters[&newest], VmCounters { collected: 1, delivered: 1, thinned: 0 });
        drop(live);
    }
}
