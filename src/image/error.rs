//! [`ImageError`]: everything that can go wrong turning image layers into a
//! root filesystem.

use std::io;

/// Everything that can go wrong turning image layers into a root filesystem.
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
    #[error("layer {layer}: the image unpacks to more than {limit} {what}")]
    TooLarge {
        /// Index of the layer.
        layer: usize,
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
}
