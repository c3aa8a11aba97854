//! Saving a QEMU guest to a file and starting one from it: QEMU's own
//! migration, to and from a file (QEMU 7.2 has no `file:` URI, so an
//! `exec:` shell command writes and reads it).
//!
//! - Save (guest paused): `migrate-set-parameters` lifts the default
//!   128 MiB/s bandwidth cap and `x-ignore-shared` leaves shared RAM out of
//!   the stream, then `migrate` to
//!   `exec:cat > <dir>/memory.part && mv <dir>/memory.part <dir>/memory`;
//!   `query-migrate` is polled until it completes. QEMU reports
//!   `completed` before its `cat` child has drained the pipe, so the save
//!   is done when the renamed file appears (after `cat` exited). A guest
//!   whose RAM is the shared memfd (every cold-started one) then has its RAM
//!   copied from that memfd (`/proc/<pid>/fd/…`) to `<dir>/guest.ram`,
//!   sparse (untouched and zero pages are holes): the stream holds only the
//!   device state (tens of KiB). QEMU is then in `postmigrate` and `cont`
//!   runs the guest on.
//! - Restore from `guest.ram`: QEMU maps it private, copy-on-write
//!   (`memory-backend-file,share=off`), starts with `-incoming defer`, gets
//!   `x-ignore-shared` and `migrate-incoming exec:cat <dir>/memory`: only
//!   the device state is read; pages fault in from the file (the page
//!   cache, shared by every clone of one snapshot) as the guest touches
//!   them. A save without `guest.ram` (of a restored guest, whose RAM is
//!   that private mapping and so is streamed) is loaded the same way into
//!   private anonymous memory (`memory-backend-ram`). Either way `-S` keeps the
//!   guest paused when the load ends; done when `query-status` leaves
//!   `inmigrate`. A failed load ends QEMU, whose log says why.
//! - A save still under way when a restarted metald reattaches (metald was
//!   killed during it) is cancelled (`migrate_cancel`) before anything
//!   else asks the guest to run on.
//!
//! Migration serialises memory and device state; the device configuration
//! (machine, CPUs, memory size, disks and NICs by id) must match the saving
//! QEMU's, which `Backend::compat` records and the core checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::qmp::{Empty, Qmp, QmpCommand, QueryStatus};
use crate::backend::{BackendError, Result};

/// QEMU's migration stream in a saved-state directory: the device state,
/// and the RAM when there is no [`RAM_FILE`].
pub const MEMORY_FILE: &str = "memory";
/// The guest's RAM as a sparse file, when it was saved out of its memfd.
pub const RAM_FILE: &str = "guest.ram";
/// How a memfd-backed guest's RAM shows in `/proc/<pid>/fd` (QEMU names
/// the memfd after its backend type).
const MEMFD_LINK: &str = "/memfd:memory-backend-memfd";

/// `migrate-set-capabilities` with `x-ignore-shared`.
#[derive(Debug, Clone, Serialize)]
pub struct IgnoreShared {
    capabilities: [Capability; 1],
}

#[derive(Debug, Clone, Serialize)]
struct Capability {
    capability: &'static str,
    state: bool,
}

impl IgnoreShared {
    pub fn on() -> IgnoreShared {
        IgnoreShared { capabilities: [Capability { capability: "x-ignore-shared", state: true }] }
    }
}

impl QmpCommand for IgnoreShared {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

/// `migrate-incoming` (after `-incoming defer`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}

impl QmpCommand for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

/// The guest RAM memfd of QEMU process `pid`, opened through `/proc`.
fn open_memfd(pid: u32) -> Result<std::fs::File> {
    let fds = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&fds).map_err(|e| BackendError::io(format!("reading {fds}"), e))?;
    for e in entries.flatten() {
        let is_ram = std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with(MEMFD_LINK));
        if is_ram {
            return std::fs::File::open(e.path())
                .map_err(|err| BackendError::io(format!("opening {}", e.path().display()), err));
        }
    }
    Err(BackendError::failed(format!("QEMU process {pid} has no guest RAM memfd ({MEMFD_LINK})")))
}

const POLL: Duration = Duration::from_millis(5);

/// `migrate-set-parameters` (only what metald sets).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetParameters {
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

impl QmpCommand for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// `migrate` to a URI.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    pub uri: String,
}

impl QmpCommand for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// `query-migrate`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, `cancelled`, ...; absent
    /// before any migration.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

impl QmpCommand for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Reply = MigrationInfo;
}

/// `migrate_cancel`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateCancel;

impl QmpCommand for MigrateCancel {
    const NAME: &'static str = "migrate_cancel";
    type Reply = Empty;
}

/// How long a cancelled migration may take to end.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a migration in `status` is still under way.
fn under_way(status: Option<&str>) -> bool {
    !matches!(status, None | Some("none" | "completed" | "failed" | "cancelled"))
}

/// How long a save or load of a guest with `memory_bytes` may take.
pub fn timeout_for(memory_bytes: u64) -> Duration {
    crate::backend::save_timeout(memory_bytes)
}

/// `path` quoted for `/bin/sh`, which runs QEMU's `exec:` commands.
/// Paths are metald's own (data directory), but the operator picks that
/// directory; a quote in it would end the quoting, so it is refused.
pub fn shell_quote(path: &Path) -> Result<String> {
    let s = path.to_str().ok_or_else(|| {
        BackendError::unsupported(format!("{} is not UTF-8; QEMU's exec: migration cannot name it", path.display()))
    })?;
    if s.contains('\'') {
        return Err(BackendError::unsupported(format!(
            "{s} contains a single quote, which QEMU's exec: migration cannot pass to the shell; choose a data \
             directory without one (UNKEY_METALD_DATA_DIR)"
        )));
    }
    Ok(format!("'{s}'"))
}

/// The migration URI a save writes `dir/memory` with.
pub fn save_uri(dir: &Path) -> Result<String> {
    let part = shell_quote(&dir.join(format!("{MEMORY_FILE}.part")))?;
    let done = shell_quote(&dir.join(MEMORY_FILE))?;
    Ok(format!("exec:cat > {part} && mv {part} {done}"))
}

/// Starts loading `dir`'s stream into a QEMU started with `-incoming
/// defer` (the capability must match the saving QEMU's before the load).
pub async fn load_device_state(qmp: &Qmp, dir: &Path) -> Result<()> {
    qmp.execute(&IgnoreShared::on()).await.map_err(qmp_failed)?;
    qmp.execute(&MigrateIncoming { uri: load_uri(dir)? }).await.map_err(qmp_failed)?;
    Ok(())
}

/// The `-incoming` URI a restore reads `dir/memory` with.
pub fn load_uri(dir: &Path) -> Result<String> {
    Ok(format!("exec:cat {}", shell_quote(&dir.join(MEMORY_FILE))?))
}

fn qmp_failed(e: super::qmp::QmpError) -> BackendError {
    BackendError::failed_by(e)
}

/// Saves the (paused) guest behind `qmp` into `dir`; see the module doc.
/// `memfd_pid` is the QEMU process when its guest RAM is the shared memfd.
pub async fn save(qmp: &Qmp, dir: &Path, memory_bytes: u64, memfd_pid: Option<u32>) -> Result<PathBuf> {
    let uri = save_uri(dir)?;
    let done = dir.join(MEMORY_FILE);
    // Bytes per second; the default (128 MiB/s) would make a save of a
    // busy guest take seconds for nothing: the file is local.
    qmp.execute(&MigrateSetParameters { max_bandwidth: 1 << 40 }).await.map_err(qmp_failed)?;
    qmp.execute(&IgnoreShared::on()).await.map_err(qmp_failed)?;
    qmp.execute(&Migrate { uri }).await.map_err(qmp_failed)?;
    wait_saved(qmp, &done, memory_bytes).await?;
    if let Some(pid) = memfd_pid {
        let ram = open_memfd(pid)?;
        let to = dir.join(RAM_FILE);
        tokio::task::spawn_blocking(move || crate::util::files::copy_nonzero(&ram, &to, memory_bytes))
            .await
            .map_err(|e| BackendError::failed(format!("RAM copy task: {e}")))?
            .map_err(|e| BackendError::io(format!("copying the guest's RAM to {}", dir.join(RAM_FILE).display()), e))?;
    }
    Ok(done)
}

/// Polls `query-migrate` until the stream to `done` is complete.
async fn wait_saved(qmp: &Qmp, done: &Path, memory_bytes: u64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout_for(memory_bytes);
    loop {
        let info = qmp.execute(&QueryMigrate).await.map_err(qmp_failed)?;
        match info.status.as_deref() {
            Some("completed") if done.exists() => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(BackendError::failed(format!(
                    "QEMU could not save the guest to {}: {}",
                    done.display(),
                    info.error_desc.as_deref().unwrap_or("migration failed")
                )));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BackendError::timeout(format!(
                "saving the guest to {} (migration status {:?})",
                done.display(),
                info.status
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Cancels a save a crash interrupted (a migration still under way when a
/// restarted metald reattaches: no one waits for it, and its files are
/// gone) and waits until it has ended; `true` when there was one. Left
/// alone it would stop the guest when it completes (QEMU ends a migration
/// in `postmigrate`), after the restart ran the guest on, and its `cat`
/// would outlive it. Cancelling closes the pipe, and QEMU ends the command.
pub async fn cancel_interrupted(qmp: &Qmp) -> Result<bool> {
    let info = qmp.execute(&QueryMigrate).await.map_err(qmp_failed)?;
    if !under_way(info.status.as_deref()) {
        return Ok(false);
    }
    qmp.execute(&MigrateCancel).await.map_err(qmp_failed)?;
    let deadline = tokio::time::Instant::now() + CANCEL_TIMEOUT;
    loop {
        let info = qmp.execute(&QueryMigrate).await.map_err(qmp_failed)?;
        if !under_way(info.status.as_deref()) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BackendError::timeout(format!(
                "cancelling an interrupted save (migration status {:?})",
                info.status
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until a QEMU started with `-incoming` has loaded its guest (it is
/// then paused). `alive` says whether the process still runs.
pub async fn wait_loaded(qmp: &Qmp, memory_bytes: u64, alive: impl Fn() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout_for(memory_bytes);
    loop {
        if !alive() {
            return Err(BackendError::failed("QEMU exited while loading the saved guest"));
        }
        match qmp.execute(&QueryStatus).await {
            Ok(s) if s.status != "inmigrate" => return Ok(()),
            Ok(_) => {}
            // A failed load ends QEMU; the caller reports its log.
            Err(e) if !alive() => {
                return Err(BackendError::failed("QEMU exited while loading the saved guest").caused_by(e));
            }
            Err(e) => return Err(qmp_failed(e)),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BackendError::timeout("loading the saved guest"));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uris_quote_paths_and_refuse_quotes() {
        let dir = Path::new("/var/lib/metald/vms/a b");
        assert_eq!(
            save_uri(dir).unwrap(),
            "exec:cat > '/var/lib/metald/vms/a b/memory.part' && mv '/var/lib/metald/vms/a b/memory.part' \
             '/var/lib/metald/vms/a b/memory'"
        );
        assert_eq!(load_uri(dir).unwrap(), "exec:cat '/var/lib/metald/vms/a b/memory'");
        let e = save_uri(Path::new("/data/it's")).unwrap_err().to_string();
        assert!(e.contains("single quote") && e.contains("UNKEY_METALD_DATA_DIR"), "{e}");
    }

    #[test]
    fn timeouts_grow_with_memory() {
        assert_eq!(timeout_for(256 << 20), Duration::from_secs(120));
        assert_eq!(timeout_for(4 << 30), Duration::from_secs(300));
    }

    #[test]
    fn a_migration_is_under_way_until_it_ends() {
        for s in ["setup", "active", "cancelling", "device", "pre-switchover"] {
            assert!(under_way(Some(s)), "{s}");
        }
        for s in [None, Some("none"), Some("completed"), Some("failed"), Some("cancelled")] {
            assert!(!under_way(s), "{s:?}");
        }
    }

    #[test]
    fn migration_info_parses_with_and_without_a_migration() {
        let none: MigrationInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(none.status, None);
        let failed: MigrationInfo =
            serde_json::from_str(r#"{"status":"failed","error-desc":"Unable to write"}"#).unwrap();
        assert_eq!(failed.status.as_deref(), Some("failed"));
        assert_eq!(failed.error_desc.as_deref(), Some("Unable to write"));
    }
}
