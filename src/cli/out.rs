//! What `metaldctl` prints and how it fails: tables, JSON, relative
//! times, and [`CliError`] with its exit code.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use connectrpc::ConnectError;

/// A failed command: what to print and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub exit_code: u8,
}

impl From<ConnectError> for CliError {
    fn from(e: ConnectError) -> Self {
        CliError { message: format!("{}: {}", e.code.as_str(), e.message.as_deref().unwrap_or("")), exit_code: 1 }
    }
}

pub fn usage(msg: impl Into<String>) -> CliError {
    CliError { message: msg.into(), exit_code: 2 }
}

/// Shortens a long value for a table cell (`--json` prints it whole).
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

pub fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

pub fn ts(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let secs = crate::util::unix_now() - unix;
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}
