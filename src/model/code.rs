//! The status codes metald answers with: a subset of the gRPC/Connect codes.
//! Which error gets which code is decided in one place, `crate::error`.

/// The RPC status codes metald answers with (a subset of gRPC/Connect codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Internal,
}
