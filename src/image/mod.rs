//! Container images as VM root filesystems: pulled from registries or
//! imported from local OCI layouts and `docker save` archives, verified,
//! cached and shared per manifest digest ([`Images`], the cache service);
//! OCI layers applied safely, in order, onto a staging directory
//! ([`layer`]), through file system operations confined to that directory
//! ([`tree`]), and turned into a read-only ext4 base file ([`rootfs`]). The
//! rules, the cache layout, the tenancy rule, the limits and the error codes
//! are described in `docs/IMAGES.md`.
//!
//! | file | owns |
//! |---|---|
//! | `cache.rs` | [`Images`]: prepare (dedup, tenancy records), GC, crash clean-up |
//! | `store.rs` | the cache directory's layout, publishing by rename, atomic files |
//! | `build.rs` | one pull in its work directory: fetch, verify, unpack, build, publish |
//! | `registry.rs` | `oci-client` calls: resolve, manifests, resumable blob downloads; error mapping |
//! | `local.rs` | `oci-layout:` and `docker-archive:` sources |
//! | `manifest.rs` | manifests, indexes (platform choice), [`ImageConfig`] |
//! | `reference.rs` | parsing and normalizing references |
//! | `auth.rs` | [`Credentials`], the Docker `config.json` credentials file |
//! | `digest.rs` | sha256 digests and their verification |
//! | `settings.rs` | [`ImageSettings`] from `UNKEY_METALD_IMAGE_*` |
//! | `layer.rs`, `tree.rs`, `rootfs.rs` | layers onto a staging tree; the ext4 base |
//! | `error.rs` | [`ImageError`] and its status codes |
//!
//! Blocking code (file system work, `mkfs.ext4`): async callers run it on
//! `spawn_blocking`; [`Images::prepare`] does so itself.

pub mod auth;
mod build;
pub mod cache;
pub mod digest;
pub mod error;
pub mod layer;
pub mod local;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod settings;
mod store;
pub mod tree;

pub use auth::{Credentials, CredentialsFile};
pub use cache::{GcReport, Images, Prepared};
pub use error::ImageError;
pub use layer::{Compression, LayerStats, Limits, Unpacker};
pub use manifest::ImageConfig;
pub use reference::Source;
pub use rootfs::{Mkfs, build_ext4, build_writable};
pub use settings::ImageSettings;
