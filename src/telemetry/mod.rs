//! OpenTelemetry for metald, as specified in `spec/observability.md`.
//!
//! [`Telemetry::start`] builds, from a [`TelemetryConfig`]:
//! - one meter provider, one aggregation, two exports: the Prometheus
//!   exporter served at `GET http://<address>:<prometheus port>/metrics`
//!   and a periodic OTLP/HTTP push to `<endpoint>/v1/metrics` collected
//!   from the same reader ([`export`]);
//! - one tracer provider: OTLP/HTTP to `<endpoint>/v1/traces`, batched
//!   ([`spans`]), with
//!   parent-based ratio sampling that still exports error spans
//!   ([`traces`]), fed by the process' `tracing` spans through [`layer`];
//! - metald's metrics ([`metrics`]), process metrics ([`process`]) and the
//!   per-RPC / per-HTTP-request instrumentation of the API port ([`rpc`]).
//!
//! Disabled, [`Telemetry::disabled`] holds nothing: no port, no exporter,
//! no RPC telemetry, and every metric handle is a no-op.

pub mod config;
pub mod export;
pub mod metrics;
pub mod otlp;
pub mod process;
pub mod rpc;
pub mod spans;
pub mod traces;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{LogFormat, TelemetryConfig};
pub use metrics::{BillingMetrics, Metrics, Operation};
pub use traces::{LOG_ONLY, METERING_ROUND, WithTraceIds, layer};

use crate::core::{Observer, VmEvent};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP {signal} exporter for {url}")]
    Exporter {
        signal: &'static str,
        url: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("the OTLP traces URL {url} is not a valid URL (UNKEY_METALD_OTEL_ENDPOINT)")]
    TracesUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("starting the span export thread")]
    Thread(#[source] std::io::Error),
    #[error("building the Prometheus exporter")]
    Prometheus(#[source] opentelemetry_sdk::error::OTelSdkError),
    #[error("binding the metrics port {addr} (UNKEY_METALD_OTEL_PROMETHEUS_PORT)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Telemetry of one daemon; cheap handles are taken from it.
pub struct Telemetry {
    metrics: Metrics,
    running: Option<Running>,
}

struct Running {
    tracers: SdkTracerProvider,
    /// RPC server spans go here, outside the SDK (see `rpc::RpcTelemetry`).
    span_queue: spans::SpanQueue,
    sampler: traces::KeepErrorsSampler,
    meters: SdkMeterProvider,
    tracer_token: u64,
    metrics_addr: SocketAddr,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    /// The OTLP metrics push (a last one when `stop` fires).
    push: Option<JoinHandle<()>>,
    _process: process::ProcessMetrics,
    /// Held so their callbacks live as long as the handle.
    store_metrics:
        Option<(opentelemetry::metrics::ObservableCounter<u64>, opentelemetry::metrics::ObservableGauge<u64>)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        traces::deactivate(self.tracer_token);
        self.stop.cancel();
    }
}

/// The process' `tracing` subscriber, as `main` installs it: log lines in
/// `format` to `writer`, filtered by `filter` (`UNKEY_METALD_LOG`), and the
/// OpenTelemetry [`layer`] beside them with its own filter, so the log
/// level never decides what is traced (with `warn` logs, the lifecycle and
/// hypervisor spans are still exported).
pub fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
    ansi: bool,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, fmt};

    let logs = match format {
        LogFormat::Json => fmt::layer()
            .with_writer(writer)
            .event_format(WithTraceIds::new(fmt::format().json(), true))
            .fmt_fields(fmt::format::JsonFields::new())
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .event_format(WithTraceIds::new(fmt::format(), false))
            .boxed(),
    };
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(layer())
}

/// The name of metald's tracer (its instrumentation scope).
const TRACER: &str = "metald";

fn host_name() -> String {
    crate::procfs::hostname().unwrap_or_else(|| "unknown".into())
}

fn resource(cfg: &TelemetryConfig) -> Resource {
    let instance: u128 = rand::random();
    Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", format!("{instance:032x}")),
            KeyValue::new("host.name", host_name()),
        ])
        .build()
}

impl Telemetry {
    /// Telemetry switched off.
    pub fn disabled() -> Telemetry {
        Telemetry { metrics: Metrics::default(), running: None }
    }

    /// Starts exporting, and serves `/metrics` on `address:prometheus_port`
    /// until `stop` fires or the telemetry is shut down.
    pub async fn start(
        cfg: &TelemetryConfig,
        address: IpAddr,
        stop: CancellationToken,
    ) -> Result<Telemetry, TelemetryError> {
        if !cfg.enabled {
            return Ok(Telemetry::disabled());
        }
        let rt = tokio::runtime::Handle::current();
        let client = export::RuntimeHttpClient::new(rt.clone());
        let resource = resource(cfg);

        let exporter_err = |signal, url: String| move |source| TelemetryError::Exporter { signal, url, source };
        let sampler = traces::KeepErrorsSampler::new(cfg.sampling_rate);
        let traces_url = cfg.traces_url();
        let url = traces_url.parse().map_err(|source| TelemetryError::TracesUrl { url: traces_url.clone(), source })?;
        let spans = spans::OtlpSpanProcessor::start(
            spans::Sink { url, client: client.clone(), rt: rt.clone(), delay: cfg.traces_delay },
            TRACER,
        )
        .map_err(TelemetryError::Thread)?;
        let span_queue = spans.queue();
        let tracers = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(sampler.clone())
            .with_span_processor(spans)
            .build();

        let registry = prometheus::Registry::new();
        let prom = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(TelemetryError::Prometheus)?;
        let metric_exporter =
            export::metric_exporter(&cfg.metrics_url(), client).map_err(exporter_err("metrics", cfg.metrics_url()))?;
        let reader = export::SharedReader::new(prom);
        let meters = SdkMeterProvider::builder().with_resource(resource).with_reader(reader.clone()).build();
        let push = tokio::spawn(export::push_metrics(reader, metric_exporter, cfg.metrics_interval, stop.clone()));
        let meter = meters.meter("metald");
        let metrics = Metrics::register(&meter);
        let process = process::register(&meter, Some(rt));

        let addr = SocketAddr::new(cfg.prometheus_address.unwrap_or(address), cfg.prometheus_port);
        let (listener, metrics_addr) =
            export::bind(addr).await.map_err(|source| TelemetryError::Bind { addr, source })?;
        let server = tokio::spawn(export::serve_metrics(listener, registry, stop.clone()));

        if !traces::layer_installed() {
            warn!(
                "telemetry is on but no tracing layer was installed (metald::telemetry::layer): no spans will be exported"
            );
        }
        let tracer_token = traces::activate(tracers.tracer(TRACER));
        info!(
            metrics = %format!("http://{metrics_addr}/metrics"),
            otlp = %cfg.endpoint,
            sampling_rate = cfg.sampling_rate,
            "telemetry on: Prometheus endpoint and OTLP/HTTP export"
        );
        Ok(Telemetry {
            metrics,
            running: Some(Running {
                tracers,
                span_queue,
                sampler,
                meters,
                tracer_token,
                metrics_addr,
                stop,
                server: Some(server),
                push: Some(push),
                _process: process,
                store_metrics: None,
            }),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.running.is_some()
    }

    /// Metric handles (no-ops when disabled).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `/metrics` is served, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|r| r.metrics_addr)
    }

    /// The per-RPC spans and metrics, when enabled.
    pub fn rpc(&self) -> Option<rpc::RpcTelemetry> {
        let r = self.running.as_ref()?;
        Some(rpc::RpcTelemetry::new(self.metrics.clone(), r.span_queue.clone(), r.sampler.clone()))
    }

    /// The HTTP server metrics layer, when enabled.
    pub fn http_layer(&self) -> Option<rpc::HttpMetricsLayer> {
        self.is_enabled().then(|| rpc::HttpMetricsLayer::new(self.metrics.clone()))
    }

    /// Counts the store's failed writes and the VMs whose state is not in
    /// it yet (`metald_store_write_errors_total`, `metald_store_unsaved_vms`).
    pub fn watch_store(&mut self, manager: &crate::core::Manager) {
        let Some(r) = self.running.as_mut() else { return };
        let meter = r.meters.meter("metald");
        let m = manager.clone();
        let errors = meter
            .u64_observable_counter("metald_store_write_errors")
            .with_description("State store writes that failed (disk full, I/O error)")
            .with_callback(move |o| o.observe(m.store_health().write_errors, &[]))
            .build();
        let m = manager.clone();
        let unsaved = meter
            .u64_observable_gauge("metald_store_unsaved_vms")
            .with_description("VMs whose latest state is not in the store yet (metald retries)")
            .with_callback(move |o| o.observe(u64::try_from(m.store_health().unsaved_vms).unwrap_or(u64::MAX), &[]))
            .build();
        r.store_metrics = Some((errors, unsaved));
    }

    /// Core observer that drops a deleted VM's metric series and counts
    /// stops by reason.
    pub fn observer(&self) -> Arc<dyn Observer> {
        Arc::new(ForgetDeletedVms(self.metrics.billing().clone(), self.metrics.clone()))
    }

    /// Flushes and stops exporting; waits at most `grace` for the exports.
    pub async fn shutdown(mut self, grace: Duration) {
        let Some(mut r) = self.running.take() else { return };
        traces::deactivate(r.tracer_token);
        r.stop.cancel();
        if let Some(server) = r.server.take() {
            let _ = server.await;
        }
        if let Some(push) = r.push.take()
            && tokio::time::timeout(grace, push).await.is_err()
        {
            warn!("the last OTLP metrics push did not finish in time");
        }
        let (tracers, meters) = (r.tracers.clone(), r.meters.clone());
        // The SDK blocks while its threads export through this runtime.
        let flush = tokio::task::spawn_blocking(move || {
            let t = tracers.shutdown_with_timeout(grace);
            let m = meters.shutdown_with_timeout(grace);
            (t, m)
        });
        match tokio::time::timeout(grace + Duration::from_secs(1), flush).await {
            Ok(Ok((t, m))) => {
                if let Err(e) = t.and(m) {
                    warn!(error = %e, "telemetry did not shut down cleanly");
                }
            }
            _ => warn!("telemetry flush did not finish in time"),
        }
    }
}

struct ForgetDeletedVms(BillingMetrics, Metrics);

impl Observer for ForgetDeletedVms {
    fn on_event(&self, event: &VmEvent) {
        if let Some(s) = &event.stopped {
            self.1.vm_stopped(s.reason);
        }
        match (event.from, event.to) {
            (_, None) => self.0.forget_vm(&event.vm_id),
            (None, Some(_)) => self.0.vm_created(&event.vm_id),
            (Some(_), Some(_)) => {}
        }
    }
}
