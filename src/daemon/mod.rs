//! Wires configuration, store, backend, manager and server into a running
//! daemon. `main` and the API tests both start metald through [`start`].

pub mod config;
pub mod images;
mod net;

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
use crate::backend::qemu::QemuBackend;
use crate::backend::{Backend, ExitEvent};
use crate::core::{Manager, ManagerConfig};
use crate::model::Limits;
use crate::store::Store;
use crate::telemetry::Telemetry;
pub use config::{BackendChoice, Config};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("creating data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("asset directory {path}: {source}")]
    AssetDir { path: String, source: std::io::Error },
    #[error("opening the state store")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "the state store {db} is new or empty, but {vms} holds {} VM directories ({}): the store was lost \
         or replaced while VMs existed, and starting would leave their guests unmanaged. Restore metald.db \
         (with its -wal file) from a backup, or, if those VMs are gone, stop their hypervisor processes and \
         move the directories away",
        names.len(),
        names.iter().take(5).cloned().collect::<Vec<_>>().join(", ") + if names.len() > 5 { ", ..." } else { "" }
    )]
    StoreLost { db: String, vms: String, names: Vec<String> },
    #[error("loading auth tokens")]
    Auth(#[from] crate::api::auth::TokensFileError),
    #[error("{0}")]
    Backend(String),
    #[error("recovering VMs")]
    Recover(#[from] crate::error::Error),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("starting telemetry")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("starting billing")]
    Billing(#[from] crate::billing::BillingError),
    #[error("opening the image cache (UNKEY_METALD_IMAGE_CACHE_DIR; or UNKEY_METALD_IMAGES_ENABLED=false): {0}")]
    Images(String),
}

/// Longest wait for the last telemetry export on shutdown.
const TELEMETRY_FLUSH: Duration = Duration::from_secs(5);

/// A running daemon.
pub struct Daemon {
    pub addr: SocketAddr,
    pub manager: Manager,
    /// Set when running the fake backend (tests steer it through this).
    pub fake: Option<FakeControl>,
    /// The image cache; `None` when image VMs are off.
    pub images: Option<Arc<crate::image::Images>>,
    /// Where Prometheus scrapes `/metrics`; `None` when telemetry is off.
    pub metrics_addr: Option<SocketAddr>,
    telemetry: Telemetry,
    /// Metering and billing state; `None` when billing is disabled.
    pub billing: Option<crate::billing::BillingStatus>,
    billing_tasks: Option<crate::billing::Billing>,
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

    /// Metric handles (no-ops when telemetry is off), e.g.
    /// `daemon.metrics().billing()` for the billing collector.
    pub fn metrics(&self) -> &crate::telemetry::Metrics {
        self.telemetry.metrics()
    }

    /// Waits for the server to finish (after [`Daemon::shutdown`]); in-flight
    /// calls get the configured grace period. VMs keep running.
    pub async fn wait(self) -> std::io::Result<()> {
        let served = match tokio::time::timeout(self.grace, self.server).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(_) => {
                warn!(grace_secs = self.grace.as_secs(), "in-flight calls did not finish in time");
                Ok(())
            }
        };
        if let Some(b) = self.billing_tasks {
            b.wait().await;
        }
        // Export what the last calls recorded.
        self.telemetry.shutdown(TELEMETRY_FLUSH).await;
        served
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

/// Chooses and builds the backend. `stop` is the daemon's shutdown token:
/// backends stop watching their VMMs (which keep running) when it fires.
async fn build_backend(
    cfg: &Config,
    asset_dirs: &[std::path::PathBuf],
    exits: crate::backend::ExitSink,
    stop: CancellationToken,
) -> Result<(Arc<dyn Backend>, Option<FakeControl>), StartError> {
    let qemu = || async {
        QemuBackend::start(&cfg.qemu, asset_dirs, &cfg.data_dir, exits.clone(), stop.child_token())
            .await
            .map(|b| -> (Arc<dyn Backend>, Option<FakeControl>) { (Arc::new(b), None) })
            .map_err(StartError::Backend)
    };
    match cfg.backend {
        BackendChoice::Fake => {
            warn!("running the FAKE backend: no VM is real (for tests and development only)");
            let b = FakeBackend::new(exits);
            let control = b.control();
            Ok((Arc::new(b), Some(control)))
        }
        BackendChoice::Qemu => qemu().await,
        BackendChoice::Firecracker => firecracker(cfg, exits.clone(), stop.clone()).await,
        BackendChoice::CloudHypervisor => cloud_hypervisor(cfg, exits.clone(), stop.clone()).await,
        BackendChoice::Auto => {
            // Preference order: Firecracker, Cloud Hypervisor, then QEMU.
            let found = |b: &str| crate::backend::process::resolve_binary(b);
            if let Some(p) = found(&cfg.firecracker.binary) {
                info!(binary = %p.display(), "backend auto: chose Firecracker (its binary is installed)");
                return firecracker(cfg, exits.clone(), stop.clone()).await;
            }
            if let Some(p) = found(&cfg.cloud_hypervisor.binary) {
                info!(
                    binary = %p.display(),
                    firecracker = %cfg.firecracker.binary,
                    "backend auto: chose Cloud Hypervisor (Firecracker not found)"
                );
                return cloud_hypervisor(cfg, exits.clone(), stop.clone()).await;
            }
            if let Some(p) = found(&cfg.qemu.binary) {
                info!(
                    binary = %p.display(),
                    firecracker = %cfg.firecracker.binary,
                    cloud_hypervisor = %cfg.cloud_hypervisor.binary,
                    "backend auto: chose QEMU (neither Firecracker nor Cloud Hypervisor found)"
                );
                return qemu().await;
            }
            Err(StartError::Backend(format!(
                "backend auto: no hypervisor found (looked for Firecracker {:?}, Cloud Hypervisor {:?}, QEMU {:?}); \
                 install one, point UNKEY_METALD_FIRECRACKER_BINARY, UNKEY_METALD_CLOUD_HYPERVISOR_BINARY or \
                 UNKEY_METALD_QEMU_BINARY at it, or set UNKEY_METALD_BACKEND",
                cfg.firecracker.binary, cfg.cloud_hypervisor.binary, cfg.qemu.binary
            )))
        }
    }
}

async fn firecracker(
    cfg: &Config,
    exits: crate::backend::ExitSink,
    stop: CancellationToken,
) -> Result<(Arc<dyn Backend>, Option<FakeControl>), StartError> {
    let b = crate::backend::firecracker::FirecrackerBackend::start(&cfg.firecracker, exits, stop.child_token())
        .await
        .map_err(StartError::Backend)?;
    Ok((Arc::new(b), None))
}

async fn cloud_hypervisor(
    cfg: &Config,
    exits: crate::backend::ExitSink,
    stop: CancellationToken,
) -> Result<(Arc<dyn Backend>, Option<FakeControl>), StartError> {
    let b = crate::backend::cloudhypervisor::CloudHypervisorBackend::start(
        &cfg.cloud_hypervisor,
        exits,
        stop.child_token(),
    )
    .await
    .map_err(StartError::Backend)?;
    Ok((Arc::new(b), None))
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns `(before, after)`. The default soft limit (1024) is a few hundred
/// VMs' sockets and logs, or a thousand idle connections, away from
/// `Too many open files`; the hard limit is what the operator allows.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (after, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok((soft, after))
}

/// A new (missing or empty) `metald.db` beside VM directories means the
/// store was lost or replaced while VMs existed: starting would leave their
/// guests running unmanaged and their files behind. Refuse, and say what to
/// do. (A store that exists, even with no rows, is trusted: a VM directory
/// without a record there is a leftover of an interrupted create or delete.)
fn refuse_orphaned_vm_dirs(db: &std::path::Path, vms: &std::path::Path) -> Result<(), StartError> {
    let mut names: Vec<String> = match std::fs::read_dir(vms) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return Ok(()),
    };
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(StartError::StoreLost { db: db.display().to_string(), vms: vms.display().to_string(), names })
}

/// Opens the image cache (removing a crash's leftovers) when image VMs are
/// on.
async fn open_images(
    cfg: &Config,
) -> Result<(crate::core::ImageHandle, Option<Arc<crate::image::Images>>), StartError> {
    if !cfg.guest.enabled {
        return Ok((crate::core::ImageHandle::default(), None));
    }
    let settings = cfg.images.clone();
    let images = tokio::task::spawn_blocking(move || crate::image::Images::open(settings))
        .await
        .map_err(|e| StartError::Images(e.to_string()))?
        .map_err(|e| StartError::Images(crate::util::chain(&e)))?;
    let images = Arc::new(images);
    let source = images::HostImages::new(images.clone(), cfg.guest.clone(), cfg.images.mkfs.clone());
    Ok((crate::core::ImageHandle(Some(Arc::new(source))), Some(images)))
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
    let db = cfg.data_dir.join("metald.db");
    // In WAL mode the records may all still be in `metald.db-wal`.
    let empty = |p: &std::path::Path| std::fs::metadata(p).map_or(true, |m| m.len() == 0);
    let fresh_store = empty(&db) && empty(&cfg.data_dir.join("metald.db-wal"));
    if fresh_store {
        refuse_orphaned_vm_dirs(&db, &cfg.data_dir.join("vms"))?;
    }
    let store = Store::open(&db)?;
    let (exit_tx, exit_rx) = tokio::sync::mpsc::unbounded_channel::<ExitEvent>();
    let shutdown = CancellationToken::new();
    // Before recovery, so that it is traced and counted too.
    let mut telemetry = Telemetry::start(&cfg.telemetry, cfg.address, shutdown.child_token()).await?;
    let (backend, fake) = build_backend(&cfg, &asset_dirs, exit_tx, shutdown.clone()).await?;
    // Before recovery: it derives the kernel's network state from the store.
    let taps = net::TapPolicy::for_backend(backend.kind(), &cfg.firecracker);
    let (net, _kernel_net) = net::KernelNet::start(&cfg.network, backend.kind(), taps).await;
    info!(backend = backend.kind().as_str(), "backend selected");
    let (host_images, images) = open_images(&cfg).await?;
    let manager = Manager::open(
        ManagerConfig {
            data_dir: cfg.data_dir.clone(),
            limits: Limits { max_vcpus: cfg.max_vcpus, max_memory_mb: cfg.max_memory_mb, asset_dirs },
            max_vms: cfg.max_vms,
            snapshot_max_bytes: cfg.snapshot_max_bytes,
            vm_log_max_bytes: cfg.vm_log_max_bytes,
            net,
            images: host_images.clone(),
        },
        backend,
        store,
        exit_rx,
        shutdown.clone(),
    )
    .await?;
    // Before serving, so every boot is metered.
    let billing_tasks = match cfg.billing.enabled {
        true => Some(
            crate::billing::Billing::start(
                cfg.billing.clone(),
                &cfg.data_dir,
                &manager,
                Arc::new(telemetry.metrics().billing().clone()),
                shutdown.child_token(),
            )
            .await?,
        ),
        false => None,
    };
    let billing = billing_tasks.as_ref().map(|b| b.status());
    tokio::spawn(crate::core::logs::rotation_task(manager.clone(), shutdown.child_token()));
    if let Some(images) = &images {
        tokio::spawn(images::gc_task(images.clone(), manager.clone(), cfg.guest.gc_interval, shutdown.child_token()));
    }
    let addr = SocketAddr::new(cfg.address, cfg.port);
    let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    if telemetry.is_enabled() {
        manager.add_observer(telemetry.observer());
        telemetry.watch_store(&manager);
    }
    let app = crate::server::app(manager.clone(), VmApi::new(manager.clone(), auth), &telemetry, billing.clone());
    let http_metrics = telemetry.http_layer();
    let server = tokio::spawn(crate::server::serve(
        listener,
        app,
        http_metrics,
        cfg.http.clone(),
        telemetry.metrics().clone(),
        shutdown.clone(),
    ));
    Ok(Daemon {
        addr,
        manager,
        fake,
        images,
        metrics_addr: telemetry.metrics_addr(),
        telemetry,
        billing,
        billing_tasks,
        shutdown,
        server,
        grace: Duration::from_secs(cfg.shutdown_grace_secs),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit};
        let (before, after) = super::raise_fd_limit().expect("getrlimit/setrlimit");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert!(after >= before);
        assert_eq!((after, soft), (hard, hard));
    }
}
