//! A tiny typed JSON-over-HTTP/1.1 client for hypervisor APIs on Unix
//! sockets (Firecracker, Cloud Hypervisor).
//!
//! One connection per request (both VMMs serve one client at a time and
//! requests are rare), every request bounded by a timeout that covers
//! connecting, sending and reading the whole body. Each call runs in a
//! `hypervisor.api` span with the fields `rpc.system`, `http.method`,
//! `url.path`, `http.status_code` and `outcome` (exported as a client span).
//! Error bodies are turned into a message by a per-hypervisor function
//! (Firecracker's `{"fault_message": ...}`, Cloud Hypervisor's plain text).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tracing::{Instrument, field};

/// What went wrong with one API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiErrorKind {
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// The connection broke (typically: the VMM exited mid-call).
    #[error("connection lost: {0}")]
    Transport(String),
    /// The VMM answered with an error status.
    #[error("{status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected reply: {0}")]
    Decode(String),
}

/// One failed call, naming the hypervisor, method and path.
#[derive(Debug, thiserror::Error)]
#[error("{system} API {method} {path}: {kind}")]
pub struct ApiError {
    pub system: &'static str,
    pub method: Method,
    pub path: String,
    #[source]
    pub kind: ApiErrorKind,
}

impl ApiError {
    /// The status code when the VMM answered with an error.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            ApiErrorKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Turns an error body into a human-readable message.
pub type ErrorBody = fn(&[u8]) -> String;

/// The body as trimmed UTF-8 text (Cloud Hypervisor's error format).
pub fn text_error_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).trim().to_owned();
    if text.is_empty() { "(empty body)".to_owned() } else { text }
}

/// An API call broke because the VMM process ended: the call's error, and
/// the end of the VMM's log (the call's message leads, so it has no
/// `source()` of its own).
#[derive(Debug, thiserror::Error)]
#[error("{call}; the {vmm} process exited{tail}")]
pub struct VmmExited {
    pub call: ApiError,
    /// The VMM's name ("Firecracker", ...).
    pub vmm: String,
    /// ` (<last lines of the VMM's log>)`, or empty.
    pub tail: String,
}

/// Maps a failed call to a backend error whose cause is the [`ApiError`]. A
/// broken connection of a VMM that ended (checked for up to 250 ms: the
/// socket closes before the process is gone) is a [`VmmExited`].
pub async fn backend_error(
    e: ApiError,
    vmm: &str,
    pid: Option<crate::backend::process::ProcessId>,
    log: &Path,
) -> crate::backend::BackendError {
    use crate::backend::BackendError;
    match &e.kind {
        ApiErrorKind::Timeout(_) => BackendError::timeout_by(e),
        ApiErrorKind::Status { .. } | ApiErrorKind::Decode(_) => BackendError::failed_by(e),
        ApiErrorKind::Connect { .. } | ApiErrorKind::Transport(_) => match pid {
            Some(p) if p.wait_gone(Duration::from_millis(250)).await => {
                let tail = crate::backend::process::log_tail(log, 3);
                let tail = if tail.is_empty() { String::new() } else { format!(" ({tail})") };
                BackendError::failed_by(VmmExited { call: e, vmm: vmm.to_owned(), tail })
            }
            _ => BackendError::unavailable_by(e),
        },
    }
}

/// `r`, with an error mapped by [`backend_error`].
pub async fn checked<T>(
    r: Result<T, ApiError>,
    vmm: &str,
    pid: Option<crate::backend::process::ProcessId>,
    log: &Path,
) -> crate::backend::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(backend_error(e, vmm, pid, log).await),
    }
}

/// A client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct UdsClient {
    socket: PathBuf,
    system: &'static str,
    timeout: Duration,
    error_body: ErrorBody,
}

impl UdsClient {
    /// `system` is the `rpc.system` span field ("firecracker", "cloud-hypervisor").
    pub fn new(socket: impl Into<PathBuf>, system: &'static str, timeout: Duration, error_body: ErrorBody) -> Self {
        UdsClient { socket: socket.into(), system, timeout, error_body }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn with_timeout(&self, timeout: Duration) -> Self {
        UdsClient { timeout, ..self.clone() }
    }

    /// Sends a request with an optional JSON body; returns the body of a 2xx
    /// answer.
    pub async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let span = tracing::info_span!(
            "hypervisor.api",
            otel.kind = "client",
            rpc.system = self.system,
            http.method = %method,
            url.path = %path,
            http.status_code = field::Empty,
            outcome = field::Empty,
            otel.status_code = field::Empty,
        );
        let outer = span.clone();
        let err = |kind| ApiError { system: self.system, method: method.clone(), path: path.to_owned(), kind };
        let payload = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| err(ApiErrorKind::Decode(format!("encoding: {e}"))))?),
            None => None,
        };
        let result = async {
            let reply = tokio::time::timeout(self.timeout, self.exchange(method.clone(), path, payload)).await;
            let span = tracing::Span::current();
            let (status, bytes) = match reply {
                Err(_) => {
                    span.record("outcome", "timeout");
                    return Err(err(ApiErrorKind::Timeout(self.timeout.as_millis())));
                }
                Ok(Err(kind)) => {
                    span.record(
                        "outcome",
                        if matches!(kind, ApiErrorKind::Connect { .. }) { "connect_error" } else { "transport_error" },
                    );
                    return Err(err(kind));
                }
                Ok(Ok(r)) => r,
            };
            // As an integer: `tracing-opentelemetry` exports unsigned fields as strings.
            span.record("http.status_code", i64::from(status.as_u16()));
            if status.is_success() {
                span.record("outcome", "ok");
                Ok(bytes)
            } else {
                span.record("outcome", "error_status");
                Err(err(ApiErrorKind::Status { status: status.as_u16(), message: (self.error_body)(&bytes) }))
            }
        }
        .instrument(span)
        .await;
        if let Err(e) = &result {
            // Error status keeps the span at any sampling rate.
            outer.record("otel.status_code", "ERROR");
            tracing::debug!(error = %crate::util::chain(&e), "hypervisor API call failed");
        }
        result
    }

    /// `PUT` with a JSON body, expecting no content.
    pub async fn put<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        self.call(Method::PUT, path, Some(body)).await.map(|_| ())
    }

    /// `PUT` without a body (Cloud Hypervisor's actions).
    pub async fn put_empty(&self, path: &str) -> Result<(), ApiError> {
        self.call::<()>(Method::PUT, path, None).await.map(|_| ())
    }

    pub async fn patch<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        self.call(Method::PATCH, path, Some(body)).await.map(|_| ())
    }

    /// `GET`, decoding the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self.call::<()>(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError {
            system: self.system,
            method: Method::GET,
            path: path.to_owned(),
            kind: ApiErrorKind::Decode(format!("{e}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))),
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        payload: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiErrorKind> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiErrorKind::Connect { socket: self.socket.display().to_string(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiErrorKind::Transport(e.to_string()))?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if payload.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(Bytes::from(payload.unwrap_or_default())))
            .map_err(|e| ApiErrorKind::Decode(format!("building the request: {e}")))?;
        let request = async move {
            let resp = sender.send_request(req).await.map_err(|e| ApiErrorKind::Transport(e.to_string()))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| ApiErrorKind::Transport(e.to_string()))?;
            Ok((status, body.to_bytes()))
        };
        tokio::pin!(request);
        tokio::pin!(conn);
        tokio::select! {
            biased;
            r = &mut request => r,
            // The connection ended first: the request either got its answer
            // or fails with "connection closed".
            _ = &mut conn => request.await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// Serves one canned HTTP answer per connection; `None` never answers.
    fn serve(path: &Path, answer: Option<&'static str>) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn success_status_error_timeout_and_connect() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.sock");
        serve(&ok, Some("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\":\"b c\"}"));
        let c = UdsClient::new(&ok, "test", Duration::from_secs(2), text_error_body);
        let v: serde_json::Value = c.get("/x").await.unwrap();
        assert_eq!(v["a"], "b c");

        let bad = dir.path().join("bad.sock");
        serve(&bad, Some("HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope"));
        let e = UdsClient::new(&bad, "test", Duration::from_secs(2), text_error_body).put("/y", &1).await.unwrap_err();
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.to_string(), "test API PUT /y: 400: nope");

        let hang = dir.path().join("hang.sock");
        serve(&hang, None);
        let e = UdsClient::new(&hang, "test", Duration::from_millis(100), text_error_body)
            .put_empty("/z")
            .await
            .unwrap_err();
        assert!(matches!(e.kind, ApiErrorKind::Timeout(100)), "{e}");

        let e = UdsClient::new(dir.path().join("none.sock"), "test", Duration::from_secs(1), text_error_body)
            .put_empty("/z")
            .await
            .unwrap_err();
        assert!(matches!(e.kind, ApiErrorKind::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn backend_errors_keep_the_api_error_as_their_cause() {
        use crate::backend::BackendError;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let hang = dir.path().join("hang.sock");
        serve(&hang, None);
        let e = UdsClient::new(&hang, "test", Duration::from_millis(100), text_error_body)
            .put_empty("/z")
            .await
            .unwrap_err();
        let e = backend_error(e, "Test", None, &log).await;
        assert!(matches!(e, BackendError::Timeout { .. }), "{e:?}");
        let cause = std::error::Error::source(&e).unwrap().downcast_ref::<ApiError>().unwrap();
        assert!(matches!(cause.kind, ApiErrorKind::Timeout(100)));
        assert_eq!(
            crate::error::Error::Backend(e).chain(),
            "hypervisor backend failed: timed out: test API PUT /z: no answer within 100 ms"
        );

        let e = UdsClient::new(dir.path().join("none.sock"), "test", Duration::from_secs(1), text_error_body)
            .put_empty("/z")
            .await
            .unwrap_err();
        let e = backend_error(e, "Test", None, &log).await;
        assert!(matches!(e, BackendError::Unavailable { .. }), "{e:?}");
        let chain = crate::error::Error::Backend(e).chain();
        assert!(chain.starts_with("hypervisor backend failed: test API PUT /z: cannot connect to "), "{chain}");
        assert_eq!(chain.matches("cannot connect").count(), 1, "{chain}");

        // The same failure of a VMM that is gone (a start time that is not
        // this process's) names the exit and the end of the log.
        std::fs::write(&log, "starting\nout of memory\n").unwrap();
        let gone = crate::backend::process::ProcessId { pid: std::process::id(), start_ticks: 0 };
        let e = UdsClient::new(dir.path().join("none.sock"), "test", Duration::from_secs(1), text_error_body)
            .put_empty("/z")
            .await
            .unwrap_err();
        let e = backend_error(e, "Test", Some(gone), &log).await;
        assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
        let exited = std::error::Error::source(&e).unwrap().downcast_ref::<VmmExited>().unwrap();
        assert!(matches!(exited.call.kind, ApiErrorKind::Connect { .. }));
        let chain = crate::error::Error::Backend(e).chain();
        assert!(chain.starts_with("hypervisor backend failed: test API PUT /z: cannot connect to "), "{chain}");
        assert!(chain.ends_with("; the Test process exited (starting; out of memory)"), "{chain}");
    }

    /// Records every span's name and fields.
    #[derive(Clone, Default)]
    struct Spans(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, (String, Fields)>>>);
    type Fields = std::collections::BTreeMap<String, String>;

    struct Visit<'a>(&'a mut Fields);
    impl tracing::field::Visit for Visit<'_> {
        fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
            self.0.insert(f.name().to_owned(), format!("{v:?}"));
        }
        fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
            self.0.insert(f.name().to_owned(), v.to_owned());
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut f = Fields::new();
            attrs.record(&mut Visit(&mut f));
            self.0.lock().unwrap().insert(id.into_u64(), (attrs.metadata().name().to_owned(), f));
        }
        fn on_record(
            &self,
            id: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if let Some((_, f)) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
                values.record(&mut Visit(f));
            }
        }
    }

    #[tokio::test]
    async fn every_call_runs_in_a_hypervisor_api_span() {
        use tracing_subscriber::layer::SubscriberExt;
        let spans = Spans::default();
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        serve(&p, Some("HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"));
        let c = UdsClient::new(&p, "firecracker", Duration::from_secs(2), text_error_body);
        // Other tests hit the same span callsite on other threads with no
        // subscriber; a first hit racing with `set_default` above can leave
        // its cached interest at "never" (tracing-core registers callsites
        // lazily). A rebuild after that race fixes it: call again then.
        let mut all = Default::default();
        for _ in 0..20 {
            assert!(c.put("/drives/root", &1).await.is_err());
            all = spans.0.lock().unwrap().clone();
            if !all.is_empty() {
                break;
            }
            tracing::callsite::rebuild_interest_cache();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (name, f) = all.values().next().unwrap();
        assert_eq!(name, "hypervisor.api");
        assert_eq!(f["rpc.system"], "firecracker");
        assert_eq!(f["http.method"], "PUT");
        assert_eq!(f["url.path"], "/drives/root");
        assert_eq!(f["http.status_code"], "400");
        assert_eq!(f["outcome"], "error_status");
        assert_eq!(f["otel.kind"], "client");
    }

    #[tokio::test]
    async fn peer_closing_mid_call_is_a_transport_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("close.sock");
        let listener = UnixListener::bind(&p).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        });
        let e = UdsClient::new(&p, "test", Duration::from_secs(2), text_error_body).put_empty("/q").await.unwrap_err();
        assert!(matches!(e.kind, ApiErrorKind::Transport(_)), "{e}");
    }
}
