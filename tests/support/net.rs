//! Loopback networking: a free TCP port and a bare HTTP/1.1 GET (for
//! `/_/health`, which needs no client library).

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
    (head.lines().next().unwrap().to_owned(), serde_json::from_str(body).unwrap_or(Value::Null))
}
