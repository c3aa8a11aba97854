//! [`ImageError`]: everything that can go wrong pulling an image and turning
//! its layers into a root filesystem, and [`ImageError::code`], the status
//! code each answers with (the table in `docs/IMAGES.md`, "Errors").
//!
//! Messages never contain credentials, and the variants a shared (deduplicated)
//! pull can return never contain a reference: only digests and reasons, so a
//! waiter never sees another customer's reference.

use std::io;
use std::sync::Arc;

use crate::model::Code;

/// Everything that can go wrong pulling an image and turning its layers into
/// a root filesystem.
/// Every variant about a layer entry names the entry (as written in the
/// archive) and the layer's index (0 = the lowest layer).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A layer media type that is not a tar, tar+gzip or tar+zstd layer.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    /// An entry that would leave the root, or could write through a link;
    /// nothing outside the destination was touched.
    #[error("layer {layer}: entry {entry:?} refused: {reason}")]
    Unsafe {
        /// Index of the layer.
        layer: usize,
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// The layers unpack to more bytes or entries than the limit allows.
    #[error("layer {layer}: {}the image unpacks to more than {limit} {what}", entry_prefix(entry))]
    TooLarge {
        /// Index of the layer.
        layer: usize,
        /// The entry being read when the limit was hit (as written in the
        /// archive); empty when it was hit between entries.
        entry: String,
        /// `bytes` or `entries`.
        what: &'static str,
        /// The limit that was hit.
        limit: u64,
    },
    /// The layer is not a readable (compressed) tar stream.
    #[error("layer {layer}: malformed archive")]
    Malformed {
        /// Index of the layer.
        layer: usize,
        /// What the decoder or the tar reader said.
        #[source]
        source: io::Error,
    },
    /// Writing an entry into the staging directory failed.
    #[error("layer {layer}: entry {entry:?}: {op}")]
    Apply {
        /// Index of the layer.
        layer: usize,
        /// The entry's path as written in the archive.
        entry: String,
        /// The operation that failed.
        op: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A file system operation on the staging directory itself.
    #[error("{op} {path}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The path it was done on.
        path: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` could not be started.
    #[error("cannot run {tool} (install e2fsprogs)")]
    ToolMissing {
        /// The program.
        tool: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The reference is not a valid image reference (or local source).
    #[error("invalid image reference: {0}")]
    BadReference(String),
    /// The registry (or local source) has no such repository, tag or digest.
    #[error("image not found: {0}")]
    NotFound(String),
    /// The registry refused the credentials (or their absence): 401/403.
    #[error("access to the image denied by the registry: {0}")]
    Denied(String),
    /// The registry cannot be reached, failed (5xx) or the transfer broke
    /// off after the retries.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// A blob's (or manifest's) bytes do not hash to its descriptor's digest,
    /// or have another size.
    #[error("digest mismatch for {digest}: {reason}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// What was found.
        reason: String,
    },
    /// A manifest, index or config is malformed or of an unsupported kind.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// No image of the host's platform (linux/amd64).
    #[error("no linux/amd64 image: {0}")]
    UnsupportedPlatform(String),
    /// The image's layers (compressed, from the manifest or while
    /// downloading) are larger than the configured limit.
    #[error("image too large: {size} bytes of layers, the limit is {limit}")]
    TooBig {
        /// Bytes found (at least).
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The host credentials file cannot be read or parsed.
    #[error("credentials file {path}: {reason}")]
    CredentialsFile {
        /// The file.
        path: String,
        /// What is wrong (never a secret).
        reason: String,
    },
    /// The CA file (`UNKEY_METALD_IMAGE_CA_FILE`) cannot be read or holds
    /// no valid PEM certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The registry's TLS cannot be used: its certificate is not trusted
    /// (its CA belongs in `UNKEY_METALD_IMAGE_CA_FILE`) or it does not
    /// speak TLS (a plain-HTTP registry belongs in
    /// `UNKEY_METALD_IMAGE_INSECURE_REGISTRIES`). A host configuration
    /// problem: retrying does not help.
    #[error("registry TLS: {0}")]
    Tls(String),
    /// A blocking task of the cache panicked or was cancelled.
    #[error("image task failed: {0}")]
    Task(String),
    /// The error of a deduplicated pull, shared by every caller that waited
    /// for it.
    #[error(transparent)]
    Shared(Arc<ImageError>),
}

/// `entry "x": ` for a named entry, nothing for an empty name.
fn entry_prefix(entry: &str) -> String {
    if entry.is_empty() { String::new() } else { format!("entry {entry:?}: ") }
}

impl ImageError {
    /// The status code this error answers with (`docs/IMAGES.md`, "Errors").
    /// Size limits are `ResourceExhausted` (the request is well-formed; the
    /// host's limit refuses it), bad images `InvalidArgument`, broken
    /// downloads `Unavailable` (retrying may help).
    pub fn code(&self) -> Code {
        match self {
            ImageError::BadReference(_)
            | ImageError::DigestMismatch { .. }
            | ImageError::Unsupported(_)
            | ImageError::UnsupportedMediaType(_)
            | ImageError::UnsupportedPlatform(_)
            | ImageError::Unsafe { .. }
            | ImageError::Malformed { .. } => Code::InvalidArgument,
            ImageError::NotFound(_) => Code::NotFound,
            ImageError::Denied(_) => Code::PermissionDenied,
            ImageError::Unavailable(_) => Code::Unavailable,
            ImageError::TooLarge { .. } | ImageError::TooBig { .. } => Code::ResourceExhausted,
            ImageError::CredentialsFile { .. } | ImageError::CaFile { .. } | ImageError::Tls(_) => {
                Code::FailedPrecondition
            }
            ImageError::Apply { .. }
            | ImageError::Io { .. }
            | ImageError::ToolMissing { .. }
            | ImageError::ToolFailed { .. }
            | ImageError::Task(_) => Code::Internal,
            ImageError::Shared(e) => e.code(),
        }
    }

    /// An I/O error on `path` during `op`.
    pub(crate) fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
        let path = path.display().to_string();
        move |source| ImageError::Io { op, path, source }
    }
}
