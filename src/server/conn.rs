//! One accepted connection, served by hyper (HTTP/1.1, or HTTP/2 with prior
//! knowledge: gRPC's h2c) under the timeouts of [`ConnSettings`]:
//!
//! - **header**: from accept until the first request starts, and for
//!   HTTP/1 from the first byte of each later request head until the
//!   request starts (hyper's own `header_read_timeout` is off: it also runs
//!   while a keep-alive connection waits, which would make it the idle
//!   timeout too);
//! - **idle**: no request in flight (HTTP/1 keep-alive and HTTP/2 alike);
//! - **body**: a request body still arriving that long after its head is
//!   answered `408 Request Timeout` (the handler sees a read error).
//!
//! A [`Watch`] per connection tracks requests in flight (a guard held from
//! the request until its response body is dropped) and the first byte read
//! while none is; the connection task sleeps until the earliest deadline
//! that applies, re-checks, and on expiry starts a graceful close (forced
//! after [`FORCE_CLOSE`]). HTTP/2 also pings idle peers (hyper's
//! keep-alive) so a dead peer holding a long call is noticed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body as AxumBody;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::settings::{BODY_TIMEOUT_VAR, ConnSettings};
use crate::config::PREFIX;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::ConnTimeout;

/// After a timeout starts a graceful close, how long the peer gets to take
/// its answer (an HTTP/2 GOAWAY) before the socket is dropped.
pub(super) const FORCE_CLOSE: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive: ping a connection this long silent, and close it when
/// the ping is not answered within [`H2_PING_TIMEOUT`].
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What every connection of one server shares.
pub(super) struct Shared<S> {
    pub app: S,
    pub builder: auto::Builder<TokioExecutor>,
    pub settings: ConnSettings,
    pub metrics: Metrics,
}

/// hyper's connection builder: HTTP/1 and HTTP/2, with the timer hyper's
/// HTTP/2 keep-alive needs.
pub(super) fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer would default to 30 s once a timer is set; the
    // header timeout is the Watch's (see the module doc).
    b.http1().timer(TokioTimer::new()).header_read_timeout(None).keep_alive(true);
    b.http2().timer(TokioTimer::new()).keep_alive_interval(Some(H2_PING_INTERVAL)).keep_alive_timeout(H2_PING_TIMEOUT);
    b
}

/// Serves one connection until it closes, times out, or (after `stop`) has
/// finished its in-flight requests.
pub(super) async fn serve<S>(stream: TcpStream, shared: Arc<Shared<S>>, stop: CancellationToken)
where
    S: tower::Service<Request<TimedBody>, Response = Response<AxumBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(WatchedIo { inner: stream, watch: watch.clone() });
    let svc = ConnService {
        app: shared.app.clone(),
        watch: watch.clone(),
        body_timeout: shared.settings.body_timeout,
        metrics: shared.metrics.clone(),
    };
    let mut conn = pin!(shared.builder.serve_connection(io, svc));
    let mut stopped = pin!(stop.cancelled());
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let mut timer = pin!(tokio::time::sleep_until(far()));
    // Set once a graceful close has begun: by a timeout (then forced at
    // the timer) or by the daemon's shutdown.
    let mut closing: Option<Closing> = None;
    loop {
        if closing.is_none() {
            let at = watch.deadline(&shared.settings).map_or_else(far, |(at, _)| at);
            if at != timer.deadline() {
                timer.as_mut().reset(at);
            }
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "API connection ended with an error");
                }
                return;
            }
            () = &mut stopped, if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Closing::Shutdown);
                timer.as_mut().reset(far());
            }
            () = watch.changed.notified(), if closing.is_none() => {}
            () = &mut timer => match closing {
                Some(_) => return, // the peer did not close in time: drop it
                None => {
                    if let Some((at, kind)) = watch.deadline(&shared.settings)
                        && at <= Instant::now()
                    {
                        debug!(timeout = kind.as_str(), "closing an API connection at its timeout");
                        shared.metrics.connection_timed_out(kind);
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Closing::Timeout);
                        timer.as_mut().reset(Instant::now() + FORCE_CLOSE);
                    }
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Closing {
    Timeout,
    Shutdown,
}

/// Milliseconds since `start`, saturating.
fn ms_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A connection's activity, shared by its socket (reads), its requests
/// (in flight) and its task (deadlines).
pub(super) struct Watch {
    start: Instant,
    in_flight: AtomicU32,
    /// Requests started; before the first, the header timeout runs from accept.
    requests: AtomicU64,
    /// When the last request in flight ended (ms since `start`).
    idle_since: AtomicU64,
    /// 1 + when the first byte arrived while no request was in flight
    /// (ms since `start`); 0: none since.
    head_started: AtomicU64,
    /// Whether requests came over HTTP/2 (whose control frames are no
    /// request head: only the idle timeout applies between requests).
    h2: AtomicBool,
    /// Wakes the connection task when a deadline moved earlier.
    changed: Notify,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// The next deadline and the timeout it enforces; `None` while a
    /// request is in flight (its body has its own deadline).
    fn deadline(&self, s: &ConnSettings) -> Option<(Instant, ConnTimeout)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.requests.load(Ordering::Acquire) == 0 {
            return Some((self.start + s.header_timeout, ConnTimeout::Header));
        }
        let at = |ms: u64| self.start + Duration::from_millis(ms);
        match self.head_started.load(Ordering::Acquire) {
            0 => Some((at(self.idle_since.load(Ordering::Acquire)) + s.idle_timeout, ConnTimeout::Idle)),
            t => Some((at(t - 1) + s.header_timeout, ConnTimeout::Header)),
        }
    }

    /// Bytes arrived on the socket.
    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.requests.load(Ordering::Acquire) > 0
            && self.head_started.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            self.head_started.store(ms_since(self.start).saturating_add(1), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn request_started(self: &Arc<Self>, version: http::Version) -> InFlight {
        if version == http::Version::HTTP_2 && !self.h2.load(Ordering::Relaxed) {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        InFlight(self.clone())
    }
}

/// A request in flight, from its head until its response body is dropped.
pub(super) struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let w = &self.0;
        if w.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            w.idle_since.store(ms_since(w.start), Ordering::Release);
            w.head_started.store(0, Ordering::Release);
            w.changed.notify_one();
        }
    }
}

/// The socket, telling the [`Watch`] when bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.watch.read_some();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The app as hyper calls it: each request counted in flight, its body
/// under the body timeout.
#[derive(Clone)]
struct ConnService<S> {
    app: S,
    watch: Arc<Watch>,
    body_timeout: Duration,
    metrics: Metrics,
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<TimedBody>, Response = Response<AxumBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        use tower::ServiceExt as _;
        let version = req.version();
        let guard = self.watch.request_started(version);
        let timed_out = Arc::new(AtomicBool::new(false));
        let (parts, body) = req.into_parts();
        let body = TimedBody {
            inner: body,
            deadline: Instant::now() + self.body_timeout,
            limit: self.body_timeout,
            sleep: None,
            timed_out: timed_out.clone(),
        };
        let (app, limit) = (self.app.clone(), self.body_timeout);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let resp = app.oneshot(Request::from_parts(parts, body)).await?;
            let resp = if timed_out.load(Ordering::Acquire) {
                metrics.connection_timed_out(ConnTimeout::Body);
                body_timeout_response(version, limit)
            } else {
                resp
            };
            Ok(resp.map(|body| Tracked { inner: body, _guard: guard }))
        })
    }
}

/// `408 Request Timeout`, naming the setting; HTTP/1 connections close
/// after it (the rest of the body is not read).
fn body_timeout_response(version: http::Version, limit: Duration) -> Response<AxumBody> {
    let text = format!("{}; the connection is closed\n", BodyError::Timeout(limit));
    let mut r = Response::new(AxumBody::from(text));
    *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    if version < http::Version::HTTP_2 {
        h.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    r
}

/// A request body that fails once it has taken longer than the body
/// timeout since its head (its timer is set only if the body is ever
/// waited for: most arrive with the head).
pub struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// Why a [`TimedBody`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Read(#[from] hyper::Error),
    #[error("the request body did not arrive within {} s ({PREFIX}{BODY_TIMEOUT_VAR})", .0.as_secs())]
    Timeout(Duration),
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)));
        }
        let deadline = this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.timed_out.store(true, Ordering::Release);
        Poll::Ready(Some(Err(BodyError::Timeout(this.limit))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body holding its request's [`InFlight`] until hyper has
/// sent it (or dropped it).
pub(super) struct Tracked {
    inner: AxumBody,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
