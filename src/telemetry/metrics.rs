//! metald's own metrics, registered once at start with help text and typed
//! label values. Every handle is a cheap clone and a no-op when telemetry is
//! disabled, so callers never check a flag.
//!
//! Instrument names are OpenTelemetry names; the Prometheus exporter (and
//! any OTLP→Prometheus translation) adds the unit and `_total` suffixes, so
//! `metald_vm_operations` is scraped as `metald_vm_operations_total` and
//! `metald_vm_operation_duration` (unit `s`) as
//! `metald_vm_operation_duration_seconds`. docs/METRICS.md lists them all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use connectrpc::ErrorCode;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, Counter, Histogram, Meter, ObservableCounter, ObservableUpDownCounter,
};

pub use crate::model::Operation;
use crate::model::{StopReason, VmId};

/// Buckets of `metald_vm_operation_duration_seconds` and
/// `rpc.server.duration`: 0.5 ms to 60 s.
pub const OPERATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Buckets of `http.server.request.duration` (semconv advice, seconds).
pub const HTTP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// Handle to every metald metric; `Metrics::default()` is the disabled one.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Instruments>>,
    billing: BillingMetrics,
}

/// Outcomes of an RPC: OK and the 16 Connect/gRPC error codes, indexed by
/// gRPC status code.
const OUTCOMES: usize = 17;

/// Number of label sets of `rpc.server.duration` bound (see `rpc::rpc_key`).
pub(crate) const RPC_KEYS: usize = 2 * Operation::ALL.len() * OUTCOMES;
/// Number of label sets of `http.server.request.duration` bound (see
/// `rpc::http_key`); other (rare) status codes are recorded unbound.
pub(crate) const HTTP_KEYS: usize = 10 * 6 * 16;

/// An instrument's handles bound to the label sets of a bounded family,
/// indexed densely, each bound on first use (a label set never seen
/// exports no zero series). Recording through a bound handle skips the
/// SDK's per-call sort, hash and look-up of the attributes: the telemetry
/// bench measured those (SipHash over every attribute, a map probe under a
/// lock) at a fifth of telemetry's cost per GetVmInfo. Binding is the SDK's
/// `experimental_metrics_bound_instruments` feature (the specification's
/// `Bind`, status Development).
struct Bound<H> {
    slots: Box<[OnceLock<H>]>,
}

impl<H> Bound<H> {
    fn new(len: usize) -> Self {
        Bound { slots: (0..len).map(|_| OnceLock::new()).collect() }
    }
}

/// Records `v` on `h` with the attributes `attrs()`, through the handle
/// bound at `key` when there is one.
fn record(
    h: &Histogram<f64>,
    bound: &Bound<BoundHistogram<f64>>,
    key: Option<usize>,
    attrs: &dyn Fn() -> Vec<KeyValue>,
    v: f64,
) {
    match key.and_then(|k| bound.slots.get(k)) {
        Some(slot) => slot.get_or_init(|| h.bind(&attrs())).record(v),
        None => h.record(v, &attrs()),
    }
}

struct Instruments {
    operations: Counter<u64>,
    operations_bound: Bound<BoundCounter<u64>>,
    operation_duration: Histogram<f64>,
    operation_duration_bound: Bound<BoundHistogram<f64>>,
    rpc_duration: Histogram<f64>,
    rpc_duration_bound: Bound<BoundHistogram<f64>>,
    http_duration: Histogram<f64>,
    http_duration_bound: Bound<BoundHistogram<f64>>,
    http_active: Arc<Active>,
    // Held so the callback lives as long as the handle.
    _http_active: ObservableUpDownCounter<i64>,
    connections_refused: Counter<u64>,
    connection_timeouts: Counter<u64>,
    connections_open: Arc<AtomicI64>,
    _connections_open: ObservableUpDownCounter<i64>,
    vm_stops: Counter<u64>,
}

/// Why the API server refused a connection (label `limit` of
/// `metald_http_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `UNKEY_METALD_HTTP_MAX_CONNECTIONS` reached.
    Connections,
    /// `UNKEY_METALD_HTTP_MAX_CONNECTIONS_PER_IP` reached for the peer's address.
    ConnectionsPerIp,
}

impl ConnRefusal {
    pub const ALL: [ConnRefusal; 2] = [ConnRefusal::Connections, ConnRefusal::ConnectionsPerIp];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnRefusal::Connections => "connections",
            ConnRefusal::ConnectionsPerIp => "connections_per_ip",
        }
    }
}

/// Which timeout ended a connection or request (label `timeout` of
/// `metald_http_connection_timeouts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnTimeout {
    /// A request head did not arrive in time: connection closed.
    Header,
    /// A request body did not arrive in time: answered 408.
    Body,
    /// No request in flight for the idle timeout: connection closed.
    Idle,
}

impl ConnTimeout {
    pub const ALL: [ConnTimeout; 3] = [ConnTimeout::Header, ConnTimeout::Body, ConnTimeout::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnTimeout::Header => "header",
            ConnTimeout::Body => "body",
            ConnTimeout::Idle => "idle",
        }
    }
}

/// HTTP request methods as the semantic conventions label them, `_OTHER` last.
pub const HTTP_METHODS: [&str; 10] =
    ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "_OTHER"];

/// Requests in flight per method (index into [`HTTP_METHODS`]), read by an
/// observable up-down counter at collection: a request costs two atomic
/// adds instead of two attribute-set lookups in the SDK (measured on the
/// telemetry bench's hot path).
#[derive(Default)]
struct Active {
    n: [AtomicI64; HTTP_METHODS.len()],
    seen: [AtomicBool; HTTP_METHODS.len()],
}

impl Metrics {
    /// Registers every instrument on `meter`.
    pub fn register(meter: &Meter) -> Metrics {
        let active = Arc::new(Active::default());
        let connections_open = Arc::new(AtomicI64::new(0));
        let open = connections_open.clone();
        let connections_refused = meter
            .u64_counter("metald_http_connections_refused")
            .with_description("Connections to the API port refused at a connection limit (answered 503 and closed)")
            .build();
        let connection_timeouts = meter
            .u64_counter("metald_http_connection_timeouts")
            .with_description("API connections closed (header, idle) or requests answered 408 (body) at a timeout")
            .build();
        // Export every series from the start (at 0), so rates work at once.
        for l in ConnRefusal::ALL {
            connections_refused.add(0, &[KeyValue::new("limit", l.as_str())]);
        }
        for t in ConnTimeout::ALL {
            connection_timeouts.add(0, &[KeyValue::new("timeout", t.as_str())]);
        }
        let vm_stops = meter
            .u64_counter("metald_vm_stops")
            .with_description("VMs that stopped (became SHUTDOWN), by reason")
            .build();
        for r in StopReason::ALL {
            vm_stops.add(0, &[KeyValue::new("reason", r.as_str())]);
        }
        let inner = Instruments {
            operations: meter
                .u64_counter("metald_vm_operations")
                .with_description(
                    "VM operations served, by operation and outcome (status success|error, code = Connect code)",
                )
                .build(),
            operations_bound: Bound::new(Operation::ALL.len() * OUTCOMES),
            operation_duration_bound: Bound::new(Operation::ALL.len()),
            rpc_duration_bound: Bound::new(RPC_KEYS),
            http_duration_bound: Bound::new(HTTP_KEYS),
            operation_duration: meter
                .f64_histogram("metald_vm_operation_duration")
                .with_unit("s")
                .with_description("Time to serve a VM operation, from request decoded to response ready")
                .with_boundaries(OPERATION_BUCKETS.to_vec())
                .build(),
            rpc_duration: meter
                .f64_histogram("rpc.server.duration")
                // Seconds, not the older semconv's ms: Prometheus wants base units.
                .with_unit("s")
                .with_description("Duration of inbound RPCs (OpenTelemetry RPC semantic conventions)")
                .with_boundaries(OPERATION_BUCKETS.to_vec())
                .build(),
            http_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP server requests (OpenTelemetry HTTP semantic conventions)")
                .with_boundaries(HTTP_BUCKETS.to_vec())
                .build(),
            http_active: active.clone(),
            _http_active: meter
                .i64_observable_up_down_counter("http.server.active_requests")
                .with_unit("{request}")
                .with_description("Number of HTTP server requests in flight")
                .with_callback(move |o| {
                    for (k, method) in HTTP_METHODS.iter().enumerate() {
                        if active.seen[k].load(Ordering::Relaxed) {
                            o.observe(
                                active.n[k].load(Ordering::Relaxed),
                                &[KeyValue::new("http.request.method", *method), KeyValue::new("url.scheme", "http")],
                            );
                        }
                    }
                })
                .build(),
            connections_refused,
            connection_timeouts,
            connections_open,
            _connections_open: meter
                .i64_observable_up_down_counter("metald_http_connections_open")
                .with_unit("{connection}")
                .with_description("Connections the API port is serving")
                .with_callback(move |o| o.observe(open.load(Ordering::Relaxed), &[]))
                .build(),
            vm_stops,
        };
        Metrics { inner: Some(Arc::new(inner)), billing: BillingMetrics::register(meter) }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The counters the billing collector increments.
    pub fn billing(&self) -> &BillingMetrics {
        &self.billing
    }

    /// Counts one VM operation. `code` is `None` on success, else the
    /// Connect error code (label `code`: `not_found`, `internal`, ...).
    pub fn operation(&self, op: Operation, code: Option<ErrorCode>, elapsed: Duration) {
        let Some(i) = &self.inner else { return };
        let outcome = code.map_or(0, |c| c.grpc_code() as usize);
        let attrs = || {
            vec![
                KeyValue::new("operation", op.as_str()),
                KeyValue::new("status", if code.is_some() { "error" } else { "success" }),
                KeyValue::new("code", code.map_or("ok", |c| c.as_str())),
            ]
        };
        match i.operations_bound.slots.get(op.index() * OUTCOMES + outcome) {
            Some(slot) => slot.get_or_init(|| i.operations.bind(&attrs())).add(1),
            None => i.operations.add(1, &attrs()),
        }
        let attrs = || vec![KeyValue::new("operation", op.as_str())];
        record(&i.operation_duration, &i.operation_duration_bound, Some(op.index()), &attrs, elapsed.as_secs_f64());
    }

    /// Records one inbound RPC (`rpc.server.duration`); `key` indexes its
    /// label set `attrs()` among [`RPC_KEYS`].
    pub(crate) fn rpc(&self, key: usize, attrs: &dyn Fn() -> Vec<KeyValue>, elapsed: Duration) {
        if let Some(i) = &self.inner {
            record(&i.rpc_duration, &i.rpc_duration_bound, Some(key), attrs, elapsed.as_secs_f64());
        }
    }

    /// A request with method `HTTP_METHODS[method]` started.
    pub(crate) fn http_started(&self, method: usize) {
        if let Some(i) = &self.inner
            && method < HTTP_METHODS.len()
        {
            // Read first: a store on every request would bounce the line between cores.
            if !i.http_active.seen[method].load(Ordering::Relaxed) {
                i.http_active.seen[method].store(true, Ordering::Relaxed);
            }
            i.http_active.n[method].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request started with [`Metrics::http_started`] ended.
    pub(crate) fn http_active_done(&self, method: usize) {
        if let Some(i) = &self.inner
            && method < HTTP_METHODS.len()
        {
            i.http_active.n[method].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records one HTTP request's duration; `key` indexes its label set
    /// `attrs()` among [`HTTP_KEYS`] (`None`: a rare one, recorded unbound).
    pub(crate) fn http_duration(&self, key: Option<usize>, attrs: &dyn Fn() -> Vec<KeyValue>, elapsed: Duration) {
        if let Some(i) = &self.inner {
            record(&i.http_duration, &i.http_duration_bound, key, attrs, elapsed.as_secs_f64());
        }
    }
}

impl Metrics {
    /// A connection was refused at `limit`.
    pub fn connection_refused(&self, limit: ConnRefusal) {
        if let Some(i) = &self.inner {
            i.connections_refused.add(1, &[KeyValue::new("limit", limit.as_str())]);
        }
    }

    /// A connection (header, idle) or a request (body) timed out.
    pub fn connection_timed_out(&self, timeout: ConnTimeout) {
        if let Some(i) = &self.inner {
            i.connection_timeouts.add(1, &[KeyValue::new("timeout", timeout.as_str())]);
        }
    }

    /// A VM stopped for `reason`.
    pub fn vm_stopped(&self, reason: StopReason) {
        if let Some(i) = &self.inner {
            i.vm_stops.add(1, &[KeyValue::new("reason", reason.as_str())]);
        }
    }

    /// A connection was admitted (`delta` 1) or closed (`delta` -1).
    pub fn connections_open(&self, delta: i64) {
        if let Some(i) = &self.inner {
            i.connections_open.fetch_add(delta, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct VmCounts {
    samples: u64,
    batches: u64,
}

/// How many deleted VM ids are remembered (see [`PerVm::gone`]).
const GONE_CAP: usize = 4096;

#[derive(Default)]
struct PerVm {
    counts: HashMap<String, VmCounts>,
    /// Recently deleted VMs: a collector round or a final batch that races
    /// with the delete must not bring their series back. Cleared for an id
    /// when a VM of that id is created again.
    gone: HashSet<String>,
    gone_order: VecDeque<String>,
}

/// Per-VM billing counters. The counts live in a map read by observable
/// counters, so [`BillingMetrics::forget_vm`] removes a deleted VM's series
/// from the next export: cardinality stays bounded by the live VMs.
#[derive(Clone, Default)]
pub struct BillingMetrics {
    inner: Option<Arc<BillingInner>>,
}

struct BillingInner {
    per_vm: Arc<Mutex<PerVm>>,
    heartbeats: Counter<u64>,
    spool_corrupt: Counter<u64>,
    spool_write_errors: Counter<u64>,
    // Held so the callbacks live as long as the handle.
    _samples: ObservableCounter<u64>,
    _batches: ObservableCounter<u64>,
}

impl BillingMetrics {
    fn register(meter: &Meter) -> BillingMetrics {
        let per_vm: Arc<Mutex<PerVm>> = Arc::default();
        let observe = |pick: fn(&VmCounts) -> u64| {
            let map = per_vm.clone();
            move |o: &dyn opentelemetry::metrics::AsyncInstrument<u64>| {
                let map = map.lock().unwrap_or_else(|p| p.into_inner());
                for (vm, c) in map.counts.iter() {
                    o.observe(pick(c), &[KeyValue::new("vm_id", vm.clone())]);
                }
            }
        };
        let samples = meter
            .u64_observable_counter("metald_metrics_collected")
            .with_description("Usage samples collected from a VM by the billing collector")
            .with_callback(observe(|c| c.samples))
            .build();
        let batches = meter
            .u64_observable_counter("metald_billing_batches_sent")
            .with_description("Billing batches of a VM sent to the billing service")
            .with_callback(observe(|c| c.batches))
            .build();
        let heartbeats = meter
            .u64_counter("metald_heartbeat_sent")
            .with_description("Heartbeats sent to the billing service")
            .build();
        // Export the heartbeat series from the start (at 0).
        heartbeats.add(0, &[]);
        let spool_corrupt = meter
            .u64_counter("metald_billing_spool_corrupt_frames")
            .with_description("Damaged billing spool regions skipped at start (each answered with gap notices)")
            .build();
        spool_corrupt.add(0, &[]);
        let spool_write_errors = meter
            .u64_counter("metald_billing_spool_write_errors")
            .with_description("Billing spool commits that failed (disk full, I/O error); samples stay in memory")
            .build();
        spool_write_errors.add(0, &[]);
        BillingMetrics {
            inner: Some(Arc::new(BillingInner {
                per_vm,
                heartbeats,
                spool_corrupt,
                spool_write_errors,
                _samples: samples,
                _batches: batches,
            })),
        }
    }

    fn state(&self) -> Option<std::sync::MutexGuard<'_, PerVm>> {
        self.inner.as_ref().map(|i| i.per_vm.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn with_vm(&self, vm_id: &str, f: impl FnOnce(&mut VmCounts)) {
        let Some(mut st) = self.state() else { return };
        if st.gone.contains(vm_id) {
            return;
        }
        match st.counts.get_mut(vm_id) {
            Some(c) => f(c),
            None => f(st.counts.entry(vm_id.to_owned()).or_default()),
        }
    }

    /// `n` usage samples collected from `vm_id` (`metald_metrics_collected_total`).
    pub fn samples_collected(&self, vm_id: &str, n: u64) {
        self.with_vm(vm_id, |c| c.samples += n);
    }

    /// One billing batch of `vm_id` sent (`metald_billing_batches_sent_total`).
    pub fn batch_sent(&self, vm_id: &VmId) {
        self.with_vm(vm_id.as_str(), |c| c.batches += 1);
    }

    /// One heartbeat sent (`metald_heartbeat_sent_total`).
    pub fn heartbeat_sent(&self) {
        if let Some(i) = &self.inner {
            i.heartbeats.add(1, &[]);
        }
    }

    /// One billing spool commit failed (`metald_billing_spool_write_errors_total`).
    pub fn spool_write_failed(&self) {
        if let Some(i) = &self.inner {
            i.spool_write_errors.add(1, &[]);
        }
    }

    /// `n` damaged spool regions skipped (`metald_billing_spool_corrupt_frames_total`).
    pub fn spool_corrupt_frames(&self, n: u64) {
        if let Some(i) = &self.inner {
            i.spool_corrupt.add(n, &[]);
        }
    }

    /// Drops the series of `vm_id` (the VM was deleted); later counts for
    /// it are ignored until a VM with that id is created again.
    pub fn forget_vm(&self, vm_id: &VmId) {
        let Some(mut st) = self.state() else { return };
        st.counts.remove(vm_id.as_str());
        if st.gone.insert(vm_id.as_str().to_owned()) {
            st.gone_order.push_back(vm_id.as_str().to_owned());
            while st.gone_order.len() > GONE_CAP {
                if let Some(old) = st.gone_order.pop_front() {
                    st.gone.remove(&old);
                }
            }
        }
    }

    /// A VM with this id was created: count it again.
    pub fn vm_created(&self, vm_id: &VmId) {
        let Some(mut st) = self.state() else { return };
        if st.gone.remove(vm_id.as_str()) {
            st.gone_order.retain(|g| g != vm_id.as_str());
        }
    }

    /// Number of VMs with series (for tests).
    pub fn tracked_vms(&self) -> usize {
        self.state().map_or(0, |st| st.counts.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_rpc() {
        let methods =
            ["CreateVm", "BootVm", "PauseVm", "ResumeVm", "RebootVm", "ShutdownVm", "DeleteVm", "GetVmInfo", "ListVms"];
        for (m, op) in methods.iter().zip(Operation::ALL) {
            assert_eq!(op.rpc_method(), *m);
            assert_eq!(op.rpc_name(), format!("vmprovisioner.v1.VmService/{m}"));
        }
        // `ALL` lists the variants in declaration order (their index).
        assert!(Operation::ALL.iter().enumerate().all(|(i, op)| op.index() == i));
    }

    #[test]
    fn disabled_handles_are_no_ops() {
        let m = Metrics::default();
        let id = VmId::parse("vm-1").unwrap();
        m.operation(Operation::Create, None, Duration::ZERO);
        m.billing().samples_collected(id.as_str(), 1);
        m.billing().heartbeat_sent();
        assert_eq!(m.billing().tracked_vms(), 0);
        assert!(!m.is_enabled());
    }

    #[test]
    fn deleted_vms_stay_gone_until_recreated() {
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
        let b = Metrics::register(&opentelemetry::metrics::MeterProvider::meter(&provider, "t")).billing().clone();
        let id = VmId::parse("vm-1").unwrap();
        b.samples_collected(id.as_str(), 1);
        assert_eq!(b.tracked_vms(), 1);
        b.forget_vm(&id);
        b.batch_sent(&id); // a late final batch
        assert_eq!(b.tracked_vms(), 0);
        b.vm_created(&id);
        b.samples_collected(id.as_str(), 1);
        assert_eq!(b.tracked_vms(), 1);
    }
}
