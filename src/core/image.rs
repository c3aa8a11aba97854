//! The core's view of container images: [`ImageSource`], what the core asks
//! of the host's image cache for an image VM (the daemon plugs in
//! `image::Images`; tests a [`StaticImages`]), [`ImageHandle`], how the
//! manager holds it, and reading a stopped image VM's workload exit from
//! its console log (across a rotation of the log).
//!
//! Order on create (docs/IMAGES.md "Create"): the image is prepared (pulled,
//! unpacked, its base built) before the create's intent is written — the
//! cache is content-addressed and cleans its own leftovers, so a crash
//! during a pull leaves nothing for reconciliation — then the VM's writable
//! disk is made inside the VM's directory, which the core owns (removed with
//! it on delete, roll-back and start-up reconciliation).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::model::{CustomerId, GuestKernel, ImageSpec, InitConfig, PreparedImage, WorkloadExit};

/// File name of an image VM's writable disk in its directory.
pub const WRITABLE_DISK: &str = "writable.ext4";
/// How much of the console log's end is read for the workload's exit.
const CONSOLE_TAIL: u64 = 64 * 1024;

/// The host's images, as the core needs them.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// The kernel and initramfs image VMs boot unless they name their own;
    /// an error says what to configure.
    fn guest(&self) -> Result<GuestKernel, Error>;
    /// Seconds metald-init gives the workload between SIGTERM and SIGKILL.
    fn grace_seconds(&self) -> u64;
    /// The image `spec` names, for `customer` (whose access the registry
    /// confirms: a cached private image is never handed to a customer who
    /// could not pull it), pulled and its base built when not cached.
    async fn prepare(&self, customer: &CustomerId, spec: &ImageSpec) -> Result<PreparedImage, Error>;
    /// Makes `path`: the VM's writable disk, holding `config`.
    async fn writable_disk(&self, path: &Path, config: &InitConfig) -> Result<(), Error>;
}

/// The manager's images: off (`None`: image VMs are refused) or an
/// [`ImageSource`].
#[derive(Clone, Default)]
pub struct ImageHandle(pub Option<Arc<dyn ImageSource>>);

impl std::fmt::Debug for ImageHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ImageHandle(on)" } else { "ImageHandle(off)" })
    }
}

/// The workload's exit of the image VM whose directory is `dir`, from the
/// end of its console log (metald-init's `METALD_WORKLOAD_EXIT` line);
/// `None` while it runs or when it never ran. The log is the record: it
/// survives restarts of metald and is removed with the VM.
pub fn workload_exit(dir: &Path) -> Option<WorkloadExit> {
    // Across a rotation: the end of `console.log.1` when the current file
    // holds less than the tail (the log may have been rotated right after
    // the exit line).
    let tail = crate::util::logs::tail(&dir.join("console.log"), CONSOLE_TAIL).ok()?;
    WorkloadExit::from_console(&tail)
}

/// An [`ImageSource`] that hands out one prepared image for any reference
/// and writes the config as a plain file (unit and API tests; the real
/// cache is tested on its own and end to end).
pub struct StaticImages {
    pub guest: GuestKernel,
    pub image: PreparedImage,
    /// Every `(customer, reference)` asked for, in order.
    pub asked: Mutex<Vec<(String, String)>>,
    /// The next `prepare` fails with this.
    pub fail_next: Mutex<Option<Error>>,
    /// Held by a test: `writable_disk` waits for it (a create stopped
    /// between its prepared image and its VM row).
    pub writable_gate: tokio::sync::Mutex<()>,
    /// The next `writable_disk` fails with this.
    pub fail_writable: Mutex<Option<Error>>,
}

impl StaticImages {
    pub fn new(guest: GuestKernel, image: PreparedImage) -> StaticImages {
        StaticImages {
            guest,
            image,
            asked: Mutex::default(),
            fail_next: Mutex::default(),
            writable_gate: tokio::sync::Mutex::default(),
            fail_writable: Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl ImageSource for StaticImages {
    fn guest(&self) -> Result<GuestKernel, Error> {
        Ok(self.guest.clone())
    }

    fn grace_seconds(&self) -> u64 {
        10
    }

    async fn prepare(&self, customer: &CustomerId, spec: &ImageSpec) -> Result<PreparedImage, Error> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).push((customer.to_string(), spec.reference.clone()));
        if let Some(e) = self.fail_next.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        Ok(self.image.clone())
    }

    async fn writable_disk(&self, path: &Path, config: &InitConfig) -> Result<(), Error> {
        drop(self.writable_gate.lock().await);
        if let Some(e) = self.fail_writable.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        let json = serde_json::to_vec(config).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_exit_is_read_from_the_end_of_a_long_console_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(workload_exit(dir.path()), None, "no log");
        let mut log = b"METALD_WORKLOAD_START\n".to_vec();
        log.extend(std::iter::repeat_n(b'x', 200_000));
        log.extend(b"\nMETALD_WORKLOAD_EXIT code=7\nMETALD_GUEST_POWEROFF\n");
        std::fs::write(dir.path().join("console.log"), &log).unwrap();
        assert_eq!(workload_exit(dir.path()), Some(WorkloadExit::Code(7)));
        // Rotated right after the exit line: it is at the end of `.1`.
        let rotated = crate::util::logs::LogFile::appended(dir.path().join("console.log"));
        assert!(crate::util::logs::rotate(&rotated, 64 << 10).unwrap());
        assert_eq!(std::fs::metadata(dir.path().join("console.log")).unwrap().len(), 0);
        assert_eq!(workload_exit(dir.path()), Some(WorkloadExit::Code(7)));
    }
}
