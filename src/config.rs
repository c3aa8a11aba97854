//! Reading `UNKEY_METALD_*` variables: the [`Reader`] every subsystem parses
//! its own settings with, collecting every problem instead of stopping at
//! the first, and the [`ConfigError`] that lists them.
//!
//! A leaf: each subsystem owns its settings type (`telemetry::TelemetryConfig`,
//! `billing::BillingConfig`, the backends' settings); `daemon::Config`
//! assembles them.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

pub const PREFIX: &str = "UNKEY_METALD_";

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads variables, collecting errors instead of stopping at the first.
pub struct Reader<'a> {
    src: &'a HashMap<String, String>,
    errors: Vec<String>,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a HashMap<String, String>) -> Self {
        Reader { src, errors: Vec::new() }
    }

    pub fn raw(&self, name: &str) -> Option<&'a str> {
        self.src.get(&format!("{PREFIX}{name}")).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    pub fn error(&mut self, name: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{PREFIX}{name}: {msg}"));
    }

    /// A problem that concerns no single variable.
    pub fn problem(&mut self, msg: impl Into<String>) {
        self.errors.push(msg.into());
    }

    /// Parses `name`, or returns `default` when unset.
    pub fn parse<T: FromStr>(&mut self, name: &str, default: T, expect: &str) -> T {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.error(name, format!("{v:?} is not valid: expected {expect}"));
                    default
                }
            },
        }
    }

    /// Parses an integer within `[min, max]`.
    pub fn range<T>(&mut self, name: &str, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let expect = format!("an integer from {min} to {max}");
        let v = self.parse(name, default, &expect);
        if v < min || v > max {
            self.error(name, format!("{v} is out of range: expected {expect}"));
            return default;
        }
        v
    }

    pub fn bool(&mut self, name: &str, default: bool) -> bool {
        match self.raw(name).map(|s| s.to_ascii_lowercase()) {
            None => default,
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    self.error(name, format!("{v:?} is not valid: expected true or false"));
                    default
                }
            },
        }
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() { Ok(()) } else { Err(ConfigError(self.errors)) }
    }
}
