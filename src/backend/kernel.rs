//! Guest kernel image formats, recognised by their magic bytes.
//!
//! Backends differ in what they can boot: QEMU microvm and Cloud Hypervisor
//! take both an uncompressed ELF `vmlinux` and a compressed `bzImage`,
//! Firecracker only ELF. [`detect`] reads just the headers so `check()` can
//! refuse an unbootable kernel before any process is started.

use std::fmt;
use std::io::Read;
use std::path::Path;

/// What a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable (`vmlinux`); 64-bit or not is not checked here.
    Elf,
    /// A Linux x86 boot image (`bzImage`), recognised by `HdrS` at 0x202.
    BzImage,
}

impl fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF vmlinux",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

/// Classifies the first bytes of a kernel image; `None` when neither magic
/// matches.
pub fn classify(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(ELF_MAGIC) {
        return Some(KernelFormat::Elf);
    }
    let end = BZIMAGE_MAGIC_OFFSET + BZIMAGE_MAGIC.len();
    if head.len() >= end && &head[BZIMAGE_MAGIC_OFFSET..end] == BZIMAGE_MAGIC {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Reads the header of `path` and classifies it.
pub fn detect(path: &Path) -> std::io::Result<Option<KernelFormat>> {
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)?.take(1024).read_to_end(&mut head)?;
    Ok(classify(&head))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_formats_and_nothing_else() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        assert_eq!(classify(&elf), Some(KernelFormat::Elf));

        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(classify(&bz), Some(KernelFormat::BzImage));

        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"#!/bin/sh\necho not a kernel\n"), None);
        // Magic cut off by a short file.
        assert_eq!(classify(&bz[..0x204]), None);
    }

    #[test]
    fn detect_reads_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"\x7fELF....").unwrap();
        assert_eq!(detect(&p).unwrap(), Some(KernelFormat::Elf));
        assert!(detect(&dir.path().join("missing")).is_err());
    }
}
