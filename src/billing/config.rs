//! Billing settings from `UNKEY_METALD_BILLING_*` and `UNKEY_METALD_INSTANCE_ID`.

use std::time::Duration;

use crate::config::Reader;

/// Validated billing configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingConfig {
    pub enabled: bool,
    /// Log batches instead of sending them (still removed from the spool).
    pub mock_mode: bool,
    /// Base URL of the billing service, e.g. `http://localhost:8081`.
    pub endpoint: String,
    /// Sampling period of every running VM.
    pub interval: Duration,
    /// Samples per batch.
    pub batch_size: usize,
    /// Longest a sample waits before its batch is sent.
    pub flush: Duration,
    pub heartbeat: Duration,
    /// Spool group-commit period (a crash loses at most this much resolution).
    pub commit_interval: Duration,
    /// Spool size above which the oldest unsent samples are thinned.
    pub spool_max_bytes: u64,
    /// First and longest retry delay of a failed send.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Per-call timeout of billing RPCs.
    pub rpc_timeout: Duration,
    pub instance_id: String,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            enabled: true,
            mock_mode: false,
            endpoint: "http://localhost:8081".into(),
            interval: Duration::from_millis(100),
            batch_size: 600,
            flush: Duration::from_millis(60_000),
            heartbeat: Duration::from_millis(30_000),
            commit_interval: Duration::from_millis(1000),
            spool_max_bytes: 1024 << 20,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_millis(30_000),
            rpc_timeout: Duration::from_secs(10),
            instance_id: default_instance_id(),
        }
    }
}

fn default_instance_id() -> String {
    crate::procfs::hostname().unwrap_or_else(|| "metald".into())
}

fn ms(r: &mut Reader<'_>, name: &str, default: Duration, min: u64, max: u64) -> Duration {
    let d = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(r.range(name, d, min, max))
}

impl BillingConfig {
    /// Reads the billing variables; problems are added to `r`.
    pub fn read(r: &mut Reader<'_>) -> BillingConfig {
        let d = BillingConfig::default();
        let enabled = r.bool("BILLING_ENABLED", d.enabled);
        let mock_mode = r.bool("BILLING_MOCK_MODE", d.mock_mode);
        let endpoint = r.string("BILLING_ENDPOINT", &d.endpoint);
        if enabled && !mock_mode {
            match endpoint.parse::<http::Uri>() {
                // TLS needs connectrpc's rustls feature, not built yet.
                Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {}
                _ => r.error(
                    "BILLING_ENDPOINT",
                    format!("{endpoint:?} is not an http:// URL such as http://localhost:8081"),
                ),
            }
        }
        let interval = ms(r, "BILLING_INTERVAL_MS", d.interval, 10, 3_600_000);
        let batch_size = r.range("BILLING_BATCH_SIZE", d.batch_size, 1, 100_000);
        let flush = ms(r, "BILLING_FLUSH_MS", d.flush, 10, 86_400_000);
        let heartbeat = ms(r, "BILLING_HEARTBEAT_MS", d.heartbeat, 10, 86_400_000);
        let commit_interval = ms(r, "BILLING_COMMIT_MS", d.commit_interval, 1, 1000);
        let spool_max_mb = r.range("BILLING_SPOOL_MAX_MB", d.spool_max_bytes >> 20, 1, 1 << 20);
        let retry_min = ms(r, "BILLING_RETRY_MIN_MS", d.retry_min, 1, 3_600_000);
        let retry_max = ms(r, "BILLING_RETRY_MAX_MS", d.retry_max, 1, 3_600_000);
        if retry_max < retry_min {
            r.error("BILLING_RETRY_MAX_MS", "is below UNKEY_METALD_BILLING_RETRY_MIN_MS");
        }
        let instance_id = r.string("INSTANCE_ID", &d.instance_id);
        BillingConfig {
            enabled,
            mock_mode,
            endpoint,
            interval,
            batch_size,
            flush,
            heartbeat,
            commit_interval,
            spool_max_bytes: spool_max_mb << 20,
            retry_min,
            retry_max,
            rpc_timeout: d.rpc_timeout,
            instance_id,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> (BillingConfig, Vec<String>) {
        let src: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (format!("UNKEY_METALD_{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let c = BillingConfig::read(&mut r);
        let errs = r.finish().err().map(|e| e.0).unwrap_or_default();
        (c, errs)
    }

    #[test]
    fn defaults() {
        let (c, e) = read(&[]);
        assert!(e.is_empty(), "{e:?}");
        assert!(c.enabled && !c.mock_mode);
        assert_eq!(c.endpoint, "http://localhost:8081");
        assert_eq!((c.interval, c.batch_size), (Duration::from_millis(100), 600));
        assert_eq!((c.flush, c.heartbeat), (Duration::from_secs(60), Duration::from_secs(30)));
        assert!(!c.instance_id.is_empty());
    }

    #[test]
    fn all_bad_values_at_once() {
        let (_, e) = read(&[
            ("BILLING_ENABLED", "perhaps"),
            ("BILLING_ENDPOINT", "localhost"),
            ("BILLING_INTERVAL_MS", "0"),
            ("BILLING_BATCH_SIZE", "x"),
            ("BILLING_SPOOL_MAX_MB", "0"),
        ]);
        assert_eq!(e.len(), 5, "{e:?}");
    }
}
