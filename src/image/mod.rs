//! Container images as VM root filesystems. So far: OCI layers applied
//! safely, in order, onto a staging directory ([`layer`]), through file
//! system operations confined to that directory ([`tree`]), and turned into
//! a read-only ext4 base file ([`rootfs`]). The rules, the
//! safety construction and the limits are described in `docs/IMAGES.md`.
//!
//! Blocking code (file system work, `mkfs.ext4`): async callers run it on
//! `spawn_blocking`.

pub mod error;
pub mod layer;
pub mod rootfs;
pub mod tree;

pub use error::ImageError;
pub use layer::{Compression, LayerStats, Limits, Unpacker};
pub use rootfs::{Mkfs, build_ext4, build_writable};
