//! Wires configuration, store, backend, manager and server into a running
//! daemon. `main` and the API tests both start metald through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::VmApi;
use crate::api::auth::Authenticator;
use crate::backend::fake::{FakeBackend, FakeControl};
use crate::backend::{Backend, ExitEvent};
use crate::config::{BackendChoice, Config};
use crate::core::spec::Limits;
use crate::core::{Manager, ManagerConfig};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("creating data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("asset directory {path}: {source}")]
    AssetDir { path: String, source: std::io::Error },
    #[error("opening the state store")]
    Store(#[from] crate::store::StoreError),
    #[error("loading auth tokens")]
    Auth(#[from] crate::api::auth::TokensFileError),
    #[error("{0}")]
    Backend(String),
    #[error("recovering VMs")]
    Recover(#[from] crate::error::Error),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A running daemon.
pub struct Daemon {
    pub addr: SocketAddr,
    pub manager: Manager,
    /// Set when running the fake backend (tests steer it through this).
    pub fake: Option<FakeControl>,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    grace: Duration,
}

impl Daemon {
    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the server to finish (after [`Daemon::shutdown`]); in-flight
    /// calls get the configured grace period. VMs keep running.
    pub async fn wait(self) -> std::io::Result<()> {
        match tokio::time::timeout(self.grace, self.server).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(_) => {
                warn!(grace_secs = self.grace.as_secs(), "in-flight calls did not finish in time");
                Ok(())
            }
        }
    }
}

fn canonical_asset_dirs(cfg: &Config) -> Result<Vec<std::path::PathBuf>, StartError> {
    let mut out = Vec::new();
    for d in &cfg.asset_dirs {
        std::fs::create_dir_all(d)
            .and_then(|_| std::fs::canonicalize(d))
            .map(|p| out.push(p))
            .map_err(|source| StartError::AssetDir { path: d.display().to_string(), source })?;
    }
    Ok(out)
}

/// Chooses and builds the backend.
fn build_backend(
    cfg: &Config,
    exits: crate::backend::ExitSink,
) -> Result<(Arc<dyn Backend>, Option<FakeControl>), StartError> {
    match cfg.backend {
        BackendChoice::Fake => {
            warn!("running the FAKE backend: no VM is real (for tests and development only)");
            let b = FakeBackend::new(exits);
            let control = b.control();
            Ok((Arc::new(b), Some(control)))
        }
        BackendChoice::Auto | BackendChoice::Qemu | BackendChoice::Firecracker | BackendChoice::CloudHypervisor => {
            Err(StartError::Backend(format!(
                "backend {:?} is not available in this build yet; set UNKEY_METALD_BACKEND=fake",
                cfg.backend
            )))
        }
    }
}

/// Starts metald: opens the store, recovers VMs, binds and serves.
pub async fn start(cfg: Config) -> Result<Daemon, StartError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| StartError::DataDir { path: cfg.data_dir.display().to_string(), source })?;
    let asset_dirs = canonical_asset_dirs(&cfg)?;
    let auth = Arc::new(Authenticator::from_file(cfg.auth_tokens_file.as_deref(), cfg.auth_dev_tokens)?);
    if cfg.auth_dev_tokens {
        warn!("UNKEY_METALD_AUTH_DEV_TOKENS is on: anyone can act as any customer with 'dev_customer_<id>'");
    }
    let store = Store::open(&cfg.data_dir.join("metald.db"))?;
    let (exit_tx, exit_rx) = tokio::sync::mpsc::unbounded_channel::<ExitEvent>();
    let (backend, fake) = build_backend(&cfg, exit_tx)?;
    info!(backend = backend.kind().as_str(), "backend selected");
    let shutdown = CancellationToken::new();
    let manager = Manager::open(
        ManagerConfig {
            data_dir: cfg.data_dir.clone(),
            limits: Limits { max_vcpus: cfg.max_vcpus, max_memory_mb: cfg.max_memory_mb, asset_dirs },
            max_vms: cfg.max_vms,
        },
        backend,
        store,
        exit_rx,
        shutdown.clone(),
    )
    .await?;
    let addr = SocketAddr::new(cfg.address, cfg.port);
    let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    let app = crate::server::app(manager.clone(), VmApi::new(manager.clone(), auth));
    let server = tokio::spawn(crate::server::serve(listener, app, shutdown.clone()));
    Ok(Daemon {
        addr,
        manager,
        fake,
        shutdown,
        server,
        grace: Duration::from_secs(cfg.shutdown_grace_secs),
    })
}
