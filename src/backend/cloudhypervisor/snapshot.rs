//! Saving a Cloud Hypervisor guest and starting one from the save (the
//! backend's `save` and `restore`), as Cloud Hypervisor's
//! `docs/snapshot_restore.md` and its OpenAPI description (v53) define
//! them.
//!
//! **Save** (the VM is paused): `PUT /api/v1/vm.snapshot` with
//! `destination_url: "file://<save dir>"`; Cloud Hypervisor writes
//! `config.json` (the VM's configuration), `state.json` (device and vCPU
//! state) and `memory-ranges` (guest memory) there. The VM stays paused.
//!
//! **Restore**: `vm.restore` recreates the VM from the saved `config.json`,
//! so its disks, TAPs and serial file are the SAVED VM's. Its
//! `RestoreConfig` can only replace the file descriptors of FD-backed NICs
//! (`net_fds`), not paths or TAP names; the documented way is to edit
//! `config.json` ("it could be modified between the snapshot and restore
//! phases"). A save may be restored more than once (a snapshot's clones),
//! so it is never edited in place: each restore reads a per-VM copy,
//! `<vm dir>/restore-source/` ([`prepare_source`]), whose files are hard
//! links to the save's (copies when linking is impossible) except
//! `config.json`, rewritten for the restoring VM ([`rewrite_config`]):
//! every disk's `path` and every NIC's `tap` by device id, the serial
//! console to Cloud Hypervisor's stdout (`Tty`, as at create; a save made
//! before metald did so names the source VM's `console.log` file, which
//! the clone must not write), the
//! virtio console's pty (dropped: the new process makes its own) and the
//! payload's kernel and initramfs. Everything else is kept as saved.
//! Then a fresh process (started as at create) gets `PUT /api/v1/vm.restore`
//! with `source_url: "file://<vm dir>/restore-source"`; the VM comes back
//! paused. Memory is copied in before the call returns (the default
//! `Copy` restore mode), so the copy is removed right after.
//!
//! The serial console is Cloud Hypervisor's stdout, which metald opens to
//! append to the VM's `console.log`: a resumed VM's log goes on after what
//! the guest wrote before it was saved.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::backend::{BackendError, Result};
use crate::model::ValidSpec;

/// The VM configuration in a save directory.
pub const CONFIG_FILE: &str = "config.json";
/// Device and vCPU state in a save directory.
pub const STATE_FILE: &str = "state.json";
/// Guest memory in a save directory.
pub const MEMORY_FILE: &str = "memory-ranges";
/// The per-VM copy of a save that a restore reads, in the VM directory.
pub const RESTORE_DIR: &str = "restore-source";

/// The `file://` URL of a directory (Cloud Hypervisor takes the rest of the
/// URL as the path, unescaped).
pub fn file_url(dir: &Path) -> Result<String> {
    match dir.to_str() {
        Some(s) if dir.is_absolute() => Ok(format!("file://{s}")),
        _ => Err(BackendError::unsupported(format!(
            "{} is not an absolute UTF-8 path, which a Cloud Hypervisor file:// URL needs; choose another data \
             directory (UNKEY_METALD_DATA_DIR)",
            dir.display()
        ))),
    }
}

/// Checks that Cloud Hypervisor wrote a complete save into `dir`.
pub fn check_saved(dir: &Path) -> Result<()> {
    for f in [CONFIG_FILE, STATE_FILE, MEMORY_FILE] {
        if !dir.join(f).is_file() {
            return Err(BackendError::failed(format!(
                "Cloud Hypervisor reported the snapshot done, but {} does not exist",
                dir.join(f).display()
            )));
        }
    }
    Ok(())
}

/// The parts of a saved `config.json` a restore changes; every other field
/// is kept as it was (`rest`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<SavedPayload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disks: Option<Vec<SavedDevice>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<Vec<SavedNet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<SavedConsole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    console: Option<SavedConsole>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initramfs: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A saved `DiskConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A saved `NetConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedNet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A saved `SerialConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedConsole {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A saved `config.json` (`raw`) made to describe the VM with `spec` whose
/// serial console goes to the process's stdout (see the module doc).
pub fn rewrite_config(raw: &[u8], spec: &ValidSpec) -> Result<Vec<u8>> {
    let mut c: SavedConfig = serde_json::from_slice(raw).map_err(|e| {
        BackendError::failed(format!("the saved {CONFIG_FILE} is not a Cloud Hypervisor VM configuration")).caused_by(e)
    })?;
    for d in c.disks.iter_mut().flatten() {
        let id = d.id.clone().unwrap_or_default();
        let disk = spec.storage.iter().find(|s| s.id == id).ok_or_else(|| {
            BackendError::failed(format!("the saved guest has a disk {id:?} that this VM's configuration lacks"))
        })?;
        d.path = Some(path_str(&disk.path));
    }
    for n in c.net.iter_mut().flatten() {
        let id = n.id.clone().unwrap_or_default();
        let nic = spec.network.iter().find(|s| s.id == id).ok_or_else(|| {
            BackendError::failed(format!(
                "the saved guest has a network interface {id:?} that this VM's configuration lacks"
            ))
        })?;
        n.tap = Some(nic.tap.clone());
    }
    if let Some(s) = c.serial.as_mut().filter(|s| s.mode.as_deref() == Some("File")) {
        s.mode = Some("Tty".to_owned());
        s.file = None;
    }
    // The saved pty was the source process's: the restoring one makes its own.
    if let Some(s) = c.console.as_mut().filter(|s| s.mode.as_deref() == Some("Pty")) {
        s.file = None;
    }
    if let Some(p) = c.payload.as_mut() {
        if p.kernel.is_some() {
            p.kernel = Some(path_str(&spec.boot.kernel));
        }
        if p.initramfs.is_some() {
            p.initramfs = spec.boot.initrd.as_deref().map(path_str);
        }
    }
    serde_json::to_vec(&c).map_err(|e| BackendError::failed("encoding the restored config.json").caused_by(e))
}

/// Makes `<vm dir>/restore-source/` from the save in `save`: links to its
/// files and a `config.json` for this VM. Returns the directory.
pub fn prepare_source(save: &Path, vm_dir: &Path, spec: &ValidSpec) -> Result<PathBuf> {
    let io = |what: String| move |e| BackendError::io(what, e);
    let raw = std::fs::read(save.join(CONFIG_FILE)).map_err(|e| {
        BackendError::failed(format!(
            "the saved Cloud Hypervisor guest in {} is incomplete; it cannot be restored",
            save.display()
        ))
        .caused_by(e)
    })?;
    let config = rewrite_config(&raw, spec)?;
    let dir = vm_dir.join(RESTORE_DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let entries = std::fs::read_dir(save).map_err(io(format!("reading {}", save.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("reading {}", save.display())))?;
        let name = entry.file_name();
        if name == CONFIG_FILE || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let (from, to) = (entry.path(), dir.join(&name));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(io(format!("copying {} to {}", from.display(), to.display())))?;
        }
    }
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, config).map_err(io(format!("writing {}", path.display())))?;
    Ok(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::model::{DiskSpec, NicSpec, VmSpec};
    use serde_json::json;

    fn spec() -> ValidSpec {
        let mut s = VmSpec::default();
        s.boot.kernel = "/assets/vmlinux".into();
        s.storage.push(DiskSpec { id: "root".into(), path: "/vms/clone/disk-root.img".into(), ..Default::default() });
        s.network.push(NicSpec { id: "eth0".into(), tap: "tap-clone".into(), ..Default::default() });
        ValidSpec::unchecked(s)
    }

    /// Abridged from what Cloud Hypervisor v53 writes.
    fn saved() -> Value {
        json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "nested": true},
            "memory": {"size": 134217728, "shared": false},
            "payload": {"kernel": "/old/vmlinux", "cmdline": "console=ttyS0", "initramfs": null},
            "disks": [{"path": "/vms/src/disk.img", "readonly": false, "id": "root", "num_queues": 1,
                       "queue_size": 128, "pci_segment": 0}],
            "net": [{"tap": "tap-src", "mac": "02:00:00:00:00:01", "id": "eth0", "num_queues": 2}],
            "serial": {"file": "/vms/src/console.log", "mode": "File", "iommu": false},
            "console": {"file": "/dev/pts/3", "mode": "Pty", "iommu": false},
            "iommu": false,
            "pvpanic": false
        })
    }

    #[test]
    fn the_restored_config_names_this_vms_devices_and_keeps_the_rest() {
        let raw = serde_json::to_vec(&saved()).unwrap();
        let out = rewrite_config(&raw, &spec()).unwrap();
        let mut got: Value = serde_json::from_slice(&out).unwrap();
        let mut want = saved();
        want["disks"][0]["path"] = json!("/vms/clone/disk-root.img");
        want["net"][0]["tap"] = json!("tap-clone");
        // The serial console goes to the new process's stdout.
        want["serial"]["mode"] = json!("Tty");
        want["serial"].as_object_mut().unwrap().remove("file");
        want["payload"]["kernel"] = json!("/assets/vmlinux");
        // The source's pty is not the clone's: Cloud Hypervisor makes a new one.
        want["console"].as_object_mut().unwrap().remove("file");
        // A null initramfs is the same as none.
        want["payload"].as_object_mut().unwrap().remove("initramfs");
        got["payload"].as_object_mut().unwrap().remove("initramfs");
        assert_eq!(got, want);
    }

    #[test]
    fn a_saved_device_this_vm_lacks_is_refused() {
        let mut raw = saved();
        raw["disks"][0]["id"] = json!("data");
        let e = rewrite_config(&serde_json::to_vec(&raw).unwrap(), &spec()).unwrap_err();
        assert!(e.to_string().contains("disk \"data\""), "{e}");
        assert!(rewrite_config(b"[]", &spec()).is_err());
    }

    #[test]
    fn the_source_links_the_save_and_rewrites_only_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let (save, vm) = (tmp.path().join("save"), tmp.path().join("vm"));
        std::fs::create_dir_all(&save).unwrap();
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(save.join(CONFIG_FILE), serde_json::to_vec(&saved()).unwrap()).unwrap();
        std::fs::write(save.join(STATE_FILE), b"{}").unwrap();
        std::fs::write(save.join(MEMORY_FILE), b"mem").unwrap();
        let dir = prepare_source(&save, &vm, &spec()).unwrap();
        assert_eq!(dir, vm.join(RESTORE_DIR));
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(dir.join(MEMORY_FILE)), ino(save.join(MEMORY_FILE)), "linked, not copied");
        let c: Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(c["disks"][0]["path"], "/vms/clone/disk-root.img");
        let original: Value = serde_json::from_slice(&std::fs::read(save.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(original, saved(), "the save itself is not changed");
        assert_eq!(file_url(&dir).unwrap(), format!("file://{}", dir.display()));
        assert!(file_url(Path::new("rel")).is_err());
        check_saved(&save).unwrap();
        std::fs::remove_file(save.join(STATE_FILE)).unwrap();
        assert!(check_saved(&save).unwrap_err().to_string().contains("state.json"));
    }
}
