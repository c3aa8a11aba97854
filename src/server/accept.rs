//! The accept loop of the API port: admits a connection when the server is
//! under its connection caps (in all and per peer address), else answers
//! `503 Service Unavailable` naming the limit and closes it, so a refused
//! client learns why instead of waiting in the listen backlog. Accept errors
//! that are about the process, not the peer (`EMFILE`: out of file
//! descriptors), back off briefly and are logged at most every
//! [`LOG_EVERY`], instead of spinning and flooding the log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body as AxumBody;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::conn::{self, Shared, TimedBody};
use super::settings::{ConnSettings, MAX_CONNECTIONS_PER_IP_VAR, MAX_CONNECTIONS_VAR};
use crate::config::PREFIX;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::ConnRefusal;

/// Longest pause after an accept error; pauses double from [`BACKOFF_MIN`].
const BACKOFF_MAX: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// A warning about refused connections or accept errors repeats at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Refused sockets being closed politely (503 sent, the peer's request
/// drained so the close is no reset) at once; beyond, they are just closed.
const REFUSALS_IN_FLIGHT: usize = 256;
/// How long a refused socket is drained before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts and serves until `stop`, then stops accepting (the listener is
/// closed) and waits for the open connections to finish their requests.
pub(super) async fn run<S>(
    listener: TcpListener,
    app: S,
    settings: ConnSettings,
    metrics: Metrics,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    S: tower::Service<Request<TimedBody>, Response = Response<AxumBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (max, per_ip) = fd_capped(&settings);
    let caps = Arc::new(Caps::new(max, per_ip));
    let shared = Arc::new(Shared { app, builder: conn::builder(), settings, metrics });
    let tracker = TaskTracker::new();
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut backoff = BACKOFF_MIN;
    let mut errors = Throttled::default();
    let mut refused = Throttled::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = BACKOFF_MIN;
                a
            }
            Err(e) if peer_error(&e) => continue,
            Err(e) => {
                errors.warn(|n| warn!(error = %e, errors = n, pause_ms = backoff.as_millis(), "accepting API connections fails; pausing"));
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        match caps.admit(peer.ip(), &shared.metrics) {
            Ok(slot) => {
                let _ = stream.set_nodelay(true);
                let (shared, stop) = (shared.clone(), stop.clone());
                tracker.spawn(async move {
                    conn::serve(stream, shared, stop).await;
                    drop(slot);
                });
            }
            Err(limit) => {
                shared.metrics.connection_refused(limit);
                refused.warn(|n| warn!(peer = %peer.ip(), limit = caps.var(limit), refused = n, "refusing API connections at a connection limit"));
                refuse(stream, &caps.message(limit, peer.ip()), &refusals);
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// An accept error that concerns only the connection being accepted (the
/// peer gave up): take the next one at once.
fn peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock)
}

/// The caps served: `max_connections`, lowered to half the open-files
/// limit when that is smaller (a connection is a descriptor, and the VMs,
/// their logs and the store need the others; a warning says what to
/// raise), and the per-address cap lowered in the same proportion (else one
/// address could take every slot left).
fn fd_capped(s: &ConnSettings) -> (usize, usize) {
    use nix::sys::resource::{Resource, getrlimit};
    let per_ip = s.max_connections_per_ip.min(s.max_connections);
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else { return (s.max_connections, per_ip) };
    let half = usize::try_from(soft / 2).unwrap_or(usize::MAX).max(1);
    if half >= s.max_connections {
        return (s.max_connections, per_ip);
    }
    let scaled = scale(per_ip, half, s.max_connections);
    warn!(
        configured = s.max_connections,
        serving = half,
        per_ip = scaled,
        open_files_limit = soft,
        "{PREFIX}{MAX_CONNECTIONS_VAR} is more than half the open-files limit: serving at most {half} \
         connections, {scaled} per address (raise the limit, e.g. systemd LimitNOFILE=, to serve more)"
    );
    (half, scaled)
}

/// `n * to / from`, at least 1.
fn scale(n: usize, to: usize, from: usize) -> usize {
    let v = u128::try_from(n).unwrap_or(u128::MAX) * u128::try_from(to).unwrap_or(u128::MAX)
        / u128::try_from(from.max(1)).unwrap_or(u128::MAX);
    usize::try_from(v).unwrap_or(usize::MAX).max(1)
}

/// The connection caps and the connections open, in all and per peer.
struct Caps {
    max: usize,
    per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

impl Caps {
    fn new(max: usize, per_ip: usize) -> Caps {
        Caps { max, per_ip: per_ip.min(max), open: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, or the limit it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr, metrics: &Metrics) -> Result<Slot, ConnRefusal> {
        let key = peer_key(ip);
        let mut open = self.lock();
        if open.by_peer.get(&key).copied().unwrap_or(0) >= self.per_ip {
            return Err(ConnRefusal::ConnectionsPerIp);
        }
        if open.total >= self.max {
            return Err(ConnRefusal::Connections);
        }
        open.total += 1;
        *open.by_peer.entry(key).or_insert(0) += 1;
        metrics.connections_open(1);
        Ok(Slot { caps: self.clone(), key, metrics: metrics.clone() })
    }

    fn var(&self, limit: ConnRefusal) -> &'static str {
        match limit {
            ConnRefusal::Connections => MAX_CONNECTIONS_VAR,
            ConnRefusal::ConnectionsPerIp => MAX_CONNECTIONS_PER_IP_VAR,
        }
    }

    /// The refusal's text: which limit, its value and its setting.
    fn message(&self, limit: ConnRefusal, ip: IpAddr) -> String {
        let var = self.var(limit);
        match limit {
            ConnRefusal::Connections => {
                format!("metald is serving its maximum of {} connections ({PREFIX}{var}); try again later\n", self.max)
            }
            ConnRefusal::ConnectionsPerIp => format!(
                "metald is serving its maximum of {} connections from {} ({PREFIX}{var}); \
                 close idle connections or try again later\n",
                self.per_ip,
                peer_key(ip)
            ),
        }
    }
}

/// The address a per-peer cap counts by: IPv4 (also when mapped into
/// IPv6), or an IPv6 address's /64 (one host's usual allotment).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An admitted connection's place under the caps, given back on drop.
struct Slot {
    caps: Arc<Caps>,
    key: IpAddr,
    metrics: Metrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_peer.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.by_peer.remove(&self.key);
            }
        }
        self.metrics.connections_open(-1);
    }
}

/// Answers `503` with `body` and closes: the response is written at once
/// (a new socket's send buffer has room), then, while fewer than
/// [`REFUSALS_IN_FLIGHT`] refusals are closing, the peer's request is
/// drained for up to [`REFUSAL_LINGER`] so that closing does not reset the
/// connection before the peer has read the answer.
fn refuse(stream: TcpStream, body: &str, permits: &Arc<Semaphore>) {
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(resp.as_bytes());
    let Ok(permit) = permits.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 4096];
        let drain = async {
            let mut left = 64 * 1024usize;
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
    });
}

/// A warning logged at most every [`LOG_EVERY`], with how many times its
/// event happened since the last one.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            log(self.count);
            self.last = Some(Instant::now());
            self.count = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caps(max: usize, per_ip: usize) -> Arc<Caps> {
        Arc::new(Caps::new(max, per_ip))
    }

    #[test]
    fn a_lowered_total_lowers_the_per_address_cap_alike() {
        assert_eq!(scale(512, 512, 4096), 64);
        assert_eq!(scale(1, 10, 4096), 1);
        assert_eq!(scale(100, 100, 100), 100);
    }

    #[test]
    fn caps_count_per_peer_and_in_all_and_free_on_drop() {
        let c = caps(3, 2);
        let m = Metrics::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.admit(a, &m).unwrap();
        let _a2 = c.admit(a, &m).unwrap();
        assert_eq!(c.admit(a, &m).err(), Some(ConnRefusal::ConnectionsPerIp));
        let _b1 = c.admit(b, &m).unwrap();
        assert_eq!(c.admit(b, &m).err(), Some(ConnRefusal::Connections));
        drop(a1);
        let _b2 = c.admit(b, &m).unwrap();
        assert_eq!(c.lock().total, 3);
    }

    #[test]
    fn ipv6_peers_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let k = |s: &str| peer_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::2"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
    }

    #[test]
    fn refusals_name_the_limit_and_its_setting() {
        let c = caps(10, 5);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let m = c.message(ConnRefusal::Connections, ip);
        assert!(m.contains("maximum of 10 connections") && m.contains("UNKEY_METALD_HTTP_MAX_CONNECTIONS)"), "{m}");
        let m = c.message(ConnRefusal::ConnectionsPerIp, ip);
        assert!(m.contains("5 connections from 192.0.2.7") && m.contains("UNKEY_METALD_HTTP_MAX_CONNECTIONS_PER_IP"));
    }

    #[test]
    fn repeated_warnings_are_throttled_and_counted() {
        let mut t = Throttled::default();
        let mut logged = Vec::new();
        for _ in 0..5 {
            t.warn(|n| logged.push(n));
        }
        assert_eq!(logged, vec![1]);
        assert_eq!(t.count, 4);
    }

    #[test]
    fn only_peer_errors_skip_the_pause() {
        assert!(peer_error(&std::io::Error::from(std::io::ErrorKind::ConnectionAborted)));
        assert!(!peer_error(&std::io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!peer_error(&std::io::Error::from_raw_os_error(libc::ENFILE)));
    }
}
