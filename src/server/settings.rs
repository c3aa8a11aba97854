//! The API server's connection settings: how long a client may take to
//! send a request head and a request body, how long an idle connection is
//! kept, and how many connections it may hold in all and from one address
//! (`UNKEY_METALD_HTTP_*`, read with the configuration [`Reader`]).

use std::time::Duration;

use crate::config::{PREFIX, Reader};

/// Limits on the API port's connections; see README's configuration table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// Longest a connection may take to send a request head: from accept
    /// to its first request, and from the first byte of each later one.
    pub header_timeout: Duration,
    /// Longest a request body may take to arrive, from its head.
    pub body_timeout: Duration,
    /// Longest a connection is kept with no request in flight (HTTP/1
    /// keep-alive and HTTP/2 alike).
    pub idle_timeout: Duration,
    /// Most connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most connections served at once from one IP address (IPv6: one
    /// /64), so that one peer cannot take every slot.
    pub max_connections_per_ip: usize,
}

/// `UNKEY_METALD_` + these names.
pub const HEADER_TIMEOUT_VAR: &str = "HTTP_HEADER_TIMEOUT_SECONDS";
pub const BODY_TIMEOUT_VAR: &str = "HTTP_BODY_TIMEOUT_SECONDS";
pub const IDLE_TIMEOUT_VAR: &str = "HTTP_IDLE_TIMEOUT_SECONDS";
pub const MAX_CONNECTIONS_VAR: &str = "HTTP_MAX_CONNECTIONS";
pub const MAX_CONNECTIONS_PER_IP_VAR: &str = "HTTP_MAX_CONNECTIONS_PER_IP";

impl Default for ConnSettings {
    /// A legitimate client sends a request head in one packet and a VM
    /// config (a few KiB) right behind it, so 10 s and 30 s are generous
    /// on any link yet bound what a slow sender holds; 60 s of idle
    /// keep-alive outlasts a client's pause between calls. 4,096
    /// connections is far above what the owner's clients need (a pool of
    /// tens) and, at a few tens of KiB each, bounded memory; 512 per
    /// address leaves room for a large client pool while an attacker needs
    /// 8 addresses to fill every slot.
    fn default() -> Self {
        ConnSettings {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_ip: 512,
        }
    }
}

impl ConnSettings {
    pub fn read(r: &mut Reader) -> ConnSettings {
        let d = ConnSettings::default();
        let secs = |r: &mut Reader, name: &str, default: Duration, max: u64| {
            Duration::from_secs(r.range(name, default.as_secs(), 1, max))
        };
        let header_timeout = secs(r, HEADER_TIMEOUT_VAR, d.header_timeout, 600);
        let body_timeout = secs(r, BODY_TIMEOUT_VAR, d.body_timeout, 3600);
        let idle_timeout = secs(r, IDLE_TIMEOUT_VAR, d.idle_timeout, 86_400);
        let max_connections = r.range(MAX_CONNECTIONS_VAR, d.max_connections, 1, 1_000_000);
        let per_ip_set = r.raw(MAX_CONNECTIONS_PER_IP_VAR).is_some();
        let mut max_connections_per_ip = r.range(MAX_CONNECTIONS_PER_IP_VAR, d.max_connections_per_ip, 1, 1_000_000);
        if max_connections_per_ip > max_connections {
            if per_ip_set {
                r.error(
                    MAX_CONNECTIONS_PER_IP_VAR,
                    format!(
                        "{max_connections_per_ip} is above {PREFIX}{MAX_CONNECTIONS_VAR} ({max_connections}): \
                         it would never apply"
                    ),
                );
            }
            // Only the total was lowered: one address may use all of it.
            max_connections_per_ip = max_connections;
        }
        ConnSettings { header_timeout, body_timeout, idle_timeout, max_connections, max_connections_per_ip }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<ConnSettings, crate::config::ConfigError> {
        let src: HashMap<String, String> = pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let s = ConnSettings::read(&mut r);
        r.finish().map(|()| s)
    }

    #[test]
    fn defaults() {
        let s = read(&[]).unwrap();
        assert_eq!(s, ConnSettings::default());
        assert_eq!(s.header_timeout, Duration::from_secs(10));
        assert_eq!(s.body_timeout, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_secs(60));
        assert_eq!((s.max_connections, s.max_connections_per_ip), (4096, 512));
    }

    #[test]
    fn every_value_is_read() {
        let s = read(&[
            ("HTTP_HEADER_TIMEOUT_SECONDS", "1"),
            ("HTTP_BODY_TIMEOUT_SECONDS", "2"),
            ("HTTP_IDLE_TIMEOUT_SECONDS", "3"),
            ("HTTP_MAX_CONNECTIONS", "100"),
            ("HTTP_MAX_CONNECTIONS_PER_IP", "10"),
        ])
        .unwrap();
        assert_eq!(
            s,
            ConnSettings {
                header_timeout: Duration::from_secs(1),
                body_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(3),
                max_connections: 100,
                max_connections_per_ip: 10,
            }
        );
    }

    #[test]
    fn bad_values_are_all_reported() {
        let e = read(&[
            ("HTTP_HEADER_TIMEOUT_SECONDS", "0"),
            ("HTTP_BODY_TIMEOUT_SECONDS", "soon"),
            ("HTTP_IDLE_TIMEOUT_SECONDS", "-1"),
            ("HTTP_MAX_CONNECTIONS", "0"),
            ("HTTP_MAX_CONNECTIONS_PER_IP", "2000000"),
        ])
        .unwrap_err();
        let text = e.to_string();
        for name in
            [HEADER_TIMEOUT_VAR, BODY_TIMEOUT_VAR, IDLE_TIMEOUT_VAR, MAX_CONNECTIONS_VAR, MAX_CONNECTIONS_PER_IP_VAR]
        {
            assert!(text.contains(&format!("{PREFIX}{name}:")), "{name} missing in {text}");
        }
        assert_eq!(e.0.len(), 5, "{text}");
    }

    #[test]
    fn a_per_ip_cap_above_the_total_is_refused() {
        let e = read(&[("HTTP_MAX_CONNECTIONS", "100"), ("HTTP_MAX_CONNECTIONS_PER_IP", "200")]).unwrap_err();
        assert!(e.to_string().contains("would never apply"), "{e}");
    }

    #[test]
    fn a_total_below_the_default_per_ip_cap_lowers_it() {
        let s = read(&[("HTTP_MAX_CONNECTIONS", "100")]).unwrap();
        assert_eq!((s.max_connections, s.max_connections_per_ip), (100, 100));
    }
}
