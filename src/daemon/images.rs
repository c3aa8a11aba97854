//! Container images in the daemon: [`GuestSettings`] (the kernel image VMs
//! boot, their writable disk's size, the stop grace period, from
//! `UNKEY_METALD_GUEST_*` and `UNKEY_METALD_IMAGE_*`), [`HostImages`], the
//! core's [`ImageSource`] over `image::Images` (pull, cache, bases) and
//! `image::build_writable`, and the garbage collector's task.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Reader;
use crate::core::{ImageSource, Manager};
use crate::error::Error;
use crate::image::{Credentials, ImageError, Images, Mkfs};
use crate::model::{CustomerId, GuestKernel, ImageSpec, InitConfig, PreparedImage};

/// How image VMs are run on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSettings {
    /// `UNKEY_METALD_IMAGES_ENABLED` (default true): image VMs at all.
    pub enabled: bool,
    /// `UNKEY_METALD_GUEST_KERNEL` and `UNKEY_METALD_GUEST_INITRD`: what an
    /// image VM boots unless its request names a kernel. The initramfs must
    /// carry `/metald-init` (`scripts/guest-image.sh` builds both). Unset:
    /// such requests are refused with what to set.
    pub guest: Option<GuestKernel>,
    /// `UNKEY_METALD_IMAGE_WRITABLE_MB` (default 1024): size of each image
    /// VM's writable disk (sparse: it costs what the guest writes).
    pub writable_bytes: u64,
    /// `UNKEY_METALD_IMAGE_STOP_GRACE_SECONDS` (default 10): SIGTERM to
    /// SIGKILL delay metald-init gives the workload on a stop request.
    pub grace_seconds: u64,
    /// `UNKEY_METALD_IMAGE_GC_INTERVAL_SECONDS` (default 600): how often
    /// unused bases older than the GC age are removed.
    pub gc_interval: Duration,
}

impl GuestSettings {
    /// Reads the variables; problems are added to `r`.
    pub fn read(r: &mut Reader<'_>) -> GuestSettings {
        let enabled = r.bool("IMAGES_ENABLED", true);
        let kernel = r.raw("GUEST_KERNEL").map(PathBuf::from);
        let initrd = r.raw("GUEST_INITRD").map(PathBuf::from);
        let mut check = |key: &str, p: &Option<PathBuf>| {
            if let Some(p) = p.as_ref().filter(|p| !p.is_absolute()) {
                r.error(key, format!("{} is not an absolute path", p.display()));
            }
        };
        check("GUEST_KERNEL", &kernel);
        check("GUEST_INITRD", &initrd);
        let guest = match (kernel, initrd) {
            (Some(kernel), Some(initrd)) => Some(GuestKernel { kernel, initrd }),
            (None, None) => None,
            (Some(_), None) => {
                r.error("GUEST_INITRD", "must be set with GUEST_KERNEL (the initramfs carrying /metald-init)");
                None
            }
            (None, Some(_)) => {
                r.error("GUEST_KERNEL", "must be set with GUEST_INITRD");
                None
            }
        };
        let writable_mb = r.range("IMAGE_WRITABLE_MB", 1024u64, 16, 1 << 20);
        let grace_seconds = r.range("IMAGE_STOP_GRACE_SECONDS", 10u64, 0, 3600);
        let gc_interval = Duration::from_secs(r.range("IMAGE_GC_INTERVAL_SECONDS", 600u64, 1, 7 * 86400));
        GuestSettings { enabled, guest, writable_bytes: writable_mb << 20, grace_seconds, gc_interval }
    }
}

/// The core's [`ImageSource`] on a real host.
pub struct HostImages {
    pub images: Arc<Images>,
    settings: GuestSettings,
    mkfs: Mkfs,
}

impl HostImages {
    pub fn new(images: Arc<Images>, settings: GuestSettings, mkfs: Mkfs) -> HostImages {
        HostImages { images, settings, mkfs }
    }
}

/// The image layer's error as the core's, keeping its code.
fn to_core(e: ImageError) -> Error {
    Error::Image { code: e.code(), message: crate::util::chain(&e) }
}

#[async_trait::async_trait]
impl ImageSource for HostImages {
    fn guest(&self) -> Result<GuestKernel, Error> {
        self.settings.guest.clone().ok_or_else(|| {
            Error::FailedPrecondition(
                "this host has no guest kernel for image VMs: set UNKEY_METALD_GUEST_KERNEL and \
                 UNKEY_METALD_GUEST_INITRD (scripts/guest-image.sh builds both), or name a kernel in \
                 config.boot"
                    .into(),
            )
        })
    }

    fn grace_seconds(&self) -> u64 {
        self.settings.grace_seconds
    }

    async fn prepare(&self, customer: &CustomerId, spec: &ImageSpec) -> Result<PreparedImage, Error> {
        let creds = spec.credentials.as_ref().map(|c| Credentials::new(c.username.clone(), c.password.clone()));
        let p = self.images.prepare(&customer.0, &spec.reference, creds).await.map_err(to_core)?;
        Ok(PreparedImage {
            digest: p.digest,
            base: p.base,
            entrypoint: p.config.entrypoint,
            cmd: p.config.cmd,
            env: p.config.env,
            working_dir: p.config.working_dir,
            user: p.config.user,
        })
    }

    async fn writable_disk(&self, path: &Path, config: &InitConfig) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(config).map_err(|e| Error::Internal(format!("encoding config: {e}")))?;
        let (mkfs, size, path) = (self.mkfs.clone(), self.settings.writable_bytes, path.to_owned());
        tokio::task::spawn_blocking(move || crate::image::build_writable(&mkfs, &json, size, &path))
            .await
            .map_err(|e| Error::Internal(format!("writable disk task: {e}")))?
            .map_err(to_core)
    }
}

/// Removes unused bases now and then: those no VM of the manager uses and
/// whose last use is older than the cache's GC age.
pub async fn gc_task(images: Arc<Images>, manager: Manager, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let in_use: HashSet<String> = manager.image_digests();
        let images = images.clone();
        match tokio::task::spawn_blocking(move || images.gc(&in_use, SystemTime::now())).await {
            Ok(r) => {
                if !r.removed.is_empty() || !r.errors.is_empty() {
                    info!(
                        removed = r.removed.len(),
                        kept = r.kept,
                        freed_bytes = r.freed_bytes,
                        "image cache collected"
                    );
                }
                for e in r.errors {
                    warn!(error = %e, "image cache collection");
                }
            }
            Err(e) => warn!(error = %e, "image cache collection task failed"),
        }
    }
}
