//! Telemetry settings (`UNKEY_METALD_OTEL_*`), read through the shared
//! [`Reader`] so that every bad variable is reported together with the rest
//! of the configuration.

use std::time::Duration;

use crate::config::Reader;

/// How log lines are written (`UNKEY_METALD_LOG_FORMAT`: text or json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated telemetry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `UNKEY_METALD_OTEL_ENABLED` (default false). Off: nothing is
    /// exported and no port is opened.
    pub enabled: bool,
    /// `UNKEY_METALD_OTEL_SAMPLING_RATE`, 0.0–1.0 (default 1.0): the share
    /// of root traces kept. Incoming `traceparent` flags decide for
    /// continued traces; error spans are kept at any rate.
    pub sampling_rate: f64,
    /// `UNKEY_METALD_OTEL_ENDPOINT` as a base URL without a trailing slash
    /// (default `http://localhost:4318`); `/v1/traces` and `/v1/metrics`
    /// are appended.
    pub endpoint: String,
    /// `UNKEY_METALD_OTEL_PROMETHEUS_PORT` (default 9464; 0 picks a free port).
    pub prometheus_port: u16,
    /// `UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS`: where `/metrics` listens
    /// (unset: the API's `UNKEY_METALD_ADDRESS`). `/metrics` needs no
    /// credential and carries `vm_id` labels, so an operator can keep it on
    /// a private or loopback address while the API listens publicly.
    pub prometheus_address: Option<std::net::IpAddr>,
    /// `UNKEY_METALD_OTEL_SERVICE_NAME` (default `metald`).
    pub service_name: String,
    /// `UNKEY_METALD_OTEL_METRICS_INTERVAL_MS`: OTLP metrics push period
    /// (default 60000).
    pub metrics_interval: Duration,
    /// `UNKEY_METALD_OTEL_TRACES_DELAY_MS`: longest time a finished span
    /// waits in the batch before export (default 5000).
    pub traces_delay: Duration,
}

pub const DEFAULT_ENDPOINT: &str = "localhost:4318";

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: false,
            sampling_rate: 1.0,
            endpoint: normalize_endpoint(DEFAULT_ENDPOINT).unwrap_or_default(),
            prometheus_port: 9464,
            prometheus_address: None,
            service_name: "metald".into(),
            metrics_interval: Duration::from_secs(60),
            traces_delay: Duration::from_secs(5),
        }
    }
}

impl TelemetryConfig {
    /// Reads the `OTEL_*` variables, recording problems in `r`.
    pub fn read(r: &mut Reader<'_>) -> TelemetryConfig {
        let d = TelemetryConfig::default();
        let enabled = r.bool("OTEL_ENABLED", d.enabled);
        let sampling_rate = match r.raw("OTEL_SAMPLING_RATE") {
            None => d.sampling_rate,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => x,
                _ => {
                    r.error("OTEL_SAMPLING_RATE", format!("{v:?} is not valid: expected a number from 0.0 to 1.0"));
                    d.sampling_rate
                }
            },
        };
        let endpoint = match r.raw("OTEL_ENDPOINT") {
            None => d.endpoint.clone(),
            Some(v) => normalize_endpoint(v).unwrap_or_else(|e| {
                r.error("OTEL_ENDPOINT", format!("{v:?} is not valid: {e}"));
                d.endpoint.clone()
            }),
        };
        let prometheus_port = r.parse("OTEL_PROMETHEUS_PORT", d.prometheus_port, "a port number from 0 to 65535");
        let prometheus_address = r.raw("OTEL_PROMETHEUS_ADDRESS").map(|_| {
            r.parse(
                "OTEL_PROMETHEUS_ADDRESS",
                std::net::IpAddr::from([127, 0, 0, 1]),
                "an IP address such as 127.0.0.1",
            )
        });
        let service_name = r.string("OTEL_SERVICE_NAME", &d.service_name);
        let metrics_interval = Duration::from_millis(r.range("OTEL_METRICS_INTERVAL_MS", 60_000u64, 100, 3_600_000));
        let traces_delay = Duration::from_millis(r.range("OTEL_TRACES_DELAY_MS", 5_000u64, 1, 600_000));
        TelemetryConfig {
            enabled,
            sampling_rate,
            endpoint,
            prometheus_port,
            prometheus_address,
            service_name,
            metrics_interval,
            traces_delay,
        }
    }

    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint)
    }

    pub fn metrics_url(&self) -> String {
        format!("{}/v1/metrics", self.endpoint)
    }
}

/// Accepts `host:port` (plain HTTP is assumed) or an `http://` URL, and
/// returns a base URL without a trailing slash.
pub fn normalize_endpoint(v: &str) -> Result<String, String> {
    const EXPECT: &str = "expected host:port or an http:// URL such as http://otel-collector:4318";
    let url = if v.contains("://") { v.to_owned() } else { format!("http://{v}") };
    let uri: http::Uri = url.parse().map_err(|_| EXPECT.to_owned())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported (this build has no TLS): send to a local OTLP collector over http".into()
            );
        }
        _ => return Err(EXPECT.to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(EXPECT.to_owned());
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<TelemetryConfig, String> {
        let src: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (format!("UNKEY_METALD_{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let c = TelemetryConfig::read(&mut r);
        r.finish().map(|_| c).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = read(&[]).unwrap();
        assert!(!c.enabled);
        assert_eq!(c.sampling_rate, 1.0);
        assert_eq!(c.endpoint, "http://localhost:4318");
        assert_eq!(c.traces_url(), "http://localhost:4318/v1/traces");
        assert_eq!(c.metrics_url(), "http://localhost:4318/v1/metrics");
        assert_eq!(c.prometheus_port, 9464);
        assert_eq!(c.prometheus_address, None, "unset: /metrics listens beside the API");
        assert_eq!(c.service_name, "metald");
    }

    #[test]
    fn the_metrics_listener_may_have_its_own_address() {
        let c = read(&[("OTEL_PROMETHEUS_ADDRESS", "127.0.0.2")]).unwrap();
        assert_eq!(c.prometheus_address, Some(std::net::IpAddr::from([127, 0, 0, 2])));
        let e = read(&[("OTEL_PROMETHEUS_ADDRESS", "localhost")]).unwrap_err();
        assert!(e.contains("UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS") && e.contains("an IP address"), "{e}");
    }

    #[test]
    fn endpoints_as_host_port_or_url() {
        for (given, want) in [
            ("collector:4318", "http://collector:4318"),
            ("http://collector:4318/", "http://collector:4318"),
            ("http://c:4318/prefix", "http://c:4318/prefix"),
        ] {
            assert_eq!(read(&[("OTEL_ENDPOINT", given)]).unwrap().endpoint, want, "{given}");
        }
        for bad in ["ftp://x:1", "http://", "a b:1", "https://otel.example.com"] {
            let e = read(&[("OTEL_ENDPOINT", bad)]).unwrap_err();
            assert!(e.contains("UNKEY_METALD_OTEL_ENDPOINT"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_variable_and_range_all_at_once() {
        let e = read(&[
            ("OTEL_ENABLED", "sometimes"),
            ("OTEL_SAMPLING_RATE", "1.5"),
            ("OTEL_PROMETHEUS_PORT", "70000"),
            ("OTEL_METRICS_INTERVAL_MS", "5"),
        ])
        .unwrap_err();
        for needle in [
            "UNKEY_METALD_OTEL_ENABLED",
            "UNKEY_METALD_OTEL_SAMPLING_RATE: \"1.5\" is not valid: expected a number from 0.0 to 1.0",
            "UNKEY_METALD_OTEL_PROMETHEUS_PORT",
            "0 to 65535",
            "UNKEY_METALD_OTEL_METRICS_INTERVAL_MS",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
        for rate in ["-0.1", "nan", "x"] {
            assert!(read(&[("OTEL_SAMPLING_RATE", rate)]).is_err(), "{rate}");
        }
        assert_eq!(read(&[("OTEL_SAMPLING_RATE", "0")]).unwrap().sampling_rate, 0.0);
    }
}
