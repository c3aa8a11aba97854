//! Identifiers: [`VmId`] (parsed, so an invalid id cannot exist) and the
//! authenticated owner, [`CustomerId`].

use std::fmt;

use serde::{Deserialize, Serialize};

use super::invalid::Invalid;

/// A VM identifier: 1–63 of lowercase ASCII letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        match Self::problem(s) {
            Some(why) => Err(Invalid::new("vm_id", format!("{s:?} {why}"))),
            None => Ok(VmId(s.to_owned())),
        }
    }

    /// Whether `s` is a valid id (what [`VmId::parse`] accepts), without
    /// building one.
    pub fn is_valid(s: &str) -> bool {
        Self::problem(s).is_none()
    }

    /// What is wrong with `s` as an id, if anything.
    fn problem(s: &str) -> Option<&'static str> {
        if s.is_empty() {
            return Some("is empty");
        }
        if s.len() > 63 {
            return Some("is longer than 63 characters");
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Some("may only contain lowercase letters, digits and '-'");
        }
        None
    }

    /// A fresh random id, `vm-` followed by 32 hex digits.
    pub fn generate() -> Self {
        VmId(format!("vm-{:032x}", rand::random::<u128>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VmId {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        VmId::parse(&s)
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

/// The authenticated owner of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CustomerId(pub String);

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
