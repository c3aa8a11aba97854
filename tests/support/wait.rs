//! Bounded waiting: poll a condition until it holds (or a lookup until it
//! finds something), or fail the test naming what it waited for.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `f` every [`POLL`] until it returns true; panics after `timeout`
/// with "timed out after … waiting for `what`".
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for a condition that needs no `.await`.
pub async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    wait_until(what, timeout, || std::future::ready(ok())).await;
}

/// Polls `f` every [`POLL`] until it finds something and returns that;
/// panics with "timed out waiting for `what`" after 600 tries (30 s of
/// sleeping, plus the time `f` takes).
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out waiting for {what}");
}
