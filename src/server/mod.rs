//! HTTP front: one port serving the ConnectRPC VM API (Connect, gRPC and
//! gRPC-Web) and `GET /_/health`, with graceful shutdown, header, body and
//! idle timeouts and connection caps.
//!
//! | file          | owns                                                          |
//! |---------------|---------------------------------------------------------------|
//! | `mod.rs`      | the app (health, the VM service) and [`serve`]                |
//! | `settings.rs` | [`ConnSettings`], `UNKEY_METALD_HTTP_*`                       |
//! | `accept.rs`   | the accept loop: connection caps, 503 refusals, accept errors |
//! | `conn.rs`     | one connection: hyper, its timeouts, requests in flight       |

mod accept;
mod conn;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;

pub use conn::{BodyError, TimedBody};
pub use settings::ConnSettings;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info};

use crate::api::VmApi;
use crate::core::Manager;
use crate::pb::vmprovisioner::v1::VmServiceExt;
use crate::telemetry::{Metrics, Telemetry};

#[derive(Clone)]
pub struct HealthState {
    pub manager: Manager,
    pub billing: Option<crate::billing::BillingStatus>,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    backend: &'static str,
    backend_version: String,
    backend_ok: bool,
    backend_detail: String,
    /// Whether `/dev/kvm` can be opened on this host.
    kvm: bool,
    /// The store answers and takes writes, and every VM's state is in it.
    store_ok: bool,
    /// Store writes that failed since start (a full disk, say).
    store_write_errors: u64,
    /// Unix seconds since when store writes fail, while they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    store_failing_since: Option<i64>,
    /// VMs whose latest state is not in the store yet (metald retries).
    store_unsaved_vms: usize,
    vms: VmCounts,
    /// Host networking of managed NICs: `ok`, `off`
    /// (`UNKEY_METALD_NETWORK_ENABLED=false`) or `unavailable` (see
    /// `network_detail`: why, and what to do; VMs with managed NICs are
    /// refused meanwhile, everything else works).
    network: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_detail: Option<String>,
    /// Metering and spool state; absent when billing is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    billing: Option<crate::billing::BillingHealth>,
}

#[derive(Serialize)]
struct VmCounts {
    total: usize,
    created: usize,
    running: usize,
    paused: usize,
    shutdown: usize,
}

async fn health(State(st): State<HealthState>, headers: axum::http::HeaderMap) -> axum::response::Response {
    let span = tracing::info_span!("health.check", otel.name = "GET /_/health", otel.kind = "server");
    crate::telemetry::rpc::continue_trace(&span, &headers);
    health_inner(st).instrument(span).await.into_response()
}

async fn health_inner(st: HealthState) -> impl IntoResponse {
    use crate::model::VmState;
    let store = st.manager.store().clone();
    let store_health = st.manager.store_health();
    let store_ok =
        tokio::task::spawn_blocking(move || store.ping().is_ok()).await.unwrap_or(false) && store_health.ok();
    let backend = st.manager.backend().health().await;
    let counts = st.manager.counts();
    let n = |s| counts.get(&s).copied().unwrap_or(0);
    let billing = st.billing.as_ref().map(|b| b.health());
    let ok = store_ok && backend.ok && billing.as_ref().is_none_or(|b| b.ok());
    let (network, network_detail) = match st.manager.network_status() {
        None => ("off", None),
        Some(None) => ("ok", None),
        Some(Some(why)) => ("unavailable", Some(why)),
    };
    let body = Health {
        status: if ok { "ok" } else { "unhealthy" },
        version: env!("CARGO_PKG_VERSION"),
        backend: st.manager.backend().kind().as_str(),
        backend_version: backend.version,
        backend_ok: backend.ok,
        backend_detail: backend.detail,
        kvm: crate::backend::host::kvm_available(),
        store_ok,
        store_write_errors: store_health.write_errors,
        store_failing_since: store_health.failing_since,
        store_unsaved_vms: store_health.unsaved_vms,
        vms: VmCounts {
            total: counts.values().sum(),
            created: n(VmState::Created),
            running: n(VmState::Running),
            paused: n(VmState::Paused),
            shutdown: n(VmState::Shutdown),
        },
        network,
        network_detail,
        billing,
    };
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

/// The complete HTTP application; with telemetry on, every RPC is traced
/// and measured (HTTP requests are measured by [`serve`]).
pub fn app(
    manager: Manager,
    api: VmApi,
    telemetry: &Telemetry,
    billing: Option<crate::billing::BillingStatus>,
) -> axum::Router {
    let connect = Arc::new(api.with_telemetry(telemetry.rpc())).register(connectrpc::Router::new()).into_axum_service();
    axum::Router::new()
        .route("/_/health", get(health))
        .with_state(HealthState { manager, billing })
        .fallback_service(connect)
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets in-flight calls finish. Connections are served under
/// `settings` (timeouts, caps), counted in `metrics`. With `http_metrics`,
/// every HTTP request is measured: the layer wraps the whole router, once
/// (axum's `Router::layer` would wrap every route and the fallback, which
/// costs a boxed service clone more per request).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    http_metrics: Option<crate::telemetry::rpc::HttpMetricsLayer>,
    settings: ConnSettings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use tower::Layer as _;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(
        address = ?addr,
        header_timeout_s = settings.header_timeout.as_secs(),
        body_timeout_s = settings.body_timeout.as_secs(),
        idle_timeout_s = settings.idle_timeout.as_secs(),
        max_connections = settings.max_connections,
        max_connections_per_ip = settings.max_connections_per_ip,
        "serving the VM API (Connect, gRPC, gRPC-Web) and /_/health"
    );
    match http_metrics {
        Some(layer) => accept::run(listener, layer.layer(app), settings, metrics, shutdown).await,
        None => accept::run(listener, app, settings, metrics, shutdown).await,
    }
}
