//! The core error type and the one table that maps every error metald
//! answers with to an RPC [`Code`].
//!
//! Messages never repeat their cause; the API edge prints the chain once.

use crate::backend::BackendError;
use crate::model::Code;
use crate::model::{Invalid, InvalidTransition};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("VM {0} not found")]
    NotFound(String),
    #[error("VM {0} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    /// Something other than a VM id is taken (an address, a host port):
    /// the message names it.
    #[error("{0}")]
    Taken(String),
    #[error("VM {vm_id}: {source}")]
    WrongState {
        vm_id: String,
        #[source]
        source: InvalidTransition,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("hypervisor backend failed")]
    Backend(#[from] BackendError),
    #[error("{}", store_context(.0))]
    Store(#[source] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The image of an image VM could not be had (pull, unpack, base);
    /// the image layer chose the code (docs/IMAGES.md "Errors").
    #[error("image: {message}")]
    Image { code: Code, message: String },
}

impl From<StoreError> for Error {
    /// A pool with nothing left or a lease someone else holds is the
    /// caller's problem, not the store's.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Exhausted(m) => Error::ResourceExhausted(m),
            StoreError::Taken(m) => Error::Taken(m),
            e => Error::Store(e),
        }
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::InvalidArgument { field: e.field, reason: e.reason }
    }
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// The one mapping from core errors to RPC codes.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) | Error::SnapshotNotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) | Error::Taken(_) => Code::AlreadyExists,
            Error::WrongState { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Backend(e) => backend_code(e),
            // A full disk passes once the operator frees space: retry later.
            Error::Store(e) if e.is_unwritable() => Code::Unavailable,
            Error::Store(_) | Error::Internal(_) => Code::Internal,
            Error::Image { code, .. } => *code,
        }
    }

    /// The full chain, `outer: inner: innermost`, for the wire and logs.
    pub fn chain(&self) -> String {
        crate::util::chain(self)
    }
}

/// What a store failure says before its cause.
fn store_context(e: &StoreError) -> &'static str {
    if e.is_unwritable() {
        "the state store cannot be written (is the disk of UNKEY_METALD_DATA_DIR full or read-only?)"
    } else {
        "state store failed"
    }
}

/// What a backend failure means to the caller.
fn backend_code(e: &BackendError) -> Code {
    match e {
        // The request asks for something this hypervisor cannot do.
        BackendError::Unsupported { .. } => Code::InvalidArgument,
        BackendError::Unavailable { .. } => Code::Unavailable,
        BackendError::Conflict { .. } => Code::FailedPrecondition,
        BackendError::Timeout { .. } => Code::DeadlineExceeded,
        BackendError::Failed { .. } | BackendError::Io { .. } => Code::Internal,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Op, VmId, VmState};

    #[test]
    fn every_variant_maps_to_its_code() {
        let cases: Vec<(Error, Code)> = vec![
            (Error::invalid("f", "r"), Code::InvalidArgument),
            (Error::from(VmId::parse("Bad Id").unwrap_err()), Code::InvalidArgument),
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (Error::from(StoreError::Taken("10.0.0.2 is leased".into())), Code::AlreadyExists),
            (Error::from(StoreError::Exhausted("pool".into())), Code::ResourceExhausted),
            (
                Error::WrongState {
                    vm_id: "x".into(),
                    source: InvalidTransition { state: VmState::Running, op: Op::Boot },
                },
                Code::FailedPrecondition,
            ),
            (Error::FailedPrecondition("x".into()), Code::FailedPrecondition),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::ResourceExhausted("x".into()), Code::ResourceExhausted),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (Error::Image { code: Code::NotFound, message: "x".into() }, Code::NotFound),
            (Error::Internal("x".into()), Code::Internal),
            (Error::Store(StoreError::Corrupt("x".into())), Code::Internal),
            (Error::Backend(BackendError::unavailable("x")), Code::Unavailable),
            (Error::Backend(BackendError::timeout("x")), Code::DeadlineExceeded),
            (Error::Backend(BackendError::failed("x")), Code::Internal),
            (Error::Backend(BackendError::unsupported("x")), Code::InvalidArgument),
            (Error::Backend(BackendError::conflict("x")), Code::FailedPrecondition),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err:?}");
        }
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let e = Error::Backend(BackendError::failed("qmp: connection reset"));
        assert_eq!(e.chain(), "hypervisor backend failed: qmp: connection reset");
        let e = Error::WrongState {
            vm_id: "a".into(),
            source: InvalidTransition { state: VmState::Created, op: Op::Pause },
        };
        assert_eq!(e.chain(), "VM a: cannot pause a VM that is created (boot it first)");
    }
}
