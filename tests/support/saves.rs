//! Saved guests in the hypervisor tests (`tests/firecracker/saves.rs`,
//! `tests/cloudhypervisor/saves.rs`): the suspend, snapshot and clone calls
//! as customer A, where a snapshot's files are, and what the real-binary
//! tests need: the real hypervisors of `../shared/hypervisors/` (when that
//! directory exists) and a guest kernel that does nothing but halt.

use std::path::{Path, PathBuf};

use metald::pb::vmprovisioner::v1 as pb;

use super::daemon::{TOKEN_A, TestDaemon};
use super::repo::repo_root;

/// The real-binary tests' VM: the halting kernel (written to
/// `<assets>/halt.elf`), 64 MiB, and a 1 MiB writable disk `root`
/// (`<assets>/real.ext4`).
pub fn halting_vm_config(t: &TestDaemon) -> pb::VmConfig {
    halting_kernel(&t.assets().join("halt.elf"));
    std::fs::write(t.assets().join("real.ext4"), vec![0u8; 1 << 20]).unwrap();
    let mut config = t.config(&t.assets().join("halt.elf").display().to_string());
    config.memory = pb::MemoryConfig { size_bytes: 64 << 20, ..Default::default() }.into();
    config.storage = vec![pb::StorageDevice {
        id: "root".into(),
        path: t.assets().join("real.ext4").display().to_string(),
        ..Default::default()
    }];
    config
}

/// `SuspendVm` of `id` as customer A.
pub async fn suspend_vm(t: &TestDaemon, id: &str) -> Result<pb::SuspendVmResponse, connectrpc::ConnectError> {
    let c = t.client(TOKEN_A);
    c.suspend_vm(pb::SuspendVmRequest { vm_id: id.into(), ..Default::default() }).await.map(|r| r.into_owned())
}

/// `ResumeVm` of `id` as customer A (a suspended VM is restored).
pub async fn resume_vm(t: &TestDaemon, id: &str) -> Result<pb::ResumeVmResponse, connectrpc::ConnectError> {
    let c = t.client(TOKEN_A);
    c.resume_vm(pb::ResumeVmRequest { vm_id: id.into(), ..Default::default() }).await.map(|r| r.into_owned())
}

/// `SnapshotVm` of `id` named `name` as customer A.
pub async fn snapshot_vm(t: &TestDaemon, id: &str, name: &str) -> Result<pb::Snapshot, connectrpc::ConnectError> {
    let c = t.client(TOKEN_A);
    let r = c.snapshot_vm(pb::SnapshotVmRequest { vm_id: id.into(), name: name.into(), ..Default::default() }).await?;
    Ok(r.into_owned().snapshot.as_option().cloned().expect("a snapshot in the answer"))
}

/// `CreateVm` of `id` from customer A's snapshot `name`.
pub async fn clone_vm(t: &TestDaemon, id: &str, name: &str) -> Result<pb::CreateVmResponse, connectrpc::ConnectError> {
    let c = t.client(TOKEN_A);
    let req = pb::CreateVmRequest { vm_id: id.into(), from_snapshot: name.into(), ..Default::default() };
    c.create_vm(req).await.map(|r| r.into_owned())
}

/// `DeleteSnapshot` of customer A's snapshot `name`.
pub async fn delete_snapshot(t: &TestDaemon, name: &str) {
    let c = t.client(TOKEN_A);
    c.delete_snapshot(pb::DeleteSnapshotRequest { name: name.into(), ..Default::default() }).await.unwrap();
}

/// The directories of the ready snapshots (`<data dir>/snapshots/<id>`).
pub fn snapshot_dirs(t: &TestDaemon) -> Vec<PathBuf> {
    let root = t.data_dir().join("snapshots");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// Sorted names of the files in `dir`.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The guest's boot ids the fake VMMs print on its console:
/// `METALD_GUEST_BOOT boot=<id>` or `METALD_GUEST_RESUMED boot=<id>`.
pub fn boot_ids(console: &Path, marker: &str) -> Vec<String> {
    super::guest::console_text(console)
        .lines()
        .filter_map(|l| l.trim().strip_prefix(marker)?.strip_prefix(" boot="))
        .map(str::to_owned)
        .collect()
}

/// The real hypervisor binary `name` from `../shared/hypervisors/` (next
/// to the checkout), or `None` (said on stderr) when it is not there.
pub fn real_hypervisor(name: &str) -> Option<PathBuf> {
    let p = repo_root().join("../shared/hypervisors").join(name);
    match std::fs::canonicalize(&p) {
        Ok(p) if p.is_file() => Some(p),
        _ => {
            // Straight to stderr: the test harness captures eprintln! of a passing test.
            let note = format!("note: {} does not exist; skipping the real-{name} test\n", p.display());
            let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
            None
        }
    }
}

/// Writes a guest kernel for the real hypervisors that only halts: an ELF
/// with one segment at 16 MiB holding `hlt; jmp .-1` (valid in 32- and
/// 64-bit mode), entered at that code directly or through its Xen PVH
/// note (Cloud Hypervisor boots an ELF only through PVH). Guests of a real
/// kernel die on these machines' nested KVM; this one sleeps on `hlt`,
/// so the VMM stays up as long as a test needs.
pub fn halting_kernel(path: &Path) {
    const BASE: u64 = 0x100_0000;
    const PHDRS: u16 = 2;
    let note_off = 64 + 56 * u64::from(PHDRS);
    let note_len = 20u64;
    let code_off = note_off + note_len;
    let code = [0xf4u8, 0xeb, 0xfd];
    let size = code_off + code.len() as u64;
    let entry = BASE + code_off;
    let mut b: Vec<u8> = Vec::new();
    // ELF header: 64-bit, little endian, version 1, executable, x86-64.
    b.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&entry.to_le_bytes());
    b.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, PHDRS, 64, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD of the whole file (RWX), then PT_NOTE of the PVH note.
    let phdr = |b: &mut Vec<u8>, kind: u32, flags: u32, off: u64, len: u64, align: u64| {
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        for v in [off, BASE + off, BASE + off, len, len, align] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut b, 1, 7, 0, size, 0x1000);
    phdr(&mut b, 4, 4, note_off, note_len, 4);
    // Note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), 32-bit entry.
    for v in [4u32, 4, 18] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(b"Xen\0");
    b.extend_from_slice(&u32::try_from(entry).unwrap().to_le_bytes());
    b.extend_from_slice(&code);
    assert_eq!(b.len() as u64, size);
    std::fs::write(path, b).unwrap();
}
