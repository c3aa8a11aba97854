//! Loopback networking: a free TCP port and a bare HTTP/1.1 GET (for
//! `/_/health`, which needs no client library); a network namespace of a
//! test's own ([`in_netns`]) and `ip` in it.

use serde_json::Value;

/// A TCP port on 127.0.0.1 that was free a moment ago (for a process that
/// must be told its port up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` over a fresh connection; the whole response (status line,
/// headers and body) as text.
pub async fn http_get_raw(addr: &std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `GET path`: the status line and the body as JSON (`Null` if it is not).
pub async fn http_get(addr: &std::net::SocketAddr, path: &str) -> (String, Value) {
    let out = http_get_raw(addr, path).await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    (head.lines().next().unwrap().to_owned(), serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The payload of an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A Connect unary call in JSON over a fresh connection: `POST
/// /vmprovisioner.v1.VmService/<method>` with `token` and `headers`; the
/// status line and the body as JSON. For what a typed client cannot send
/// (a `Connect-Timeout-Ms` deadline, say).
pub async fn connect_json(
    addr: &std::net::SocketAddr,
    method: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut head = format!(
        "POST /vmprovisioner.v1.VmService/{method} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}\r\n{body}").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    (head.lines().next().unwrap().to_owned(), serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Runs `f` on a thread in a fresh network namespace with `lo` up, on a
/// runtime whose threads (and every process they start: metald's QEMUs,
/// `nft`, `ip`) inherit that namespace. Needs root.
pub fn in_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        ip(&["link", "set", "lo", "up"]);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(f());
    })
    .join()
    .unwrap();
}

/// `ip ARGS` in the calling thread's namespace; its stdout. Panics with
/// its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
