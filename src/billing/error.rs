//! The errors billing's stages return ([`LogError`], [`SpoolError`],
//! [`BillingError`]); `crate::util::chain` renders them with their sources.
//! A leaf: it imports nothing of billing.

/// A failure of the spool's log (its segment files).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {0} is corrupt")]
    Corrupt(i64),
}

/// A failure of the spool: of its log, or a chunk that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("chunk {0} is corrupt")]
    Corrupt(i64),
}

/// Why billing could not start.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing spool {path}")]
    Spool {
        path: String,
        #[source]
        source: SpoolError,
    },
    #[error("billing endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("starting the billing spool thread: {0}")]
    Thread(#[source] std::io::Error),
}
