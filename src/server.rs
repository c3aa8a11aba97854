//! HTTP front: one port serving the ConnectRPC VM API (Connect, gRPC and
//! gRPC-Web) and `GET /_/health`, with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::VmApi;
use crate::core::Manager;
use crate::pb::vmprovisioner::v1::VmServiceExt;

#[derive(Clone)]
pub struct HealthState {
    pub manager: Manager,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    backend: &'static str,
    backend_version: String,
    backend_ok: bool,
    backend_detail: String,
    store_ok: bool,
    vms: VmCounts,
}

#[derive(Serialize)]
struct VmCounts {
    total: usize,
    created: usize,
    running: usize,
    paused: usize,
    shutdown: usize,
}

async fn health(State(st): State<HealthState>) -> impl IntoResponse {
    use crate::core::state::VmState;
    let store = st.manager.store().clone();
    let store_ok = tokio::task::spawn_blocking(move || store.ping().is_ok()).await.unwrap_or(false);
    let backend = st.manager.backend().health().await;
    let counts = st.manager.counts();
    let n = |s| counts.get(&s).copied().unwrap_or(0);
    let ok = store_ok && backend.ok;
    let body = Health {
        status: if ok { "ok" } else { "unhealthy" },
        version: env!("CARGO_PKG_VERSION"),
        backend: st.manager.backend().kind().as_str(),
        backend_version: backend.version,
        backend_ok: backend.ok,
        backend_detail: backend.detail,
        store_ok,
        vms: VmCounts {
            total: counts.values().sum(),
            created: n(VmState::Created),
            running: n(VmState::Running),
            paused: n(VmState::Paused),
            shutdown: n(VmState::Shutdown),
        },
    };
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

/// The complete HTTP application.
pub fn app(manager: Manager, api: VmApi) -> axum::Router {
    let connect = Arc::new(api).register(connectrpc::Router::new());
    axum::Router::new()
        .route("/_/health", get(health))
        .with_state(HealthState { manager })
        .fallback_service(connect.into_axum_service())
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets in-flight calls finish.
pub async fn serve(listener: TcpListener, app: axum::Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(address = ?addr, "serving the VM API (Connect, gRPC, gRPC-Web) and /_/health");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
