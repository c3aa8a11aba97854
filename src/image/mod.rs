//! Container images as VM root filesystems. So far: OCI layers applied
//! safely, in order, onto a staging directory ([`layer`]), through file
//! system operations confined to that directory ([`tree`]). The rules, the
//! safety construction and the limits are described in `docs/IMAGES.md`.
//!
//! Blocking code (file system work): async callers run it on
//! `spawn_blocking`.

pub mod error;
pub mod layer;
pub mod tree;

pub use error::ImageError;
pub use layer::{Compression, LayerStats, Limits, Unpacker};
