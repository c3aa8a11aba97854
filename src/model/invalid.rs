//! [`Invalid`]: the error of parsing and validation, naming the field and
//! what to change. `crate::error` maps it to `InvalidArgument`.

/// A value refused by parsing or validation: which field, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid { field: field.into(), reason: reason.into() }
    }
}
