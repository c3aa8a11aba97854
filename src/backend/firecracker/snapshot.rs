//! Saving a Firecracker guest and starting one from the save (the
//! backend's `save` and `restore`), as Firecracker's
//! `docs/snapshotting/snapshot-support.md` and its OpenAPI description
//! (v1.16) define them.
//!
//! A save directory holds:
//! - `vmstate`: the microVM state (`snapshot_path`);
//! - `memory`: the guest memory (`mem_file_path`) of a `Full` snapshot;
//! - `firecracker-save.json` ([`SaveRecord`]): the Firecracker version and
//!   each NIC's TAP and drive's file as the saving process had them, read
//!   back by `GET /vm/config` just before the save.
//!
//! **Save** (the guest is paused): `GET /vm/config`, `GET /`, then
//! `PUT /snapshot/create {"snapshot_type": "Full", ...}`. Without the
//! jailer Firecracker writes both files straight into the save directory.
//! A jailed Firecracker can write only inside its jail (whose root the
//! jailer gave to the jail user), so it writes `/save-vmstate` and
//! `/save-memory` there and metald then moves them into the save directory
//! (a rename, or a copy when the jail is on another file system than the
//! data directory — keep them on one to avoid copying guest memory).
//!
//! **Restore**: a fresh process, started exactly as at create (jailer,
//! cgroups, drive links: see [`super::vmm`]), loads the save instead of
//! being configured ([`super::vmm::Load`]): `PUT /snapshot/load` with
//! `resume_vm: false` and the memory as a `File` backend, then
//! `GET /vm/config` (a `PATCH /drives/{id}` only for a drive whose file is
//! not this VM's) and `GET /`; the guest stays paused until the core
//! resumes it. Drives are reopened at the paths the snapshot recorded,
//! which are the same relative names in every VM's directory or jail, so a
//! clone opens its own disk copies. A NIC whose TAP differs from the saved
//! one is moved with `network_overrides` (Firecracker v1.12+). With the
//! jailer, the state and memory files are hard-linked into the new jail
//! (copied when linking is impossible) and unlinked from it once loaded.
//!
//! Firecracker maps the memory file `MAP_PRIVATE` for the restored guest's
//! whole life. The core deletes a resumed VM's save right away; the
//! mapping keeps the file's data (and its disk space) until the process
//! ends, and nothing ever writes to a save's files again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::api::{
    ConfiguredDrive, ConfiguredNic, FullVmConfiguration, InstanceInfo, NetworkOverride, SnapshotCreateParams,
    SnapshotType,
};
use super::vmm::{Layout, Load, checked};
use crate::backend::process::{ProcessId, remove_quiet};
use crate::backend::uds_http::UdsClient;
use crate::backend::{BackendError, Result, save_timeout};
use crate::model::ValidSpec;

/// The microVM state in a save directory.
pub const STATE_FILE: &str = "vmstate";
/// The guest memory in a save directory.
pub const MEMORY_FILE: &str = "memory";
/// metald's record of a save ([`SaveRecord`]).
pub const RECORD_FILE: &str = "firecracker-save.json";
/// Where a jailed Firecracker writes a save, inside its jail.
pub const JAILED_SAVE_STATE: &str = "save-vmstate";
pub const JAILED_SAVE_MEMORY: &str = "save-memory";

/// What a restore needs to know about the process that saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveRecord {
    pub firecracker_version: String,
    pub nics: Vec<ConfiguredNic>,
    pub drives: Vec<ConfiguredDrive>,
}

/// Saves the paused guest of the Firecracker behind `client` into `dir`
/// (see the module doc).
pub async fn save(
    client: &UdsClient,
    layout: &Layout,
    pid: Option<ProcessId>,
    dir: &Path,
    memory_bytes: u64,
) -> Result<()> {
    let config: FullVmConfiguration = checked(client.get("/vm/config").await, pid, layout).await?;
    let info: InstanceInfo = checked(client.get("/").await, pid, layout).await?;
    let (state, memory) = (dir.join(STATE_FILE), dir.join(MEMORY_FILE));
    let params = SnapshotCreateParams {
        mem_file_path: layout.api_path(&memory, JAILED_SAVE_MEMORY),
        snapshot_path: layout.api_path(&state, JAILED_SAVE_STATE),
        snapshot_type: SnapshotType::Full,
    };
    let jailed = layout.jail.as_ref().map(|j| (j.host_path(JAILED_SAVE_STATE), j.host_path(JAILED_SAVE_MEMORY)));
    if let Some((s, m)) = &jailed {
        remove_quiet(s);
        remove_quiet(m);
    }
    let created = client.with_timeout(save_timeout(memory_bytes)).put("/snapshot/create", &params).await;
    let created = checked(created, pid, layout).await;
    let moved = match (&jailed, created) {
        (_, Err(e)) => Err(e),
        (Some((s, m)), Ok(())) => move_out(s, &state).and_then(|()| move_out(m, &memory)),
        (None, Ok(())) => Ok(()),
    };
    if let Some((s, m)) = &jailed {
        remove_quiet(s);
        remove_quiet(m);
    }
    moved?;
    for f in [&state, &memory] {
        if !f.is_file() {
            return Err(BackendError::failed(format!(
                "Firecracker reported the snapshot created, but {} does not exist",
                f.display()
            )));
        }
    }
    let record =
        SaveRecord { firecracker_version: info.vmm_version, nics: config.network_interfaces, drives: config.drives };
    let path = dir.join(RECORD_FILE);
    let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    std::fs::write(&path, json).map_err(|e| BackendError::io(format!("writing {}", path.display()), e))
}

/// Moves a file a jailed Firecracker wrote out of its jail.
fn move_out(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    // Most likely another file system (EXDEV): copy, then drop the original.
    std::fs::copy(from, to)
        .map_err(|e| BackendError::io(format!("moving {} out of the jail to {}", from.display(), to.display()), e))?;
    remove_quiet(from);
    Ok(())
}

/// What a restore of the save in `dir` loads for a VM with `spec`: the
/// saved files, and a network override for each NIC whose TAP is not the
/// saved one.
pub fn load_of(dir: &Path, spec: &ValidSpec) -> Result<Load> {
    let damaged = |what: String| {
        BackendError::failed(format!(
            "the saved Firecracker guest in {} is incomplete ({what}); it cannot be restored",
            dir.display()
        ))
    };
    let record_path = dir.join(RECORD_FILE);
    let raw = std::fs::read(&record_path).map_err(|e| damaged(format!("{}: {e}", record_path.display())))?;
    let record: SaveRecord =
        serde_json::from_slice(&raw).map_err(|e| damaged(format!("{}: {e}", record_path.display())))?;
    let (state, memory): (PathBuf, PathBuf) = (dir.join(STATE_FILE), dir.join(MEMORY_FILE));
    for f in [&state, &memory] {
        if !f.is_file() {
            return Err(damaged(format!("{} is missing", f.display())));
        }
    }
    Ok(Load {
        state,
        memory,
        network_overrides: network_overrides(&record.nics, spec),
        timeout: save_timeout(spec.memory_bytes()),
    })
}

/// An override for each of `spec`'s NICs whose TAP is not the saved one.
pub fn network_overrides(saved: &[ConfiguredNic], spec: &ValidSpec) -> Vec<NetworkOverride> {
    spec.network
        .iter()
        .filter(|n| saved.iter().any(|s| s.iface_id == n.id && s.host_dev_name != n.tap))
        .map(|n| NetworkOverride { iface_id: n.id.clone(), host_dev_name: n.tap.clone() })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{NicSpec, VmSpec};

    fn nic(id: &str, tap: &str) -> ConfiguredNic {
        ConfiguredNic { iface_id: id.into(), host_dev_name: tap.into() }
    }

    #[test]
    fn only_nics_on_another_tap_are_overridden() {
        let mut spec = VmSpec::default();
        for (id, tap) in [("eth0", "tap-a"), ("eth1", "tap-new")] {
            spec.network.push(NicSpec { id: id.into(), tap: tap.into(), ..Default::default() });
        }
        let spec = ValidSpec::unchecked(spec);
        let saved = [nic("eth0", "tap-a"), nic("eth1", "tap-old")];
        assert_eq!(
            network_overrides(&saved, &spec),
            vec![NetworkOverride { iface_id: "eth1".into(), host_dev_name: "tap-new".into() }]
        );
        assert!(network_overrides(&saved[..1], &spec).is_empty(), "a NIC the save lacks is not overridden");
    }

    #[test]
    fn an_incomplete_save_is_refused_naming_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ValidSpec::unchecked(VmSpec::default());
        let e = load_of(dir.path(), &spec).unwrap_err().to_string();
        assert!(e.contains(RECORD_FILE) && e.contains("cannot be restored"), "{e}");
        let record = SaveRecord { firecracker_version: "1.16.1".into(), nics: Vec::new(), drives: Vec::new() };
        std::fs::write(dir.path().join(RECORD_FILE), serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"s").unwrap();
        let e = load_of(dir.path(), &spec).unwrap_err().to_string();
        assert!(e.contains("memory is missing"), "{e}");
        std::fs::write(dir.path().join(MEMORY_FILE), b"m").unwrap();
        let load = load_of(dir.path(), &spec).unwrap();
        assert_eq!((load.state, load.memory), (dir.path().join(STATE_FILE), dir.path().join(MEMORY_FILE)));
        assert!(load.network_overrides.is_empty());
    }

    #[test]
    fn a_jailed_save_is_moved_out_of_the_jail() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("save-memory"), dir.path().join("memory"));
        std::fs::write(&from, b"guest").unwrap();
        move_out(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"guest");
        assert!(!from.exists());
        assert!(move_out(&from, &to).is_err(), "a missing file is an error");
    }
}
