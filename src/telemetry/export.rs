//! Where telemetry leaves the process: the OTLP/HTTP exporters (traces and
//! metrics, protobuf) and the Prometheus scrape endpoint.
//!
//! The span processor exports from its own thread, outside tokio, while
//! hyper needs the runtime: so [`RuntimeHttpClient`] runs every request as
//! a task on the daemon's runtime and hands the answer back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, Pipeline, Temporality};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// OTLP requests give up after this long.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// An OTLP HTTP client whose requests run on a tokio runtime.
#[derive(Debug, Clone)]
pub struct RuntimeHttpClient {
    rt: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl RuntimeHttpClient {
    pub fn new(rt: tokio::runtime::Handle) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build_http();
        RuntimeHttpClient { rt, client }
    }
}

/// Seconds since the epoch of the last export-failure warning (one a minute).
static LAST_WARNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn warn_export_failure(url: &str, what: &dyn std::fmt::Display) {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST_WARNING.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 60
        && LAST_WARNING.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tracing::warn!(url, error = %what, "OTLP export failed (is the collector at UNKEY_METALD_OTEL_ENDPOINT up?); repeats are silenced for a minute");
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let url = request.uri().to_string();
        let result = self.send(request).await;
        match &result {
            Err(e) => warn_export_failure(&url, e),
            Ok(r) if !r.status().is_success() => warn_export_failure(&url, &r.status()),
            Ok(_) => {}
        }
        result
    }
}

impl RuntimeHttpClient {
    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.rt.spawn(async move {
            let call = async {
                let resp = client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            tokio::time::timeout(EXPORT_TIMEOUT, call)
                .await
                .map_err(|_| HttpError::from(format!("no answer within {EXPORT_TIMEOUT:?}")))?
        });
        task.await?
    }
}

pub fn metric_exporter(
    url: &str,
    client: RuntimeHttpClient,
) -> Result<opentelemetry_otlp::MetricExporter, opentelemetry_otlp::ExporterBuildError> {
    opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        .build()
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &prometheus::Registry) -> Result<String, prometheus::Error> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

async fn scrape(
    axum::extract::State(registry): axum::extract::State<prometheus::Registry>,
) -> axum::response::Response {
    let _span = tracing::debug_span!("metrics.scrape").entered();
    match render(&registry) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response(),
    }
}

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: prometheus::Registry,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(registry);
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
}

/// Binds the metrics port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    Ok((l, bound))
}

/// The meter provider's one reader: the Prometheus exporter, shared with
/// [`push_metrics`] so that the OTLP push collects from the same
/// aggregation. Each reader of a meter provider keeps its own aggregation
/// of every instrument, so a second (periodic) reader doubled the cost of
/// every measurement on the RPC path.
#[derive(Debug, Clone)]
pub struct SharedReader(Arc<opentelemetry_prometheus::PrometheusExporter>);

impl SharedReader {
    pub fn new(exporter: opentelemetry_prometheus::PrometheusExporter) -> Self {
        SharedReader(Arc::new(exporter))
    }
}

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Pushes the metrics to the OTLP endpoint every `interval`, and once more
/// when `stop` fires. Failures are logged by the HTTP client.
pub async fn push_metrics(
    reader: SharedReader,
    exporter: opentelemetry_otlp::MetricExporter,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let mut rm = ResourceMetrics::default();
        if reader.collect(&mut rm).is_ok() {
            let _ = exporter.export(&rm).await;
        }
        if last {
            let _ = exporter.shutdown();
            return;
        }
    }
}
