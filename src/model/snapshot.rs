//! Saved guests: what a suspended VM's saved state and a named snapshot
//! record ([`SavedMeta`], the `meta.json` beside the hypervisor's files),
//! the compatibility check a restore makes ([`compat_mismatch`]), and a
//! named snapshot as the store keeps it ([`SnapshotRecord`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::id::{CustomerId, VmId};
use super::spec::ValidSpec;

/// The file in a saved-state directory that describes it; written last,
/// so a directory with it holds a complete save.
pub const META_FILE: &str = "meta.json";

/// What a saved guest needs to be restored: written by the core after the
/// hypervisor saved its state, read before a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMeta {
    /// What the save depends on, as the backend described it
    /// (`Backend::compat`): hypervisor, version, machine, CPU, kernel.
    pub compat: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: i64,
    /// When the saved guest booted (unix seconds): a resumed guest's uptime
    /// goes on from there.
    #[serde(default)]
    pub booted_at: Option<i64>,
    /// Guest disks copied into the directory (named snapshots only): the
    /// disk's id and its file name there.
    #[serde(default)]
    pub disks: Vec<SavedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub id: String,
    pub file: String,
}

/// Why a save cannot be restored on this host: every recorded fact that
/// differs from what the backend would record now, by name. `None` when
/// they all match.
pub fn compat_mismatch(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Option<String> {
    let mut diffs = Vec::new();
    for (k, want) in saved {
        match now.get(k) {
            Some(have) if have == want => {}
            Some(have) => diffs.push(format!("{k}: saved with {want:?}, this host has {have:?}")),
            None => diffs.push(format!("{k}: saved with {want:?}, this host has none")),
        }
    }
    for (k, have) in now {
        if !saved.contains_key(k) {
            diffs.push(format!("{k}: not recorded in the save, this host has {have:?}"));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// A named snapshot of a customer's VM.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// Its directory under `<data dir>/snapshots/` (unique on the host).
    pub id: String,
    pub customer: CustomerId,
    /// Unique among the customer's snapshots (same rules as a VM id).
    pub name: VmId,
    /// The customer's id of the VM it was taken from.
    pub source: VmId,
    /// The source VM's spec: a clone runs with it (and its own leases).
    pub spec: ValidSpec,
    /// The hypervisor that saved it (`BackendKind::as_str`).
    pub backend: String,
    pub size_bytes: u64,
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_mismatch_names_every_fact_that_differs() {
        let saved = m(&[("hypervisor", "qemu"), ("qemu_version", "7.2.0"), ("machine", "microvm")]);
        assert_eq!(compat_mismatch(&saved, &saved), None);
        let now = m(&[("hypervisor", "qemu"), ("qemu_version", "8.0.0"), ("cpu", "host")]);
        let why = compat_mismatch(&saved, &now).unwrap_or_default();
        assert!(why.contains(r#"qemu_version: saved with "7.2.0", this host has "8.0.0""#), "{why}");
        assert!(why.contains(r#"machine: saved with "microvm", this host has none"#), "{why}");
        assert!(why.contains(r#"cpu: not recorded in the save, this host has "host""#), "{why}");
        assert!(!why.contains("hypervisor"), "{why}");
    }

    #[test]
    fn meta_round_trips_through_json() {
        let meta = SavedMeta {
            compat: m(&[("hypervisor", "fake")]),
            created_at: 5,
            booted_at: Some(4),
            disks: vec![SavedDisk { id: "root".into(), file: "disk-root.img".into() }],
        };
        let json = serde_json::to_string(&meta).unwrap_or_default();
        assert_eq!(serde_json::from_str::<SavedMeta>(&json).ok(), Some(meta));
    }
}
