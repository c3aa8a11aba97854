//! Small helpers shared across modules.

pub mod files;
pub mod logs;

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// An error and its sources on one line, `outer: inner: innermost`: the one
/// renderer of error chains, used at the edges (API messages, logs, exit
/// messages). A cause whose text the line already ends with is not repeated
/// (some variants embed their source in their own message).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Leaf(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct Wrap {
        msg: &'static str,
        #[source]
        source: Leaf,
    }

    #[test]
    fn chain_joins_causes_and_skips_embedded_ones() {
        assert_eq!(chain(&Wrap { msg: "starting", source: Leaf("disk full") }), "starting: disk full");
        assert_eq!(chain(&Wrap { msg: "starting: disk full", source: Leaf("disk full") }), "starting: disk full");
    }
}
