//! Tracing → OpenTelemetry: the sampler, the error-keeping processor, the
//! `tracing` layer and the log formatter that stamps `trace_id`/`span_id`.
//!
//! **Sampling.** [`KeepErrorsSampler`] is parent-based (an incoming or local
//! parent's sampled flag decides, both ways) with a trace-id ratio for
//! roots, but where a plain sampler would *drop* it answers *record only*:
//! the span is still built, so the export processor (`spans`) can export it
//! at its end when its status is Error. That is how "errors are always captured" holds at
//! any rate, 0.0 included.
//!
//! **One process, one tracing subscriber.** `tracing`'s subscriber is
//! process-global, while a daemon's tracer lives and dies with the daemon.
//! [`layer`] is installed once (by `main`, or by a test) and forwards to the
//! tracer of the running daemon, held in `ACTIVE_TRACER`; with no daemon
//! exporting, the layer is switched off by its filter and costs one atomic
//! load per span.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::trace::{SpanKind, TraceContextExt, TraceId, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample};
use tracing::Subscriber;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context as LayerContext, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Parent-based ratio sampler that records what it does not sample.
#[derive(Debug, Clone)]
pub struct KeepErrorsSampler {
    ratio: Sampler,
}

impl KeepErrorsSampler {
    pub fn new(rate: f64) -> Self {
        KeepErrorsSampler { ratio: Sampler::TraceIdRatioBased(rate) }
    }
}

impl ShouldSample for KeepErrorsSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let parent = parent_context.filter(|cx| cx.span().span_context().is_valid());
        let sampled = match parent {
            Some(cx) => cx.span().span_context().is_sampled(),
            None => {
                self.ratio.should_sample(None, trace_id, name, span_kind, attributes, links).decision
                    == SamplingDecision::RecordAndSample
            }
        };
        SamplingResult {
            decision: if sampled { SamplingDecision::RecordAndSample } else { SamplingDecision::RecordOnly },
            attributes: Vec::new(),
            trace_state: parent.map(|cx| cx.span().span_context().trace_state().clone()).unwrap_or_default(),
        }
    }
}

/// The tracer of the daemon that currently exports, tagged with its id.
static ACTIVE_TRACER: RwLock<Option<(u64, SdkTracer)>> = RwLock::new(None);
static ACTIVE: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static LAYER_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Makes `tracer` the one [`layer`] feeds; returns a token for [`deactivate`].
pub(crate) fn activate(tracer: SdkTracer) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    *ACTIVE_TRACER.write().unwrap_or_else(|p| p.into_inner()) = Some((id, tracer));
    ACTIVE.store(true, Ordering::Release);
    id
}

/// Stops feeding the tracer activated as `id` (if it is still the active one).
pub(crate) fn deactivate(id: u64) {
    let mut slot = ACTIVE_TRACER.write().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|(active, _)| *active == id) {
        *slot = None;
        ACTIVE.store(false, Ordering::Release);
    }
}

/// Whether [`layer`] was built in this process (else spans go nowhere).
pub(crate) fn layer_installed() -> bool {
    LAYER_INSTALLED.load(Ordering::Relaxed)
}

/// An [`opentelemetry::trace::Tracer`] that forwards to the active tracer.
#[derive(Debug, Clone)]
pub struct ActiveTracer {
    /// Used between daemons: samples nothing, exports nowhere.
    idle: SdkTracer,
}

impl Tracer for ActiveTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, builder: opentelemetry::trace::SpanBuilder, parent_cx: &Context) -> Self::Span {
        match &*ACTIVE_TRACER.read().unwrap_or_else(|p| p.into_inner()) {
            Some((_, t)) => t.build_with_context(builder, parent_cx),
            None => self.idle.build_with_context(builder, parent_cx),
        }
    }
}

/// Target of spans that give log lines context and are never exported
/// (the API's per-call `rpc` span: the RPC's server span is built apart).
pub const LOG_ONLY: &str = "metald::log";

/// Name of the billing collector's round span. It is exported, with the
/// round's counts; spans opened inside it are not: they are the hypervisor
/// calls that take usage samples (a QMP `query-blockstats` per VM with
/// disks, 10 a second per VM), which would swamp the export queue and
/// crowd out the RPC spans. A round whose samples fail ends in Error, so
/// failures are still captured at any sampling rate.
pub const METERING_ROUND: &str = "billing.collect";

/// Enables the OpenTelemetry layer only while a daemon exports, and only
/// for spans at INFO or above that are not [`LOG_ONLY`] and not opened
/// inside a [`METERING_ROUND`].
struct WhileActive;

impl WhileActive {
    fn exported(meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::INFO && meta.target() != LOG_ONLY
    }
}

impl<S> Filter<S> for WhileActive
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: &LayerContext<'_, S>) -> bool {
        ACTIVE.load(Ordering::Acquire)
            && Self::exported(meta)
            // Events are not spans: only span creation is filtered here.
            && !(meta.is_span() && cx.lookup_current().is_some_and(|parent| parent.name() == METERING_ROUND))
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if Self::exported(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of the
/// running daemon. Install it once per process, beside the log layer.
pub fn layer<S>() -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    LAYER_INSTALLED.store(true, Ordering::Relaxed);
    let idle = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build().tracer("metald");
    // Per-poll work is avoided: no OTel context attached on every enter/exit
    // (parents come from tracing's span tree) and no busy/idle timings.
    tracing_opentelemetry::OpenTelemetryLayer::new(ActiveTracer { idle })
        .with_threads(false)
        .with_target(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(WhileActive)
}

/// The trace and span id of the current span, when one is being traced:
/// the current `tracing` span's, else the current OpenTelemetry context's
/// (an RPC's server span, see `rpc::RpcTelemetry`).
pub fn current_ids() -> Option<(String, String)> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    let ids = |cx: &Context| {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    };
    ids(&tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current()))
        .or_else(|| Context::map_current(ids))
}

/// Wraps a log event format so lines emitted inside a traced span end with
/// `trace_id=… span_id=…` (text) or carry `"trace_id"`/`"span_id"` keys (JSON).
pub struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<F> WithTraceIds<F> {
    pub fn new(inner: F, json: bool) -> Self {
        WithTraceIds { inner, json }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = current_ids() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&with_ids(&line, self.json, &trace_id, &span_id))
    }
}

/// Adds the ids to one formatted log line (text or a JSON object).
fn with_ids(line: &str, json: bool, trace_id: &str, span_id: &str) -> String {
    let body = line.trim_end_matches('\n');
    match (json, body.strip_suffix('}')) {
        (true, Some(open)) => format!("{open},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}\n"),
        (true, None) => format!("{body}\n"),
        (false, _) => format!("{body} trace_id={trace_id} span_id={span_id}\n"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

    use super::*;

    fn parent(sampled: bool) -> Context {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let sc = SpanContext::new(TraceId::from(7u128), SpanId::from(9u64), flags, true, TraceState::default());
        Context::new().with_remote_span_context(sc)
    }

    fn decide(rate: f64, parent: Option<&Context>, trace: u128) -> SamplingDecision {
        KeepErrorsSampler::new(rate)
            .should_sample(parent, TraceId::from(trace), "x", &SpanKind::Server, &[], &[])
            .decision
    }

    #[test]
    fn log_lines_get_ids() {
        assert_eq!(with_ids("INFO x: hi a=1\n", false, "t1", "s1"), "INFO x: hi a=1 trace_id=t1 span_id=s1\n");
        let j = with_ids("{\"level\":\"INFO\",\"fields\":{\"message\":\"hi\"}}\n", true, "t1", "s1");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!((v["trace_id"].as_str(), v["span_id"].as_str()), (Some("t1"), Some("s1")));
        assert_eq!(v["fields"]["message"], "hi");
    }

    #[test]
    fn parent_decides_both_ways_and_roots_use_the_ratio() {
        assert_eq!(decide(0.0, Some(&parent(true)), 1), SamplingDecision::RecordAndSample);
        assert_eq!(decide(1.0, Some(&parent(false)), 1), SamplingDecision::RecordOnly);
        assert_eq!(decide(1.0, None, 12345), SamplingDecision::RecordAndSample);
        // Never Drop: unsampled spans are recorded so errors can be kept.
        assert_eq!(decide(0.0, None, 12345), SamplingDecision::RecordOnly);
        let kept = (0..1000u128)
            .filter(|i| {
                decide(0.5, None, i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
                    == SamplingDecision::RecordAndSample
            })
            .count();
        assert!((350..650).contains(&kept), "{kept}");
    }
}
