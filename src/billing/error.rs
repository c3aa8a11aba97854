//! The errors billing's stages return ([`SpoolError`], [`BillingError`])
//! and [`chain`], which prints an error with its sources. Imports only
//! [`super::log`] (whose [`LogError`] a spool error wraps).

use super::log::LogError;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("chunk {0} is corrupt")]
    Corrupt(i64),
}

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

/// An error and its sources on one line, printed once at the edge.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
