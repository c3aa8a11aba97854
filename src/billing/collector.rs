//! The collector: ONE tokio task that, every interval, samples every metered
//! VM through the backend (bounded concurrency) into the VM's sample buffer,
//! which the spool writer drains at each group commit.
//!
//! Ticks use tokio's clock (`MissedTickBehavior::Skip`): a late tick is
//! measured (its lateness is recorded) and each sample carries the time it
//! was actually taken, never the scheduled one. Nothing above `debug!` is
//! logged on this path.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::spool::Record;
use super::{BillingMetrics, Clock, MeterSet, Metered, Shared};
use crate::backend::{Backend, VmContext};

/// Backend `usage` calls in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 64;

pub struct Collector {
    pub backend: Arc<dyn Backend>,
    pub set: Arc<MeterSet>,
    pub metrics: Arc<dyn BillingMetrics>,
    pub shared: Arc<Shared>,
    pub clock: Clock,
    pub interval: Duration,
    pub concurrency: usize,
}

/// Takes one sample of `m` into its buffer; whether one was taken.
async fn sample(backend: Arc<dyn Backend>, metrics: Arc<dyn BillingMetrics>, clock: Clock, m: Arc<Metered>) -> bool {
    let ctx = VmContext { id: &m.id, spec: &m.spec, dir: m.dir.clone() };
    let ts = clock.unix_ns();
    match backend.usage(&ctx, &m.rt).await {
        Ok(u) => {
            // A run that stopped meanwhile does not take the sample.
            let taken = m.push(Record::sample(ts, &u));
            if taken {
                metrics.sample_collected(&m.id);
            }
            taken
        }
        Err(e) => {
            // Usually a VM that stopped between snapshot and call.
            debug!(vm_id = %m.id, error = %e, "usage sample failed");
            false
        }
    }
}

impl Collector {
    async fn round(&self) {
        let vms = self.set.snapshot();
        if vms.is_empty() {
            return;
        }
        // Most backends answer from memory or /proc without waiting: poll
        // each call once inline and only park the ones that wait, at most
        // `concurrency` at a time.
        let mut samples = 0usize;
        let mut waiting = FuturesUnordered::new();
        for m in vms.iter() {
            let mut call = Box::pin(sample(self.backend.clone(), self.metrics.clone(), self.clock, m.clone()));
            match (&mut call).now_or_never() {
                Some(taken) => samples += usize::from(taken),
                None => {
                    waiting.push(call);
                    if waiting.len() >= self.concurrency.max(1)
                        && let Some(taken) = waiting.next().await
                    {
                        samples += usize::from(taken);
                    }
                }
            }
        }
        while let Some(taken) = waiting.next().await {
            samples += usize::from(taken);
        }
        debug!(vms = vms.len(), samples, "billing collection round");
    }
}

/// Samples every metered VM each interval until `stop` fires.
pub async fn run(c: Collector, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(c.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let scheduled = tokio::select! {
            _ = stop.cancelled() => return,
            t = ticks.tick() => t,
        };
        c.shared.record_lateness(Instant::now().saturating_duration_since(scheduled));
        c.round().instrument(debug_span!("billing.collect")).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::backend::{BackendError, BackendHealth, BackendKind, Runtime, StopMode, Usage};
    use crate::billing::NoopMetrics;
    use crate::billing::spool::Kind;
    use crate::core::spec::{VmId, VmSpec};

    /// A backend whose `usage` takes a settable time (on tokio's clock).
    #[derive(Default)]
    struct SlowUsage {
        delay: Mutex<Duration>,
    }

    #[async_trait]
    impl Backend for SlowUsage {
        fn kind(&self) -> BackendKind {
            BackendKind::Fake
        }
        async fn create(&self, _: &VmContext<'_>) -> crate::backend::Result<Runtime> {
            Err(BackendError::Unsupported("test".into()))
        }
        async fn boot(&self, _: &VmContext<'_>, _: &mut Runtime) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn pause(&self, _: &VmContext<'_>, _: &mut Runtime) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn resume(&self, _: &VmContext<'_>, _: &mut Runtime) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn reboot(&self, _: &VmContext<'_>, _: &mut Runtime, _: bool) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn shutdown(&self, _: &VmContext<'_>, _: &Runtime, _: StopMode) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn delete(&self, _: &VmContext<'_>, _: Option<&Runtime>) -> crate::backend::Result<()> {
            Ok(())
        }
        async fn reap(&self, _: &VmContext<'_>, _: &Runtime) -> crate::backend::Result<()> {
            Ok(())
        }
        fn info(&self, _: &Runtime) -> BTreeMap<String, String> {
            BTreeMap::new()
        }
        async fn usage(&self, _: &VmContext<'_>, _: &Runtime) -> crate::backend::Result<Usage> {
            let d = *self.delay.lock().unwrap();
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            Ok(Usage { cpu_time_ns: 1, ..Default::default() })
        }
        async fn reattach(&self, _: &VmContext<'_>, _: &Runtime) -> crate::backend::Result<bool> {
            Ok(true)
        }
        async fn health(&self) -> BackendHealth {
            BackendHealth { ok: true, version: "test".into(), detail: String::new() }
        }
    }

    struct Rig {
        vms: Vec<Arc<Metered>>,
        shared: Arc<Shared>,
        backend: Arc<SlowUsage>,
        stop: CancellationToken,
    }

    fn rig(names: &[&str]) -> Rig {
        let backend = Arc::new(SlowUsage::default());
        let set = Arc::new(MeterSet::default());
        let spec = Arc::new(VmSpec::default());
        let mut vms = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let id = VmId::parse(name).unwrap();
            let m = Arc::new(Metered {
                key: Arc::from(*name),
                id: id.clone(),
                spec: spec.clone(),
                rt: Runtime::default(),
                dir: std::path::PathBuf::from("/nonexistent"),
                generation: k as u64,
                buf: Arc::default(),
            });
            set.lock().vms.insert(id, m.clone());
            vms.push(m);
        }
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let c = Collector {
            backend: backend.clone(),
            set,
            metrics: Arc::new(NoopMetrics),
            shared: shared.clone(),
            clock: Clock::new(),
            interval: Duration::from_millis(100),
            concurrency: 4,
        };
        tokio::spawn(run(c, stop.clone()));
        Rig { vms, shared, backend, stop }
    }

    /// Sample timestamps each VM's buffer holds.
    fn stamps(m: &Metered) -> Vec<i64> {
        let mut out = Vec::new();
        m.drain_into(&mut out);
        assert!(out.iter().all(|r| r.kind == Kind::Sample));
        out.iter().map(|r| r.ts_ns).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn samples_every_vm_every_100ms() {
        let r = rig(&["a", "b", "c"]);
        // Ticks at 0, 100, ..., 1000 ms.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        for m in &r.vms {
            let ts = stamps(m);
            assert_eq!(ts.len(), 11, "{}", m.key);
            for w in ts.windows(2) {
                assert_eq!(w[1] - w[0], 100_000_000, "cadence {ts:?}");
            }
        }
        assert_eq!(r.shared.lateness.lock().unwrap().iter().max(), Some(&Duration::ZERO));
        // A stopped run takes no more samples.
        assert!(r.vms[0].close().is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(stamps(&r.vms[0]).is_empty());
        assert_eq!(stamps(&r.vms[1]).len(), 3);
        r.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn late_ticks_are_measured_and_stamped_with_real_time() {
        let r = rig(&["a"]);
        tokio::time::sleep(Duration::from_millis(250)).await; // ticks 0, 100, 200
        // Every usage call now takes 250 ms: the next ticks come late.
        *r.backend.delay.lock().unwrap() = Duration::from_millis(250);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        r.stop.cancel();
        let ts = stamps(&r.vms[0]);
        let gaps: Vec<i64> = ts.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
        // Ticks 0..300 on time; the round at 300 is the first slow one.
        assert_eq!(&gaps[..3], &[100, 100, 100], "{gaps:?}");
        // Later samples are >= 250 ms apart and their stamps show it.
        assert!(gaps.len() >= 5 && gaps[3..].iter().all(|g| *g >= 250), "{gaps:?}");
        let late: Vec<Duration> = r.shared.lateness.lock().unwrap().iter().copied().filter(|d| !d.is_zero()).collect();
        assert!(late.len() >= 2, "lateness recorded: {late:?}");
    }
}
