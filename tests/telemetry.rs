//! Telemetry end to end: the daemon in-process with the fake backend, an
//! OTLP/HTTP receiver in the test (decoding protobuf with
//! `opentelemetry-proto`), a real Prometheus (Debian package) scraping the
//! metrics port, and `promtool check metrics` on the scrape.
//!
//! The tests share the process-wide `tracing` subscriber, so they run one
//! at a time (a daemon's tracer is the process' active tracer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use metald::model::VmId;
use metald::pb::vmprovisioner::v1 as pb;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use prost::Message;
use support::{TOKEN_A, eventually, free_port, repo_root, start};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process' subscriber, as `main` builds it: logs (captured) + OTel.
/// Logs are at `warn` but for the core's: spans of other modules (the
/// backend's `hypervisor.api`, billing) must be exported all the same.
fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::new("warn,metald::core=info");
        metald::telemetry::subscriber(metald::telemetry::LogFormat::Text, filter, || LogSink, false).init();
    });
}

// ---- OTLP/HTTP receiver ------------------------------------------------------

#[derive(Default)]
struct Received {
    requests: usize,
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Received>>,
}

/// A span with its resource attributes.
#[derive(Clone, Debug)]
struct Got {
    resource: Vec<KeyValue>,
    span: Span,
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Arc<Mutex<Received>> = Arc::default();
        let (g1, g2) = (got.clone(), got.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: Bytes| async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("protobuf ExportTraceServiceRequest");
                    let mut g = g1.lock().unwrap();
                    g.requests += 1;
                    g.traces.push(req);
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }),
            )
            .route(
                "/v1/metrics",
                axum::routing::post(move |body: Bytes| async move {
                    let req = ExportMetricsServiceRequest::decode(body).expect("protobuf ExportMetricsServiceRequest");
                    let mut g = g2.lock().unwrap();
                    g.requests += 1;
                    g.metrics.push(req);
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportMetricsServiceResponse::default().encode_to_vec(),
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, got }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        let g = self.got.lock().unwrap();
        let mut out = Vec::new();
        for req in &g.traces {
            for rs in &req.resource_spans {
                let resource = rs.resource.as_ref().map(|r| r.attributes.clone()).unwrap_or_default();
                for ss in &rs.scope_spans {
                    out.extend(ss.spans.iter().map(|s| Got { resource: resource.clone(), span: s.clone() }));
                }
            }
        }
        out
    }

    fn metric_names(&self) -> Vec<String> {
        let g = self.got.lock().unwrap();
        g.metrics
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .map(|m| m.name.clone())
            .collect()
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn attr_str(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_error(s: &Span) -> bool {
    s.status.as_ref().is_some_and(|st| st.code == StatusCode::Error as i32)
}

fn server_span(spans: &[Got], rpc: &str) -> Vec<Got> {
    let name = format!("vmprovisioner.v1.VmService/{rpc}");
    spans.iter().filter(|g| g.span.name == name && g.span.kind == SpanKind::Server as i32).cloned().collect()
}

/// True when `child` descends from `ancestor` within `spans`.
fn descends(spans: &[Got], child: &Span, ancestor: &Span) -> bool {
    let mut cur = child.clone();
    for _ in 0..32 {
        if cur.trace_id != ancestor.trace_id {
            return false;
        }
        if cur.parent_span_id == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|g| g.span.span_id == cur.parent_span_id) {
            Some(p) => cur = p.span.clone(),
            None => return false,
        }
    }
    false
}

// ---- plain HTTP ---------------------------------------------------------------

async fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, text)
}

/// A Connect JSON call, optionally continuing a trace.
async fn connect_call(addr: SocketAddr, method: &str, json: &str, traceparent: Option<&str>) -> u16 {
    let auth = format!("Bearer {TOKEN_A}");
    let mut headers = vec![("content-type", "application/json"), ("authorization", auth.as_str())];
    if let Some(tp) = traceparent {
        headers.push(("traceparent", tp));
    }
    http("POST", &format!("http://{addr}/vmprovisioner.v1.VmService/{method}"), &headers, json).await.0
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, text) = http("GET", &format!("http://{addr}/metrics"), &[], "").await;
    assert_eq!(status, 200);
    text
}

// ---- Prometheus ----------------------------------------------------------------

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with the spec's scrape config pointed at `target`
    /// (scraping every second instead of ten).
    fn start(target: SocketAddr) -> Prometheus {
        let bin = "/usr/bin/prometheus";
        assert!(std::path::Path::new(bin).exists(), "{bin} is missing: run `make deps` (Debian package prometheus)");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "scrape_configs:\n  - job_name: 'metald'\n    static_configs:\n      - targets: ['{target}']\n    scrape_interval: 1s\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// Runs an instant query; the result vector (empty while not ready).
    async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let enc: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        let Ok(resp) = client.get(format!("{}/api/v1/query?query={enc}", self.url).parse().unwrap()).await else {
            return Vec::new(); // not listening yet
        };
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

// ---- daemons ---------------------------------------------------------------------

async fn start_enabled(recv: &Receiver, rate: &str) -> support::TestDaemon {
    start_enabled_with(recv, rate, &[]).await
}

async fn start_enabled_with(recv: &Receiver, rate: &str, extra: &[(&str, &str)]) -> support::TestDaemon {
    init_tracing();
    let endpoint = recv.endpoint();
    let mut env = vec![
        ("OTEL_ENABLED", "true"),
        ("OTEL_SAMPLING_RATE", rate),
        ("OTEL_ENDPOINT", &endpoint),
        ("OTEL_PROMETHEUS_PORT", "0"),
        ("OTEL_SERVICE_NAME", "metald-test"),
        ("OTEL_METRICS_INTERVAL_MS", "200"),
        ("OTEL_TRACES_DELAY_MS", "20"),
    ];
    env.extend_from_slice(extra);
    start(&env).await
}

async fn create(t: &support::TestDaemon, id: &str) -> Result<(), connectrpc::ConnectError> {
    t.client(TOKEN_A)
        .create_vm(pb::CreateVmRequest { vm_id: id.into(), config: t.config(&t.kernel()).into(), ..Default::default() })
        .await
        .map(|_| ())
}

async fn boot(t: &support::TestDaemon, id: &str) {
    t.client(TOKEN_A).boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
}

// ---- tests -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_have_structure_resources_and_honour_unsampled_parents_and_metrics_are_pushed() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let t = start_enabled(&recv, "1.0").await;
    create(&t, "vm-tr1").await.unwrap();
    boot(&t, "vm-tr1").await;
    let (status, _) = http("GET", &format!("{}/_/health", t.endpoint()), &[], "").await;
    assert_eq!(status, 200);
    // sampled=0 upstream: not exported at rate 1.0 ...
    let quiet = "00-11111111111111111111111111111111-2222222222222222-00";
    assert_eq!(connect_call(t.d().addr, "GetVmInfo", r#"{"vmId":"vm-tr1"}"#, Some(quiet)).await, 200);
    // ... unless it fails.
    let failing = "00-33333333333333333333333333333333-4444444444444444-00";
    assert_eq!(connect_call(t.d().addr, "GetVmInfo", r#"{"vmId":"vm-missing"}"#, Some(failing)).await, 404);

    let spans = eventually("the failing unsampled GetVmInfo span", || {
        let s = recv.spans();
        s.iter().any(|g| hex(&g.span.trace_id) == "33333333333333333333333333333333").then_some(s)
    })
    .await;
    // Spans are exported in the order they end: the quiet call's would be here by now.
    assert!(
        !spans.iter().any(|g| hex(&g.span.trace_id) == "11111111111111111111111111111111"),
        "sampled=0 trace was exported"
    );
    let failed = server_span(&spans, "GetVmInfo").into_iter().find(|g| is_error(&g.span)).expect("error server span");
    assert_eq!(hex(&failed.span.parent_span_id), "4444444444444444");
    assert_eq!(attr_str(&failed.span.attributes, "rpc.connect_rpc.error_code").as_deref(), Some("not_found"));

    let spans = eventually("CreateVm, BootVm and health spans", || {
        let s = recv.spans();
        let ok = !server_span(&s, "CreateVm").is_empty()
            && !server_span(&s, "BootVm").is_empty()
            && s.iter().any(|g| g.span.name == "GET /_/health");
        ok.then_some(s)
    })
    .await;
    let create_span = server_span(&spans, "CreateVm").remove(0);
    assert!(!is_error(&create_span.span));
    assert_eq!(create_span.span.parent_span_id, Vec::<u8>::new(), "a root span");
    assert_eq!(attr_str(&create_span.span.attributes, "rpc.method").as_deref(), Some("CreateVm"));
    assert_eq!(attr_str(&create_span.span.attributes, "rpc.system").as_deref(), Some("connect_rpc"));
    for child in ["validate", "backend.create", "store.insert"] {
        let c = spans.iter().find(|g| g.span.name == child && g.span.trace_id == create_span.span.trace_id);
        let c = c.unwrap_or_else(|| panic!("no {child} span in the CreateVm trace"));
        assert!(descends(&spans, &c.span, &create_span.span), "{child} is not under CreateVm");
    }
    let boot_span = server_span(&spans, "BootVm").remove(0);
    for child in ["backend.call", "store.update"] {
        let c = spans.iter().find(|g| g.span.name == child && g.span.trace_id == boot_span.span.trace_id).unwrap();
        assert!(descends(&spans, &c.span, &boot_span.span), "{child} is not under BootVm");
    }
    let client = spans
        .iter()
        .find(|g| g.span.kind == SpanKind::Client as i32 && g.span.trace_id == boot_span.span.trace_id)
        .expect("a backend client span under BootVm");
    assert_eq!(attr_str(&client.span.attributes, "rpc.method").as_deref(), Some("boot"));
    assert_eq!(attr_str(&client.span.attributes, "outcome").as_deref(), Some("ok"));
    assert!(descends(&spans, &client.span, &boot_span.span));

    let res = &create_span.resource;
    assert_eq!(attr_str(res, "service.name").as_deref(), Some("metald-test"));
    assert_eq!(attr_str(res, "service.version").as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert!(attr_str(res, "service.instance.id").is_some_and(|s| s.len() == 32));
    assert!(attr_str(res, "host.name").is_some_and(|s| !s.is_empty()));

    // Log lines inside the CreateVm span carry its trace id.
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    let trace = hex(&create_span.span.trace_id);
    assert!(
        logs.lines()
            .any(|l| l.contains("VM created") && l.contains(&format!("trace_id={trace}")) && l.contains("span_id=")),
        "no 'VM created' log line with trace_id={trace}:\n{logs}"
    );

    eventually("metrics pushed over OTLP", || {
        let names = recv.metric_names();
        (names.iter().any(|n| n == "metald_vm_operations") && names.iter().any(|n| n == "process_cpu")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rate_zero_errors_and_sampled_parents_are_exported_and_nothing_else() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let t = start_enabled(&recv, "0.0").await;
    create(&t, "vm-z1").await.unwrap();
    let dup = create(&t, "vm-z1").await.expect_err("duplicate id");
    assert_eq!(dup.code, connectrpc::ErrorCode::AlreadyExists);
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let body = format!(
        r#"{{"vmId":"vm-z2","config":{{"cpu":{{"vcpuCount":1}},"memory":{{"sizeBytes":"134217728"}},"boot":{{"kernelPath":"{}"}}}}}}"#,
        t.kernel()
    );
    assert_eq!(connect_call(t.d().addr, "CreateVm", &body, Some(sampled)).await, 200);

    let spans = eventually("the failing CreateVm and the sampled one", || {
        let s = recv.spans();
        let failing = server_span(&s, "CreateVm").iter().any(|g| is_error(&g.span));
        let continued =
            server_span(&s, "CreateVm").iter().any(|g| hex(&g.span.trace_id) == "0af7651916cd43dd8448eb211c80319c");
        (failing && continued).then_some(s)
    })
    .await;
    // The successful unsampled CreateVm ended before the failing one: it was not exported.
    let creates = server_span(&spans, "CreateVm");
    assert_eq!(creates.len(), 2, "only the failing and the sampled CreateVm are exported at rate 0.0");
    let failed = creates.iter().find(|g| is_error(&g.span)).unwrap();
    assert!(failed.span.status.as_ref().unwrap().message.contains("already_exists"));
    let sampled = creates.iter().find(|g| hex(&g.span.trace_id) == "0af7651916cd43dd8448eb211c80319c").unwrap();
    assert_eq!(hex(&sampled.span.parent_span_id), "b7ad6b7169203331");
    assert_eq!(attr_str(&sampled.span.attributes, "vm_id").as_deref(), Some("vm-z2"));
    let backend = spans.iter().find(|g| g.span.name == "backend.create" && g.span.trace_id == sampled.span.trace_id);
    assert!(descends(&spans, &backend.expect("backend.create of the sampled call").span, &sampled.span));
}

/// A call dropped unfinished (here: its deadline passes while the backend
/// is slow) still has its server span, as an error kept at rate 0.0, and
/// counts as `deadline_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_their_deadline_are_recorded_as_errors() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let t = start_enabled(&recv, "0.0").await;
    create(&t, "vm-slow").await.unwrap();
    t.d().fake.as_ref().unwrap().set_delay(Duration::from_millis(1500));
    let impatient = metald::client::vm_client(
        &t.endpoint(),
        TOKEN_A,
        metald::client::WireProtocol::ConnectProto,
        Duration::from_millis(300),
    )
    .unwrap();
    let err = impatient.boot_vm(pb::BootVmRequest { vm_id: "vm-slow".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code, connectrpc::ErrorCode::DeadlineExceeded, "{err:?}");

    let boot =
        eventually("the abandoned BootVm span", || server_span(&recv.spans(), "BootVm").into_iter().next()).await;
    assert!(is_error(&boot.span));
    assert_eq!(attr_str(&boot.span.attributes, "rpc.connect_rpc.error_code").as_deref(), Some("deadline_exceeded"));
    assert_eq!(attr_str(&boot.span.attributes, "vm_id").as_deref(), Some("vm-slow"));
    let text = scrape(t.d().metrics_addr.unwrap()).await;
    assert!(
        text.lines().any(|l| l.starts_with("metald_vm_operations_total{")
            && l.contains(r#"code="deadline_exceeded""#)
            && l.contains(r#"operation="boot""#)
            && l.ends_with(" 1")),
        "{text}"
    );
    t.d().fake.as_ref().unwrap().set_delay(Duration::ZERO);
}

/// `/metrics` (no credential, `vm_id` labels) can listen on its own
/// address while the API listens on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_on_their_own_address_when_asked() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let t = start_enabled_with(&recv, "1.0", &[("OTEL_PROMETHEUS_ADDRESS", "127.0.0.2")]).await;
    let maddr = t.d().metrics_addr.expect("metrics port open");
    assert_eq!(maddr.ip(), std::net::IpAddr::from([127, 0, 0, 2]));
    assert_eq!(t.d().addr.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    create(&t, "vm-m").await.unwrap();
    let text = scrape(maddr).await;
    assert!(text.contains("metald_vm_operations_total{"), "{text}");
    // Nothing serves /metrics beside the API.
    let beside = std::net::SocketAddr::new(t.d().addr.ip(), maddr.port());
    assert!(tokio::net::TcpStream::connect(beside).await.is_err(), "{beside} should not be listening");
}

/// Billing collection rounds and batch sends have spans (with their
/// counts and outcome); the backend's per-sample calls inside a round do
/// not (10 a second per VM would crowd out everything else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_rounds_and_sends_are_traced_but_not_each_sample() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let billing = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let (db, stop2) = (tmp.path().join("billing.db"), stop.clone());
    let server = tokio::spawn(async move { metald::billing::devserver::serve(listener, &db, stop2).await });
    let t = start_enabled_with(
        &recv,
        "1.0",
        &[
            ("BILLING_ENDPOINT", &billing),
            ("BILLING_INTERVAL_MS", "100"),
            ("BILLING_BATCH_SIZE", "5"),
            ("BILLING_COMMIT_MS", "100"),
            ("BILLING_FLUSH_MS", "300"),
        ],
    )
    .await;
    create(&t, "vm-b1").await.unwrap();
    boot(&t, "vm-b1").await;

    let int = |g: &Got, key: &str| match attr(&g.span.attributes, key) {
        Some(any_value::Value::IntValue(v)) => Some(*v),
        _ => None,
    };
    let round = eventually("a billing.collect span of one VM", || {
        recv.spans().into_iter().find(|g| g.span.name == "billing.collect" && int(g, "vms") == Some(1))
    })
    .await;
    assert_eq!((int(&round, "samples"), int(&round, "failed")), (Some(1), Some(0)));
    assert!(!is_error(&round.span));
    let send = eventually("a billing.send span of the VM", || {
        recv.spans().into_iter().find(|g| {
            g.span.name == "billing.send" && attr_str(&g.span.attributes, "vm_id").as_deref() == Some("vm-b1")
        })
    })
    .await;
    assert_eq!(attr_str(&send.span.attributes, "outcome").as_deref(), Some("ok"));

    // Lifecycle calls reach the fake's "hypervisor API" with spans; its
    // usage call, made in every round, never shows up.
    let spans = recv.spans();
    let api = |method: &str| {
        spans.iter().any(|g| {
            g.span.name == "hypervisor.api" && attr_str(&g.span.attributes, "rpc.method").as_deref() == Some(method)
        })
    };
    assert!(api("boot"), "the boot call's client span");
    let rounds = spans.iter().filter(|g| g.span.name == "billing.collect").count();
    assert!(rounds >= 1 && !api("usage"), "{rounds} rounds, and a usage call was exported");

    drop(t);
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_spec_metrics_and_promtool_accepts_them() {
    let _serial = SERIAL.lock().await;
    let recv = Receiver::start().await;
    let t = start_enabled(&recv, "1.0").await;
    let maddr = t.d().metrics_addr.expect("metrics port open");
    for id in ["vm-p1", "vm-p2", "vm-p3"] {
        create(&t, id).await.unwrap();
    }
    assert!(create(&t, "vm-p1").await.is_err());
    boot(&t, "vm-p1").await;
    let c = t.client(TOKEN_A);
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: "vm-p1".into(), ..Default::default() }).await.unwrap();
    c.list_vms(pb::ListVmsRequest::default()).await.unwrap();
    let stop = pb::ShutdownVmRequest { vm_id: "vm-p1".into(), force: true, ..Default::default() };
    c.shutdown_vm(stop).await.unwrap();
    // What the billing collector does.
    let billing = t.d().metrics().billing().clone();
    let (p1, p2) = (VmId::parse("vm-p1").unwrap(), VmId::parse("vm-p2").unwrap());
    billing.samples_collected(p1.as_str(), 2);
    billing.samples_collected(p2.as_str(), 1);
    billing.batch_sent(&p1);
    billing.heartbeat_sent();

    let text = scrape(maddr).await;
    for needle in [
        r#"metald_vm_operations_total{code="ok",operation="create","#,
        r#"metald_vm_operations_total{code="already_exists",operation="create","#,
        "metald_vm_operation_duration_seconds_bucket{",
        r#"metald_metrics_collected_total{vm_id="vm-p1",otel_scope_name="metald"} 2"#,
        r#"metald_metrics_collected_total{vm_id="vm-p2",otel_scope_name="metald"} 1"#,
        r#"metald_billing_batches_sent_total{vm_id="vm-p1",otel_scope_name="metald"} 1"#,
        "metald_heartbeat_sent_total{",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "http_server_request_duration_seconds_bucket{",
        "http_server_active_requests",
        "rpc_server_duration_seconds_bucket{",
        "# TYPE metald_vm_operations_total counter",
        "# TYPE metald_vm_operation_duration_seconds histogram",
        r#"metald_vm_stops_total{reason="requested",otel_scope_name="metald"} 1"#,
        r#"metald_vm_stops_total{reason="crashed",otel_scope_name="metald"} 0"#,
    ] {
        assert!(text.contains(needle), "scrape lacks {needle:?}:\n{text}");
    }
    // Every API request (POST) has ended: none is counted in flight.
    let active: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_server_active_requests{") && l.contains(r#"http_request_method="POST""#))
        .collect();
    assert_eq!(active.len(), 1, "one POST series of http_server_active_requests:\n{text}");
    assert!(active[0].ends_with(" 0"), "requests still counted in flight: {}", active[0]);
    check_documented(&text);
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut promtool = promtool.expect("promtool (Debian package prometheus; run `make deps`)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it.
    let prom = Prometheus::start(maddr);
    // All RPCs are done before Prometheus starts: its first sample is final.
    let q = r#"sum(metald_vm_operations_total{operation="create",status="success"})"#;
    assert_eq!(eventually_query(&prom, q).await, 3.0);
    assert_eq!(
        eventually_query(&prom, r#"sum(metald_vm_operations_total{operation="create",status="error"})"#).await,
        1.0
    );
    assert!(
        eventually_query(&prom, r#"count(metald_vm_operation_duration_seconds_bucket{operation="create"})"#).await
            >= 10.0
    );
    assert!(eventually_query(&prom, "process_resident_memory_bytes").await > 0.0);
    assert!(eventually_query(&prom, "process_cpu_seconds_total").await > 0.0);

    // A deleted VM's series disappear.
    c.delete_vm(pb::DeleteVmRequest { vm_id: "vm-p1".into(), force: true, ..Default::default() }).await.unwrap();
    assert_eq!(billing.tracked_vms(), 1, "only vm-p2 keeps series");
    // The SDK feeds every reader's callbacks into every reader, so a value
    // observed for the OTLP push just before the delete can show once more.
    let mut text = String::new();
    for _ in 0..3 {
        text = scrape(maddr).await;
        if !text.contains(r#"vm_id="vm-p1""#) {
            break;
        }
    }
    assert!(!text.contains(r#"vm_id="vm-p1""#), "series of a deleted VM remain:\n{text}");
    assert!(text.contains(r#"vm_id="vm-p2""#));
}

/// Every metric in the scrape is in docs/METRICS.md and vice versa, and
/// the Grafana dashboard uses only documented metrics.
fn check_documented(scrape: &str) {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join("docs/METRICS.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let scraped: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|n| *n != "target_info")
        .map(str::to_owned)
        .collect();
    assert_eq!(documented, scraped, "docs/METRICS.md and the scrape disagree");
    let dashboard = std::fs::read_to_string(root.join("contrib/grafana/metald.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    for used in
        ["metald_vm_operations_total", "metald_vm_operation_duration_seconds_bucket", "metald_metrics_collected_total"]
    {
        assert!(dashboard.contains(used), "dashboard does not show {used}");
    }
    for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        let base = word.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
        let looks_like_metric =
            ["metald_", "process_", "http_server_", "rpc_server_", "tokio_"].iter().any(|p| word.starts_with(p));
        assert!(!looks_like_metric || documented.contains(base), "dashboard uses undocumented {word}");
    }
}

/// Polls a Prometheus instant query until it returns a sample.
async fn eventually_query(prom: &Prometheus, q: &str) -> f64 {
    for _ in 0..600 {
        if let Some(v) = prom.query(q).await.first().map(value) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Prometheus never answered {q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_opens_no_port_and_exports_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let recv = Receiver::start().await;
    let port = free_port().to_string();
    let endpoint = recv.endpoint();
    let mut t =
        start(&[("OTEL_ENDPOINT", &endpoint), ("OTEL_PROMETHEUS_PORT", &port), ("OTEL_METRICS_INTERVAL_MS", "100")])
            .await;
    assert!(t.d().metrics_addr.is_none());
    create(&t, "vm-d1").await.unwrap();
    boot(&t, "vm-d1").await;
    assert_eq!(connect_call(t.d().addr, "GetVmInfo", r#"{"vmId":"nope"}"#, None).await, 404);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).await.is_err(),
        "metrics port is open"
    );
    // After a full shutdown (which would flush any exporter) nothing arrived.
    let d = t.daemon.take().unwrap();
    d.shutdown();
    d.wait().await.unwrap();
    assert_eq!(recv.got.lock().unwrap().requests, 0);
}
