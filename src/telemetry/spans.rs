//! The end of the span pipeline: [`OtlpSpanProcessor`] writes every span to
//! be exported straight into OTLP/protobuf bytes as the span ends, and one
//! thread posts the batches to `<endpoint>/v1/traces`.
//!
//! Hand-written instead of the SDK's `BatchSpanProcessor` feeding
//! `opentelemetry-otlp`'s exporter: that path moves each ~400-byte
//! `SpanData` through a bounded channel, then converts it into owned
//! protobuf structs (a `String` per attribute key and value, a `Vec` per id,
//! a map to group spans by scope) and encodes those; the telemetry bench
//! measured the export thread alone at about a quarter of telemetry's cost
//! per GetVmInfo, on the cores the API runs on. Here a span is written once,
//! from `SpanData` into the request body, and the thread only frames and
//! sends. Field for field the encoding is `opentelemetry-proto`'s
//! conversion; a test decodes our bytes with `opentelemetry-proto` and
//! compares them with that conversion.
//!
//! Errors are kept here: a span is exported when it was sampled or when it
//! ended with Error status (see `traces::KeepErrorsSampler`, which records
//! what it does not sample).
//!
//! The RPC server spans do not go through the SDK at all: `rpc` records
//! them as a [`ServerSpan`] and queues them through a [`SpanQueue`] into
//! the same batches, encoded from a per-method template.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::Status;
use opentelemetry_http::HttpClient as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

use super::export::RuntimeHttpClient;
use super::otlp::{
    ServerSpan, encode_request, encode_resource, encode_span_body, framed, request_frames, request_in_place,
};

/// Spans that make an export due before its delay is up: four times the
/// SDK batch processor's default, as a request costs per request as well
/// as per byte (about 500 KB a request, well under collectors' limits).
pub const BATCH: usize = 2048;
/// Spans held at most while the collector is slow or away (about 2 MB);
/// more are dropped and counted.
pub const QUEUE: usize = 8192;

// ---- batching ----------------------------------------------------------

/// Spans waiting for the next export, encoded (`ScopeSpans.spans` fields).
#[derive(Default)]
struct Batch {
    /// Spans of metald's own scope (the tracer `metald`, and the RPC
    /// server spans), the great majority, after `headroom` spare bytes
    /// where the request's framing is written at export.
    main: Vec<u8>,
    headroom: usize,
    /// Spans of any other instrumentation scope.
    others: Vec<(InstrumentationScope, Vec<u8>)>,
    spans: usize,
}

#[derive(Default)]
struct Pending {
    batch: Batch,
    /// Bytes of metald's spans in the last batch: the next one is
    /// allocated that big at once rather than grown by doubling.
    last_main: usize,
    /// Room for the request's framing (resource, scope, lengths) at the
    /// front of a batch of metald's spans (see [`request_in_place`]).
    headroom: usize,
    /// Flush requests made, and flushes done (generations).
    flush_asked: u64,
    flushed: u64,
    shutdown: bool,
    stopped: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the export thread.
    wake: Condvar,
    /// Wakes who waits for a flush or for the thread to stop.
    done: Condvar,
    resource: Mutex<Vec<u8>>,
    /// metald's instrumentation scope (its spans go to `Batch::main`).
    main_scope: InstrumentationScope,
    dropped: AtomicU64,
}

impl Shared {
    /// Adds one encoded span (`body`, the fields of its `Span` message) to
    /// the batch of `scope` (`None`: metald's own).
    fn enqueue(&self, scope: Option<&InstrumentationScope>, body: &[u8]) {
        let mut p = lock(&self.pending);
        if p.stopped {
            return;
        }
        if p.batch.spans >= QUEUE {
            drop(p);
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(queue = QUEUE, "span export queue full: dropping spans (is the OTLP collector slow?)");
            }
            return;
        }
        let (last_main, headroom) = (p.last_main, p.headroom);
        let batch = &mut p.batch;
        let buf = match scope {
            None => {
                if batch.main.is_empty() {
                    batch.main.reserve(last_main.max(headroom + body.len() + 4));
                    batch.main.resize(headroom, 0);
                    batch.headroom = headroom;
                }
                &mut batch.main
            }
            Some(scope) => match batch.others.iter().position(|(s, _)| s == scope) {
                Some(i) => &mut batch.others[i].1,
                None => {
                    batch.others.push((scope.clone(), Vec::new()));
                    &mut batch.others.last_mut().expect("just pushed").1
                }
            },
        };
        framed(buf, 2, body);
        batch.spans += 1;
        if batch.spans == BATCH {
            self.wake.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// A span is encoded here, outside the lock, then copied in.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes a span with `encode` in this thread's scratch buffer, then
/// hands the bytes to `then`.
fn with_scratch(encode: impl FnOnce(&mut Vec<u8>), then: impl FnOnce(&[u8])) {
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        encode(buf);
        then(buf);
    });
}

/// See the module documentation.
#[derive(Debug)]
pub struct OtlpSpanProcessor {
    shared: Arc<Shared>,
}

/// Hands spans recorded outside the SDK ([`ServerSpan`]) to the
/// [`OtlpSpanProcessor`] it was taken from, in metald's scope.
#[derive(Clone, Debug)]
pub struct SpanQueue {
    shared: Arc<Shared>,
}

impl SpanQueue {
    /// Queues `span` for export when it was sampled or failed.
    pub fn push(&self, span: &ServerSpan<'_>) {
        if span.exported() {
            with_scratch(|buf| span.encode_body(buf), |body| self.shared.enqueue(None, body));
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("dropped", &self.dropped).finish_non_exhaustive()
    }
}

/// Where and how the export thread sends.
pub struct Sink {
    pub url: http::Uri,
    pub client: RuntimeHttpClient,
    pub rt: tokio::runtime::Handle,
    /// An export is due this long after the last one at the latest.
    pub delay: Duration,
}

impl OtlpSpanProcessor {
    /// Starts the export thread. Spans of the tracer named `main_scope`
    /// (and those pushed through [`OtlpSpanProcessor::queue`]) are batched
    /// under that scope.
    pub fn start(sink: Sink, main_scope: &str) -> std::io::Result<OtlpSpanProcessor> {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: Condvar::new(),
            done: Condvar::new(),
            resource: Mutex::default(),
            main_scope: InstrumentationScope::builder(main_scope.to_owned()).build(),
            dropped: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new().name("otlp-spans".into()).spawn(move || export_loop(&s, &sink))?;
        Ok(OtlpSpanProcessor { shared })
    }

    /// A handle that queues spans recorded outside the SDK.
    pub fn queue(&self) -> SpanQueue {
        SpanQueue { shared: self.shared.clone() }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` until `until` holds for the pending state.
    fn wait(&self, timeout: Duration, until: impl Fn(&Pending) -> bool) -> OTelSdkResult {
        let p = lock(&self.shared.pending);
        let (p, _) = self.shared.done.wait_timeout_while(p, timeout, |p| !until(p)).unwrap_or_else(|e| e.into_inner());
        if until(&p) { Ok(()) } else { Err(OTelSdkError::Timeout(timeout)) }
    }
}

fn export_loop(shared: &Shared, sink: &Sink) {
    let mut due = Instant::now() + sink.delay;
    loop {
        let (batch, asked, shutdown) = {
            let mut p = lock(&shared.pending);
            loop {
                let now = Instant::now();
                if p.batch.spans >= BATCH || p.flush_asked > p.flushed || p.shutdown || now >= due {
                    break;
                }
                p = shared.wake.wait_timeout(p, due - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            let batch = std::mem::take(&mut p.batch);
            p.last_main = batch.main.len();
            (batch, p.flush_asked, p.shutdown)
        };
        due = Instant::now() + sink.delay;
        if batch.spans > 0 {
            let body = request(shared, batch);
            send(sink, body);
        }
        let mut p = lock(&shared.pending);
        p.flushed = asked;
        p.stopped = shutdown;
        shared.done.notify_all();
        if shutdown {
            return;
        }
    }
}

/// The export request of `batch`: built around metald's spans when they
/// are all there is (the usual case), else assembled by copying.
fn request(shared: &Shared, batch: Batch) -> Bytes {
    let resource = lock(&shared.resource);
    let Batch { main, headroom, others, .. } = batch;
    let main = if others.is_empty() {
        match request_in_place(&resource, &shared.main_scope, main, headroom) {
            Ok(body) => return body,
            Err(main) => main,
        }
    } else {
        main
    };
    let main = (main.len() > headroom).then(|| (&shared.main_scope, &main[headroom..]));
    let scopes: Vec<_> = main.into_iter().chain(others.iter().map(|(s, b)| (s, &b[..]))).collect();
    Bytes::from(encode_request(&resource, &scopes))
}

fn send(sink: &Sink, body: Bytes) {
    let request =
        http::Request::post(sink.url.clone()).header(http::header::CONTENT_TYPE, "application/x-protobuf").body(body);
    // Failures are logged by the client (once a minute); spans are not
    // retried, as the SDK's exporter does not retry them either.
    if let Ok(request) = request {
        let _ = sink.rt.block_on(sink.client.send_bytes(request));
    }
}

impl SpanProcessor for OtlpSpanProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() && !matches!(span.status, Status::Error { .. }) {
            return;
        }
        let scope = &span.instrumentation_scope;
        let scope = (*scope != self.shared.main_scope).then_some(scope);
        with_scratch(|buf| encode_span_body(buf, &span), |body| self.shared.enqueue(scope, body));
    }

    fn force_flush(&self) -> OTelSdkResult {
        let asked = {
            let mut p = lock(&self.shared.pending);
            if p.stopped {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            p.flush_asked += 1;
            p.flush_asked
        };
        self.shared.wake.notify_one();
        self.wait(super::export::EXPORT_TIMEOUT, |p| p.flushed >= asked || p.stopped)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        {
            let mut p = lock(&self.shared.pending);
            if p.shutdown {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            p.shutdown = true;
        }
        self.shared.wake.notify_one();
        self.wait(timeout, |p| p.stopped)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let resource = encode_resource(resource);
        // The framing of a request of metald's spans, with room for its two
        // lengths to grow to their widest (10 bytes each).
        let framing = request_frames(&resource, &[(&self.shared.main_scope, 0)])[0].len() + 20;
        *lock(&self.shared.resource) = resource;
        lock(&self.shared.pending).headroom = framing;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry::trace::{Event, Link, SpanContext, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::*;
    use crate::telemetry::otlp::{encode_span, len_field, message, server_span_head};
    use opentelemetry::trace::{SpanId, SpanKind, TraceFlags};
    use opentelemetry::{Array, KeyValue, Value};
    use std::time::UNIX_EPOCH;

    fn span(name: &'static str, scope: &InstrumentationScope, status: Status, parent: u64, remote: bool) -> SpanData {
        let ctx = |t: u128, s: u64, sampled: bool, remote: bool| {
            let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            let state = TraceState::from_key_value([("vendor", "v1")]).unwrap();
            SpanContext::new(TraceId::from(t), SpanId::from(s), flags, remote, state)
        };
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut events = SpanEvents::default();
        events.events = vec![Event::new("retry", start, vec![KeyValue::new("attempt", 2i64)], 1)];
        events.dropped_count = 3;
        let mut links = SpanLinks::default();
        links.links = vec![Link::new(ctx(9, 8, false, true), vec![KeyValue::new("why", "batch")], 0)];
        SpanData {
            span_context: ctx(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c, 0x00f0_67aa_0ba9_02b7, true, false),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: remote,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed(name),
            start_time: start,
            end_time: start + Duration::from_micros(1500),
            attributes: vec![
                KeyValue::new("rpc.method", "GetVmInfo"),
                KeyValue::new("vm_id", "vm-1".to_string()),
                KeyValue::new("rpc.grpc.status_code", 0i64),
                KeyValue::new("negative", -7i64),
                KeyValue::new("flag", false),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("empty", ""),
                KeyValue::new("list", Value::Array(Array::I64(vec![1, -2, 0]))),
                KeyValue::new("names", Value::Array(Array::String(vec!["a".into(), "".into()]))),
            ],
            dropped_attributes_count: 2,
            events,
            links,
            status,
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn encoding_matches_opentelemetry_proto() {
        let resource = Resource::builder_empty()
            .with_attributes([KeyValue::new("service.name", "metald"), KeyValue::new("pid", 42i64)])
            .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
            .build();
        let metald = InstrumentationScope::builder("metald").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_attributes([KeyValue::new("k", "v")])
            .build();
        let spans = vec![
            span("vmprovisioner.v1.VmService/CreateVm", &metald, Status::Unset, 0, false),
            span(
                "backend.call",
                &metald,
                Status::error("not_found: vm-1 (big enough to need a longer length prefix..)"),
                0x1234,
                true,
            ),
            span("health.check", &other, Status::Ok, 0x77, false),
        ];

        let mut scopes: Vec<(InstrumentationScope, Vec<u8>)> = Vec::new();
        for s in &spans {
            match scopes.iter_mut().find(|(sc, _)| *sc == s.instrumentation_scope) {
                Some((_, buf)) => encode_span(buf, s),
                None => {
                    let mut buf = Vec::new();
                    encode_span(&mut buf, s);
                    scopes.push((s.instrumentation_scope.clone(), buf));
                }
            }
        }
        let scopes: Vec<_> = scopes.iter().map(|(s, b)| (s, &b[..])).collect();
        let ours =
            ExportTraceServiceRequest::decode(&encode_request(&encode_resource(&resource), &scopes)[..]).unwrap();

        let mut theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &ResourceAttributesWithSchema::from(&resource)),
        };
        // The library groups scopes through a hash map: compare in one order.
        theirs.resource_spans[0]
            .scope_spans
            .sort_by(|a, b| a.scope.as_ref().unwrap().name.cmp(&b.scope.as_ref().unwrap().name));
        assert_eq!(ours, theirs);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 2);
    }

    #[test]
    fn requests_built_in_place_equal_copied_ones() {
        let resource = encode_resource(
            &Resource::builder_empty()
                .with_attributes([KeyValue::new("service.name", "metald")])
                .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
                .build(),
        );
        let scope = InstrumentationScope::builder("metald").with_schema_url("https://example.com/s").build();
        let mut spans = Vec::new();
        for i in 0..40u64 {
            let mut s = span("vmprovisioner.v1.VmService/GetVmInfo", &scope, Status::Unset, i, false);
            s.span_context = SpanContext::new(
                TraceId::from(u128::from(i) + 1),
                SpanId::from(i + 1),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            );
            encode_span(&mut spans, &s);
        }
        let copied = encode_request(&resource, &[(&scope, &spans[..])]);
        let fits = request_frames(&resource, &[(&scope, spans.len())])[0].len();
        for headroom in [fits, fits + 7, fits + 200] {
            let mut buf = vec![0xEE; headroom];
            buf.extend_from_slice(&spans);
            let body = request_in_place(&resource, &scope, buf, headroom).unwrap();
            assert_eq!(&body[..], &copied[..], "headroom {headroom}");
        }
        let mut buf = vec![0; fits - 1];
        buf.extend_from_slice(&spans);
        assert_eq!(request_in_place(&resource, &scope, buf.clone(), fits - 1).unwrap_err(), buf, "does not fit");
        ExportTraceServiceRequest::decode(&copied[..]).unwrap();
    }

    /// The span the SDK would have built for `s`, as `opentelemetry-proto`
    /// converts it.
    fn sdk_equivalent(s: &ServerSpan<'_>, head_attrs: &[KeyValue], scope: &InstrumentationScope) -> SpanData {
        let mut attributes = head_attrs.to_vec();
        attributes.extend(s.vm_id.map(|id| KeyValue::new("vm_id", id.to_owned())));
        attributes.extend(s.grpc_status_code.map(|c| KeyValue::new("rpc.grpc.status_code", c)));
        attributes.extend(s.connect_error_code.map(|c| KeyValue::new("rpc.connect_rpc.error_code", c)));
        SpanData {
            span_context: s.context.clone(),
            parent_span_id: s.parent.map_or(SpanId::INVALID, SpanContext::span_id),
            parent_span_is_remote: s.parent.is_some_and(SpanContext::is_remote),
            span_kind: SpanKind::Server,
            name: Cow::Borrowed("vmprovisioner.v1.VmService/GetVmInfo"),
            start_time: s.start,
            end_time: s.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: s.error.map_or(Status::Unset, |e| Status::error(e.to_owned())),
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn server_spans_encode_as_the_sdk_span_would() {
        use opentelemetry_proto::tonic::trace::v1::ScopeSpans;
        use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;

        let head_attrs = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "vmprovisioner.v1.VmService"),
            KeyValue::new("rpc.method", "GetVmInfo"),
        ];
        let head = server_span_head("vmprovisioner.v1.VmService/GetVmInfo", &SpanKind::Server, &head_attrs);
        let state = TraceState::from_key_value([("vendor", "v1")]).unwrap();
        let sampled =
            SpanContext::new(TraceId::from(7u128 << 64 | 3), SpanId::from(11), TraceFlags::SAMPLED, false, state);
        let unsampled =
            SpanContext::new(TraceId::from(5u128), SpanId::from(12), TraceFlags::default(), false, TraceState::NONE);
        let remote =
            SpanContext::new(TraceId::from(5u128), SpanId::from(99), TraceFlags::default(), true, TraceState::NONE);
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let long_error = format!("not_found: {}", "x".repeat(300));
        let cases = [
            ServerSpan {
                context: &sampled,
                parent: None,
                head: &head,
                start,
                end: start + Duration::from_micros(80),
                vm_id: Some("vm-1"),
                grpc_status_code: Some(0),
                connect_error_code: None,
                error: None,
            },
            ServerSpan {
                context: &unsampled,
                parent: Some(&remote),
                head: &head,
                start,
                end: start + Duration::from_millis(3),
                vm_id: None,
                grpc_status_code: None,
                connect_error_code: Some("not_found"),
                error: Some(&long_error),
            },
        ];
        let scope = InstrumentationScope::builder("metald").build();
        let resource = Resource::builder_empty().build();
        for s in &cases {
            let mut ours = Vec::new();
            with_scratch(|buf| s.encode_body(buf), |body| framed(&mut ours, 2, body));
            let ours = ScopeSpans::decode(&ours[..]).unwrap().spans;
            let theirs = group_spans_by_resource_and_scope(
                vec![sdk_equivalent(s, &head_attrs, &scope)],
                &ResourceAttributesWithSchema::from(&resource),
            );
            assert_eq!(ours, theirs[0].scope_spans[0].spans);
            assert!(s.exported());
        }
        // Neither sampled nor failed: not exported.
        let quiet = ServerSpan { error: None, ..cases.into_iter().nth(1).unwrap() };
        assert!(!quiet.exported());
    }

    /// Sampled spans and failed unsampled ones reach the collector on a
    /// flush; an unsampled span that did not fail does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_sampled_and_failed_spans_on_flush() {
        let got: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = got.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        lock(&sink).extend(ss.spans.into_iter().map(|s| s.name));
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap()).parse().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let rt = tokio::runtime::Handle::current();
        let client = RuntimeHttpClient::new(rt.clone());
        let p = OtlpSpanProcessor::start(Sink { url, client, rt, delay: Duration::from_secs(600) }, "metald").unwrap();

        let scope = InstrumentationScope::builder("metald").build();
        let unsampled = |name, status| {
            let mut s = span(name, &scope, status, 0, false);
            let c = &s.span_context;
            s.span_context =
                SpanContext::new(c.trace_id(), c.span_id(), TraceFlags::default(), false, c.trace_state().clone());
            s
        };
        p.on_end(span("sampled", &scope, Status::Unset, 0, false));
        p.on_end(unsampled("quiet", Status::Ok));
        p.on_end(unsampled("failed", Status::error("internal")));
        // RPC server spans join the same batch: sampled ones only.
        let head = server_span_head("server", &SpanKind::Server, &[]);
        let sampled =
            SpanContext::new(TraceId::from(1u128), SpanId::from(2), TraceFlags::SAMPLED, false, TraceState::NONE);
        let server = ServerSpan {
            context: &sampled,
            parent: None,
            head: &head,
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
            vm_id: None,
            grpc_status_code: None,
            connect_error_code: None,
            error: None,
        };
        p.queue().push(&server);
        let not_sampled =
            SpanContext::new(TraceId::from(1u128), SpanId::from(3), TraceFlags::default(), false, TraceState::NONE);
        p.queue().push(&ServerSpan { context: &not_sampled, ..server });
        let p = tokio::task::spawn_blocking(move || {
            p.force_flush().unwrap();
            p
        })
        .await
        .unwrap();
        assert_eq!(*lock(&got), ["sampled", "failed", "server"]);
        assert_eq!(p.dropped(), 0);
        tokio::task::spawn_blocking(move || p.shutdown_with_timeout(Duration::from_secs(5))).await.unwrap().unwrap();
    }

    #[test]
    fn long_messages_get_a_wide_length_prefix() {
        for len in [0usize, 1, 127, 128, 300, 20_000] {
            let mut buf = Vec::new();
            message(&mut buf, 5, |b| b.extend(std::iter::repeat_n(7u8, len)));
            let mut expected = Vec::new();
            len_field(&mut expected, 5, &vec![7u8; len]);
            assert_eq!(buf, expected, "body of {len} bytes");
        }
    }
}
