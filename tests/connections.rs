//! Connection abuse against the real daemon on 127.0.0.1:0 (fake backend):
//! thousands of idle and slow-header connections leave the owner served;
//! slow connections are closed at the header timeout, idle ones at the idle
//! timeout, slow bodies are answered 408; connections over the caps are
//! answered 503 naming the limit. The attackers connect from other loopback
//! addresses (Linux accepts any 127/8 source) so the per-IP cap applies to
//! them and not to the owner on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use metald::pb::vmprovisioner::v1 as pb;
use support::{TOKEN_A, http_get_raw, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A generous bound on waiting for something that should take about a
/// timeout (1 s here): never a pass/fail figure on speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// A connection to `addr` from `source` (any port).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads one HTTP/1.1 response (head and a `content-length` body): the
/// status line and the body. `None` when the connection ends first.
async fn read_response(s: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .map_or(0, |v| v.parse().unwrap());
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            return Some((head.lines().next().unwrap_or_default().to_owned(), body));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const HEALTH: &[u8] = b"GET /_/health HTTP/1.1\r\nHost: x\r\n\r\n";

/// A keep-alive connection from `source` that has been served one request
/// and is now idle.
async fn idle_keep_alive(source: &str, addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(source, addr).await;
    s.write_all(HEALTH).await.unwrap();
    let (status, _) = read_response(&mut s).await.expect("a response");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    s
}

/// `n` idle keep-alive connections from `source`, opened 100 at a time.
async fn idle_keep_alives(source: &'static str, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    futures::stream::iter(0..n).map(|_| idle_keep_alive(source, addr)).buffer_unordered(100).collect().await
}

/// Waits until the server ends `s` (EOF or reset), failing if it sends
/// anything first or takes longer than [`PATIENCE`].
async fn closed_by_server(mut s: impl tokio::io::AsyncRead + Unpin) {
    let mut b = [0u8; 64];
    match tokio::time::timeout(PATIENCE, s.read(&mut b)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("expected the connection closed, got {:?}", String::from_utf8_lossy(&b[..n])),
        Err(_) => panic!("the connection is still open after {PATIENCE:?}"),
    }
}

/// The refusal a connection from `source` gets: the 503's status and body.
async fn refusal(source: &str, addr: SocketAddr) -> (String, String) {
    let mut s = connect_from(source, addr).await;
    tokio::time::timeout(PATIENCE, read_response(&mut s)).await.unwrap().expect("a refusal")
}

/// The value of the Prometheus series `series` (full name with labels).
fn sample(scrape: &str, metric: &str, label: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(metric) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .map_or_else(|| panic!("no {metric}{{{label}}} in the scrape"), |v| v.parse().unwrap())
}

async fn owner_is_served(t: &support::TestDaemon, id: &str) {
    // A new client: a new connection, admitted while the attackers hold theirs.
    let c = t.client(TOKEN_A);
    let r = c
        .create_vm(pb::CreateVmRequest { vm_id: id.into(), config: t.config(&t.kernel()).into(), ..Default::default() })
        .await
        .expect("the owner's CreateVm is served");
    assert_eq!(r.into_owned().vm_id, id);
    let info = c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    assert_eq!(info.into_owned().vm_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_and_slow_header_connections_leave_the_owner_served() {
    // Both ends of ~2,300 connections live in this process.
    metald::daemon::raise_fd_limit().unwrap();
    let t = start(&[
        ("HTTP_HEADER_TIMEOUT_SECONDS", "1"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "120"),
        ("HTTP_MAX_CONNECTIONS", "3000"),
        ("HTTP_MAX_CONNECTIONS_PER_IP", "1000"),
        ("OTEL_ENABLED", "true"),
        ("OTEL_ENDPOINT", "http://127.0.0.1:9"),
        ("OTEL_PROMETHEUS_PORT", "0"),
        ("OTEL_METRICS_INTERVAL_MS", "600000"),
    ])
    .await;
    let addr = t.d().addr;

    // 1,500 idle keep-alive connections (1,000 from 127.0.0.2: its cap),
    // held for the whole test (idle timeout 120 s).
    let mut held = idle_keep_alives("127.0.0.2", addr, 1000).await;
    held.extend(idle_keep_alives("127.0.0.3", addr, 500).await);

    // 500 slow-header connections, trickling a header line every 200 ms,
    // and 300 silent ones.
    let mut slow_readers = Vec::new();
    for _ in 0..500 {
        let s = connect_from("127.0.0.4", addr).await;
        let (r, mut w) = s.into_split();
        slow_readers.push(r);
        tokio::spawn(async move {
            if w.write_all(b"GET /_/health HTTP/1.1\r\nHost: x\r\n").await.is_err() {
                return;
            }
            for _ in 0..500 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if w.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    return;
                }
            }
        });
    }
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(connect_from("127.0.0.5", addr).await);
    }

    // The owner is served while all of that is held.
    owner_is_served(&t, "owner-1").await;

    // 127.0.0.2 is at its cap: more connections from it are refused with
    // a 503 naming the limit; the owner still connects.
    for _ in 0..20 {
        let (status, body) = refusal("127.0.0.2", addr).await;
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
        assert!(body.contains("UNKEY_METALD_HTTP_MAX_CONNECTIONS_PER_IP"), "{body}");
        assert!(body.contains("1000 connections from 127.0.0.2"), "{body}");
    }
    owner_is_served(&t, "owner-2").await;

    // Slow-header and silent connections are closed at the header timeout.
    futures::future::join_all(slow_readers.into_iter().map(closed_by_server)).await;
    futures::future::join_all(silent.into_iter().map(closed_by_server)).await;

    // Idle keep-alive connections outlive the header timeout: still served.
    for s in held.iter_mut().step_by(100) {
        s.write_all(HEALTH).await.unwrap();
        let (status, _) = read_response(s).await.expect("a kept-alive connection still open");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    owner_is_served(&t, "owner-3").await;

    let scrape = http_get_raw(&t.d().metrics_addr.unwrap(), "/metrics").await;
    assert!(sample(&scrape, "metald_http_connection_timeouts_total", "timeout=\"header\"") >= 800.0);
    assert!(sample(&scrape, "metald_http_connections_refused_total", "limit=\"connections_per_ip\"") >= 20.0);
    assert!(sample(&scrape, "metald_http_connections_open", "otel_scope_name") >= 1500.0);
}

#[tokio::test]
async fn connections_over_the_caps_are_refused_naming_the_limit() {
    let t = start(&[("HTTP_MAX_CONNECTIONS", "40"), ("HTTP_MAX_CONNECTIONS_PER_IP", "20")]).await;
    let addr = t.d().addr;
    let mut from_2 = idle_keep_alives("127.0.0.2", addr, 20).await;
    let (status, body) = refusal("127.0.0.2", addr).await;
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(
        body.contains("maximum of 20 connections from 127.0.0.2 (UNKEY_METALD_HTTP_MAX_CONNECTIONS_PER_IP)"),
        "{body}"
    );

    // The owner keeps a connection open (its client's pool) and is served.
    let owner = t.client(TOKEN_A);
    owner.list_vms(pb::ListVmsRequest::default()).await.unwrap();

    // Other addresses fill the rest: then everyone is refused, naming the total.
    let mut others = Vec::new();
    let body = 'fill: {
        for i in 0..30 {
            let mut s = connect_from(&format!("127.0.0.{}", 3 + i / 10), addr).await;
            s.write_all(HEALTH).await.unwrap();
            let (status, body) = read_response(&mut s).await.expect("a response");
            if status.starts_with("HTTP/1.1 503") {
                break 'fill body;
            }
            others.push(s);
        }
        panic!("40 connections admitted beyond a cap of 40");
    };
    assert!(body.contains("maximum of 40 connections (UNKEY_METALD_HTTP_MAX_CONNECTIONS)"), "{body}");
    assert!(others.len() <= 19, "{} admitted besides 20 + the owner's", others.len());
    // The owner's open connection is still served.
    owner.list_vms(pb::ListVmsRequest::default()).await.unwrap();

    // Closing connections frees their slots.
    from_2.truncate(10);
    support::wait_until("a freed slot to admit a connection", PATIENCE, || async {
        let mut s = connect_from("127.0.0.9", addr).await;
        s.write_all(HEALTH).await.is_ok()
            && read_response(&mut s).await.is_some_and(|(status, _)| status.starts_with("HTTP/1.1 200"))
    })
    .await;
}

#[tokio::test]
async fn idle_connections_and_slow_bodies_time_out() {
    let t = start(&[
        ("HTTP_HEADER_TIMEOUT_SECONDS", "1"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "1"),
        ("HTTP_BODY_TIMEOUT_SECONDS", "1"),
    ])
    .await;
    let addr = t.d().addr;

    // HTTP/1.1 keep-alive: closed once idle.
    let s = idle_keep_alive("127.0.0.1", addr).await;
    closed_by_server(s).await;

    // HTTP/2 (h2c, as gRPC): served, then closed once idle.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/_/health")).body(String::new()).unwrap();
    assert!(send.send_request(req).await.unwrap().status().is_success());
    tokio::time::timeout(PATIENCE, conn).await.expect("the idle HTTP/2 connection is closed").unwrap().unwrap();

    // A body that stops arriving: 408 naming the setting, then closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /vmprovisioner.v1.VmService/GetVmInfo HTTP/1.1\r\nHost: x\r\nContent-Type: application/proto\r\n\
          Authorization: Bearer token-of-customer-a-0001\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let (status, body) = tokio::time::timeout(PATIENCE, read_response(&mut s)).await.unwrap().expect("a response");
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(body.contains("UNKEY_METALD_HTTP_BODY_TIMEOUT_SECONDS"), "{body}");
    closed_by_server(s).await;

    // The API still works.
    t.client(TOKEN_A).list_vms(pb::ListVmsRequest::default()).await.unwrap();
}

/// The case: the `metald` binary under the default limit of 1,024
/// open files (hard, so it cannot raise it) and 1,100 idle connections
/// from one address. It serves at most half its limit (512), 64 per
/// address, refuses the rest with a 503, never runs out of descriptors,
/// and keeps answering the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_default_fd_limit_idle_connections_are_refused_not_fatal() {
    let host = support::Host::new();
    let port = support::free_port();
    let env = host.env(0, &[("PORT", port.to_string()), ("HTTP_HEADER_TIMEOUT_SECONDS", "120".into())]);
    let log = host.tmp.path().join("metald.log");
    let metald = support::spawn_metald_with_fd_limit(&env, &log, 1024);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let owner = metald::client::vm_client(
        &format!("http://{addr}"),
        "dev_customer_owner",
        metald::client::WireProtocol::ConnectProto,
        Duration::from_secs(10),
    )
    .unwrap();
    support::wait_serving(&owner, PATIENCE, &log).await;

    // A refusal arrives at once; an admitted connection stays silent.
    let outcomes: Vec<Option<TcpStream>> = futures::stream::iter(0..1100)
        .map(|_| async move {
            let mut s = connect_from("127.0.0.2", addr).await;
            let mut b = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => {
                    let text = String::from_utf8_lossy(&b[..n]);
                    assert!(text.starts_with("HTTP/1.1 503") && text.contains("from 127.0.0.2"), "{text}");
                    None
                }
                Ok(r) => panic!("an admitted connection was closed: {r:?}"),
                Err(_) => Some(s),
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let refused = outcomes.iter().filter(|o| o.is_none()).count();
    let held: Vec<TcpStream> = outcomes.into_iter().flatten().collect();
    assert_eq!(held.len(), 64, "admitted from one address");
    assert_eq!(refused, 1100 - 64);
    let r = owner.list_vms(pb::ListVmsRequest::default()).await.expect("the owner is served");
    assert_eq!(r.into_owned().total_count, 0);
    let fds = support::open_fds(metald.pid());
    assert!(fds < 1024, "metald holds {fds} descriptors");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Too many open files"), "{text}");
    assert!(text.contains("serving at most 512 connections, 64 per address"), "{text}");
}
