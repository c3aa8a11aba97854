//! Server-side instrumentation of the API port.
//!
//! - [`RpcTelemetry`], applied around each API handler: one `SERVER` span
//!   per RPC (continuing an incoming W3C `traceparent`),
//!   `rpc.server.duration`, and `metald_vm_operations_total` /
//!   `metald_vm_operation_duration_seconds`; a server stream
//!   (`StreamConsole`) is recorded when it ends, its whole life being the
//!   RPC's duration. It sees the RPC outcome, which
//!   an HTTP layer cannot (gRPC errors are HTTP 200); any non-OK outcome
//!   sets the span status to Error.
//! - [`HttpMetricsLayer`], a tower layer: `http.server.request.duration`
//!   and `http.server.active_requests` for every HTTP request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use connectrpc::{ConnectError, ErrorCode, Protocol, RequestContext, ServiceStream};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SamplingDecision, ShouldSample};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{HTTP_METHODS, Metrics, Operation};
use super::otlp::{ServerSpan, server_span_head};
use super::spans::SpanQueue;
use super::traces::KeepErrorsSampler;
use crate::model::VmId;

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The remote parent carried by `traceparent`/`tracestate`, if valid.
pub fn remote_parent(headers: &http::HeaderMap) -> Option<Context> {
    // Most calls carry none: skip the propagator's look-ups by string.
    if !headers.contains_key(TRACEPARENT) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` continue the trace of an incoming `traceparent`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if let Some(cx) = remote_parent(headers) {
        // Fails only when the span is disabled (telemetry off): nothing to do.
        let _ = span.set_parent(cx);
    }
}

const SERVICE: &str = "vmprovisioner.v1.VmService";

/// Protocol families of `rpc.system`, indexed as in [`rpc_key`].
const SYSTEMS: [&str; 2] = ["connect_rpc", "grpc"];

/// Per-RPC spans and metrics, applied by the API around each handler
/// (`api::VmApi::observed`).
///
/// Not a ConnectRPC interceptor: the interceptor path boxes two more
/// futures and flattens every response per call, which the telemetry bench
/// measured at about a third of telemetry's cost per GetVmInfo. Requests
/// the framework rejects before a handler runs (an undecodable body, an
/// unknown method) get no RPC span or operation count; the HTTP metrics
/// count them.
///
/// The server span is recorded by metald, not built as an SDK span (see
/// [`ServerSpan`] for why): ids from the SDK's id generator, the sampling
/// decision from the same [`KeepErrorsSampler`] the SDK tracer uses, and
/// the encoding from a template per method. While the handler runs, the
/// span's context is the current OpenTelemetry context, so the lifecycle
/// steps' `tracing` spans (SDK spans) find it as their parent and log lines
/// carry its ids.
#[derive(Clone)]
pub struct RpcTelemetry {
    metrics: Metrics,
    spans: SpanQueue,
    sampler: KeepErrorsSampler,
    ids: RandomIdGenerator,
    /// [`server_span_head`] of each (system, operation), by [`head_key`].
    heads: Arc<[Vec<u8>]>,
}

fn head_key(system: usize, op: Operation) -> usize {
    system * Operation::ALL.len() + op.index()
}

impl RpcTelemetry {
    pub fn new(metrics: Metrics, spans: SpanQueue, sampler: KeepErrorsSampler) -> Self {
        let heads = SYSTEMS
            .iter()
            .flat_map(|system| {
                Operation::ALL.iter().map(move |op| {
                    server_span_head(
                        op.rpc_name(),
                        &SpanKind::Server,
                        &[
                            KeyValue::new("rpc.system", *system),
                            KeyValue::new("rpc.service", SERVICE),
                            KeyValue::new("rpc.method", op.rpc_method()),
                        ],
                    )
                })
            })
            .collect();
        RpcTelemetry { metrics, spans, sampler, ids: RandomIdGenerator::default(), heads }
    }

    /// Runs `call`, the handler of `op`, in its server span and records
    /// its outcome. `vm_id` is the VM the request names (recorded on the
    /// span when it is a valid id). A call dropped before it finishes (its
    /// deadline passed, or the client went away) is recorded too, as
    /// `deadline_exceeded` or `canceled`.
    pub async fn observe<T>(
        &self,
        ctx: &RequestContext,
        op: Operation,
        vm_id: &str,
        mut call: std::pin::Pin<&mut impl Future<Output = Result<T, ConnectError>>>,
    ) -> Result<T, ConnectError> {
        let mut observed = self.start(ctx, op, Cow::Borrowed(self), Cow::Borrowed(vm_id));
        // Polled in place with the span's context attached (what
        // `FutureExt::with_context` does, without moving the handler's
        // large future into a wrapper).
        let result = std::future::poll_fn(|task| {
            let _attached = observed.cx.clone().attach();
            call.as_mut().poll(task)
        })
        .await;
        observed.end(result.as_ref().err());
        result
    }

    /// [`RpcTelemetry::observe`] for a server-streaming RPC: `call` makes
    /// the stream (in the span's context); the RPC is recorded when the
    /// stream ends (OK at its end, else its error), or as `canceled` when
    /// the client goes away first. The stream's items are made in the
    /// span's context too.
    pub async fn observe_stream<T: Send + 'static>(
        &self,
        ctx: &RequestContext,
        op: Operation,
        vm_id: &str,
        mut call: std::pin::Pin<&mut impl Future<Output = Result<ServiceStream<T>, ConnectError>>>,
    ) -> Result<ServiceStream<T>, ConnectError> {
        let mut observed = self.start(ctx, op, Cow::Owned(self.clone()), Cow::Owned(vm_id.to_owned()));
        let result = std::future::poll_fn(|task| {
            let _attached = observed.cx.clone().attach();
            call.as_mut().poll(task)
        })
        .await;
        match result {
            Ok(inner) => Ok(Box::pin(ObservedStream { inner, observed })),
            Err(e) => {
                observed.end(Some(&e));
                Err(e)
            }
        }
    }

    /// Starts observing an RPC: its span context (continuing the caller's
    /// trace, sampled as the SDK tracer would) and its start time.
    fn start<'a>(
        &self,
        ctx: &RequestContext,
        op: Operation,
        telemetry: Cow<'a, RpcTelemetry>,
        vm_id: Cow<'a, str>,
    ) -> Observed<'a> {
        let system = match ctx.protocol() {
            Some(Protocol::Grpc | Protocol::GrpcWeb) => 1,
            _ => 0,
        };
        let parent = remote_parent(ctx.headers());
        let parent_sc = parent.as_ref().map(|cx| cx.span().span_context().clone());
        // As the SDK tracer does: the parent's trace, or a new one; the
        // sampler decides (parent-based, ratio for roots, never Drop).
        let trace_id = parent_sc.as_ref().map_or_else(|| self.ids.new_trace_id(), SpanContext::trace_id);
        let sampling =
            self.sampler.should_sample(parent.as_ref(), trace_id, op.rpc_name(), &SpanKind::Server, &[], &[]);
        let sampled = sampling.decision == SamplingDecision::RecordAndSample;
        let flags = parent_sc.as_ref().map_or(TraceFlags::default(), SpanContext::trace_flags).with_sampled(sampled);
        let sc = SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, sampling.trace_state);
        Observed {
            telemetry,
            op,
            system,
            vm_id,
            // A span context without a recording span: children take their
            // parent ids and sampled flag from it (`is_remote` false, as for
            // a local parent).
            cx: parent.unwrap_or_default().with_remote_span_context(sc),
            parent: parent_sc,
            deadline: ctx.deadline(),
            start: opentelemetry::time::now(),
            started: Instant::now(),
            ended: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A server stream being observed ([`RpcTelemetry::observe_stream`]).
    struct ObservedStream<T> {
        inner: ServiceStream<T>,
        observed: Observed<'static>,
    }
}

impl<T> futures::Stream for ObservedStream<T> {
    type Item = Result<T, ConnectError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.project();
        if this.observed.ended {
            return std::task::Poll::Ready(None);
        }
        let item = {
            let _attached = this.observed.cx.clone().attach();
            std::task::ready!(this.inner.as_mut().poll_next(cx))
        };
        match &item {
            None => this.observed.end(None),
            Some(Err(e)) => this.observed.end(Some(e)),
            Some(Ok(_)) => {}
        }
        std::task::Poll::Ready(item)
    }
}

/// An RPC being observed; recorded once, when it ends or is dropped.
struct Observed<'a> {
    telemetry: Cow<'a, RpcTelemetry>,
    op: Operation,
    system: usize,
    vm_id: Cow<'a, str>,
    /// The current context while the handler runs: the server span's.
    cx: Context,
    parent: Option<SpanContext>,
    deadline: Option<std::time::Instant>,
    start: std::time::SystemTime,
    started: Instant,
    ended: bool,
}

impl Observed<'_> {
    /// Exports the server span (when sampled or failed) and records the
    /// RPC and operation metrics.
    fn end(&mut self, error: Option<&ConnectError>) {
        self.ended = true;
        let elapsed = self.started.elapsed();
        let (t, system, op) = (&*self.telemetry, self.system, self.op);
        let code = error.map(|e| e.code);
        let grpc_code = code.map_or(0, |c| c.grpc_code());
        let description = error.map(|e| match &e.message {
            Some(m) => format!("{}: {m}", e.code.as_str()),
            None => e.code.as_str().to_owned(),
        });
        let span = self.cx.span();
        t.spans.push(&ServerSpan {
            context: span.span_context(),
            parent: self.parent.as_ref(),
            head: &t.heads[head_key(system, op)],
            start: self.start,
            end: self.start + elapsed,
            vm_id: VmId::is_valid(&self.vm_id).then_some(&*self.vm_id),
            // Per the RPC conventions: the gRPC status code on gRPC spans,
            // the Connect error code on failed spans (the metric below
            // carries the status code for both).
            grpc_status_code: (system == 1).then_some(i64::from(grpc_code)),
            connect_error_code: code.map(|c| c.as_str()),
            error: description.as_deref(),
        });
        let attrs = || {
            vec![
                KeyValue::new("rpc.system", SYSTEMS[system]),
                KeyValue::new("rpc.service", SERVICE),
                KeyValue::new("rpc.method", op.rpc_method()),
                KeyValue::new("rpc.grpc.status_code", i64::from(grpc_code)),
            ]
        };
        t.metrics.rpc(rpc_key(system, op, grpc_code), &attrs, elapsed);
        t.metrics.operation(op, code, elapsed);
    }
}

impl Drop for Observed<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // The handler was dropped unfinished: ConnectRPC answers a passed
        // deadline with `deadline_exceeded`; otherwise the client left.
        let error = if self.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            ConnectError::new(ErrorCode::DeadlineExceeded, "the request's deadline passed before it finished")
        } else {
            ConnectError::new(ErrorCode::Canceled, "the client went away before the response")
        };
        self.end(Some(&error));
    }
}

/// Dense index of an RPC's `rpc.server.duration` label set among
/// `metrics::RPC_KEYS`.
fn rpc_key(system: usize, op: Operation, grpc_code: u32) -> usize {
    head_key(system, op) * 17 + grpc_code as usize
}

/// The request method's index in [`HTTP_METHODS`]: known methods, else `_OTHER`.
fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::HEAD => 4,
        http::Method::OPTIONS => 5,
        http::Method::PATCH => 6,
        http::Method::CONNECT => 7,
        http::Method::TRACE => 8,
        _ => 9,
    }
}

/// The request method as semconv wants it: known methods, else `_OTHER`.
#[cfg(test)]
fn method_label(m: &http::Method) -> &'static str {
    HTTP_METHODS[method_index(m)]
}

/// The protocol version's label and dense index.
fn protocol_version(v: http::Version) -> (usize, &'static str) {
    match v {
        http::Version::HTTP_09 => (0, "0.9"),
        http::Version::HTTP_10 => (1, "1.0"),
        http::Version::HTTP_11 => (2, "1.1"),
        http::Version::HTTP_2 => (3, "2"),
        http::Version::HTTP_3 => (4, "3"),
        _ => (5, "_OTHER"),
    }
}

/// The status codes this API answers with, whose duration series are bound.
const STATUSES: [u16; 16] = [200, 400, 401, 403, 404, 405, 408, 409, 412, 413, 415, 429, 500, 501, 503, 504];

/// Dense index of an HTTP request's label set among `metrics::HTTP_KEYS`
/// (`None` for a status code outside [`STATUSES`]).
fn http_key(method: usize, version: usize, status: u16) -> Option<usize> {
    let s = STATUSES.iter().position(|&c| c == status)?;
    Some((method * 6 + version) * STATUSES.len() + s)
}

/// Decrements the in-flight gauge even when the request is cancelled.
struct InFlight {
    metrics: Arc<Metrics>,
    method: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.http_active_done(self.method);
    }
}

/// Tower layer recording the HTTP server metrics
/// (`http.server.request.duration`, `http.server.active_requests`) for
/// every request. Hand-written rather than `axum::middleware::from_fn`:
/// that boxes the inner service and its future on every request, which
/// the telemetry bench measured at ~10 % of GetVmInfo throughput; this is a
/// plain wrapper around the inner future.
#[derive(Clone)]
pub struct HttpMetricsLayer {
    metrics: Arc<Metrics>,
}

impl HttpMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        HttpMetricsLayer { metrics: Arc::new(metrics) }
    }
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// See [`HttpMetricsLayer`].
#[derive(Clone)]
pub struct HttpMetricsService<S> {
    inner: S,
    // One reference count per clone (hyper clones the service per request).
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for HttpMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HttpMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let index = method_index(req.method());
        self.metrics.http_started(index);
        HttpMetricsFuture {
            version: protocol_version(req.version()),
            inner: self.inner.call(req),
            in_flight: Some(InFlight { metrics: self.metrics.clone(), method: index }),
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// Records the duration when the response (head) is ready.
    pub struct HttpMetricsFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        started: Instant,
        version: (usize, &'static str),
    }
}

impl<F, RB, E> std::future::Future for HttpMetricsFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(in_flight)) = (&out, this.in_flight.as_ref()) {
            let (method, (version, version_label)) = (in_flight.method, *this.version);
            let status = resp.status().as_u16();
            let attrs = || {
                vec![
                    KeyValue::new("http.request.method", HTTP_METHODS[method]),
                    KeyValue::new("url.scheme", "http"),
                    KeyValue::new("http.response.status_code", i64::from(status)),
                    KeyValue::new("network.protocol.version", version_label),
                ]
            };
            in_flight.metrics.http_duration(http_key(method, version, status), &attrs, this.started.elapsed());
        }
        // The request is no longer in flight.
        this.in_flight.take();
        std::task::Poll::Ready(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_extracted() {
        let mut h = http::HeaderMap::new();
        assert!(remote_parent(&h).is_none());
        h.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
        let cx = remote_parent(&h).unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(sc.is_sampled() && sc.is_remote());
        h.insert("traceparent", "garbage".parse().unwrap());
        assert!(remote_parent(&h).is_none());
    }

    #[test]
    fn bound_label_sets_have_distinct_keys_in_range() {
        use crate::telemetry::metrics::{HTTP_KEYS, RPC_KEYS};
        let mut seen = std::collections::HashSet::new();
        for system in 0..2 {
            for op in Operation::ALL {
                for code in 0..17 {
                    let k = rpc_key(system, op, code);
                    assert!(k < RPC_KEYS && seen.insert(k));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for method in 0..HTTP_METHODS.len() {
            for version in 0..6 {
                for status in STATUSES {
                    let k = http_key(method, version, status).unwrap();
                    assert!(k < HTTP_KEYS && seen.insert(k));
                }
            }
        }
        assert_eq!(http_key(0, 2, 418), None, "a rare status is recorded unbound");
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::from_bytes(b"BREW").unwrap()), "_OTHER");
    }
}
