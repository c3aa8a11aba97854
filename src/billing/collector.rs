//! The collector: ONE tokio task that, every interval, samples every metered
//! VM through the backend (bounded concurrency) and queues the round's
//! samples as one vector, which the spool writer takes at each group commit.
//!
//! Ticks use tokio's clock (`MissedTickBehavior::Skip`): a late tick is
//! measured (its lateness is recorded) and each sample carries the time it
//! was actually taken, never the scheduled one. Nothing above `debug!` is
//! logged on this path.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, debug, info_span};

use super::codec::Record;
use super::counters::Shared;
use super::meter::{Clock, MeterSet, Metered, Round};
use crate::backend::{Backend, Stamped, UsageTarget, VmContext};
use crate::core::{HostNet, add_tap_counters, managed_taps};

/// Backend `usage` calls in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 64;

pub struct Collector {
    pub backend: Arc<dyn Backend>,
    pub set: Arc<MeterSet>,
    pub shared: Arc<Shared>,
    pub clock: Clock,
    pub interval: Duration,
    pub concurrency: usize,
    /// Host networking: the traffic of managed NICs' TAPs, for VMs whose
    /// hypervisor counts none (QEMU).
    pub net: Option<Arc<dyn HostNet>>,
}

impl Collector {
    /// One collection round: every metered VM through ONE
    /// [`Backend::usage_many`] call; the samples are queued as one [`Round`]
    /// for the spool writer.
    /// `scratch` is the results buffer, reused between rounds.
    ///
    /// A round with VMs runs in a span (exported with telemetry on; the
    /// backend calls inside it are not, see `telemetry::METERING_ROUND`)
    /// that records the VMs measured, the samples taken and the failures
    /// (which make it an Error span).
    async fn round(&self, scratch: &mut Vec<Stamped>) {
        let vms = self.set.snapshot();
        if vms.is_empty() {
            return;
        }
        let span = info_span!(
            crate::telemetry::METERING_ROUND,
            vms = count(vms.len()),
            samples = Empty,
            failed = Empty,
            otel.status_code = Empty
        );
        let samples = self.measure(vms.clone(), scratch).instrument(span.clone()).await;
        let failed = vms.len() - samples;
        span.record("samples", count(samples)).record("failed", count(failed));
        if failed > 0 {
            span.record("otel.status_code", "ERROR");
        }
    }

    /// Samples `vms` and queues the round; returns the samples taken.
    async fn measure(&self, vms: Arc<Vec<Arc<Metered>>>, scratch: &mut Vec<Stamped>) -> usize {
        let targets: Vec<UsageTarget<'_>> = vms
            .iter()
            .map(|m| UsageTarget { vm: VmContext { id: &m.id, spec: &m.spec, dir: m.dir.as_path().into() }, rt: &m.rt })
            .collect();
        let clock = self.clock;
        let stamp = move || clock.unix_ns();
        self.backend.usage_many(&targets, self.concurrency, &stamp, scratch).await;
        drop(targets);
        // One read of every TAP's counters for the round, and only when a
        // VM has a managed NIC.
        let taps = match &self.net {
            Some(net) if vms.iter().any(|m| managed_taps(&m.spec).next().is_some()) => net.tap_counters(),
            _ => None,
        };
        let mut samples = 0usize;
        let mut taken = self.set.sample_vec();
        taken.extend(vms.iter().zip(scratch.drain(..)).map(|(m, (ts, r))| match r {
            Ok(mut u) => {
                samples += 1;
                if let Some(all) = &taps {
                    add_tap_counters(&mut u, managed_taps(&m.spec), all);
                }
                Some(Record::sample(ts, &u))
            }
            Err(e) => {
                // Usually a VM that stopped between snapshot and call.
                debug!(vm_id = %m.id, error = %crate::util::chain(&e), "usage sample failed");
                None
            }
        }));
        debug!(vms = vms.len(), samples, "billing collection round");
        self.set.push_round(Round { vms, samples: taken });
        samples
    }
}

/// A count as a span attribute: an integer (`tracing-opentelemetry` turns
/// unsigned fields into strings).
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Samples every metered VM each interval until `stop` fires.
pub async fn run(c: Collector, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(c.interval);
    let mut scratch = Vec::new();
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let scheduled = tokio::select! {
            _ = stop.cancelled() => return,
            t = ticks.tick() => t,
        };
        c.shared.record_lateness(Instant::now().saturating_duration_since(scheduled));
        c.round(&mut scratch).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::backend::{BackendError, BackendHealth};
    use crate::billing::codec::Kind;
    use crate::billing::meter::Metered;
    use crate::model::{BackendKind, Runtime, StopMode, Usage};
    use crate::model::{ValidSpec, VmId, VmSpec};

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
        fn log_files(&self, _: &VmContext<'_>) -> Vec<crate::util::logs::LogFile> {
            Vec::new()
        }
        async fn create(&self, _: &VmContext<'_>) -> crate::backend::Result<Runtime> {
            Err(BackendError::unsupported("test"))
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
        async fn observe(&self, _: &VmContext<'_>, _: &Runtime) -> crate::backend::Result<crate::backend::Observed> {
            Ok(crate::backend::Observed::Running)
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
        fn compat(&self, _: &ValidSpec) -> BTreeMap<String, String> {
            BTreeMap::new()
        }
        async fn save(&self, _: &VmContext<'_>, _: &Runtime, _: &std::path::Path) -> crate::backend::Result<()> {
            Err(BackendError::unsupported("test"))
        }
        async fn restore(&self, _: &VmContext<'_>, _: &std::path::Path) -> crate::backend::Result<Runtime> {
            Err(BackendError::unsupported("test"))
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
        set: Arc<MeterSet>,
        shared: Arc<Shared>,
        backend: Arc<SlowUsage>,
        stop: CancellationToken,
    }

    fn rig(names: &[&str]) -> Rig {
        let backend = Arc::new(SlowUsage::default());
        let set = Arc::new(MeterSet::default());
        let spec = Arc::new(ValidSpec::unchecked(VmSpec::default()));
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
            });
            set.lock().vms.insert(id, m.clone());
            vms.push(m);
        }
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let c = Collector {
            backend: backend.clone(),
            set: set.clone(),
            shared: shared.clone(),
            clock: Clock::new(),
            interval: Duration::from_millis(100),
            concurrency: 4,
            net: None,
        };
        tokio::spawn(run(c, stop.clone()));
        Rig { vms, set, shared, backend, stop }
    }

    /// Takes the queued rounds: the sample timestamps of each VM, by name.
    fn stamps(set: &MeterSet) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for r in set.take_rounds() {
            assert_eq!(r.vms.len(), r.samples.len());
            for (m, s) in r.vms.iter().zip(&r.samples) {
                let s = s.unwrap();
                assert_eq!(s.kind, Kind::Sample);
                out.entry(m.key.to_string()).or_default().push(s.ts_ns);
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn samples_every_vm_every_100ms() {
        let r = rig(&["a", "b", "c"]);
        // Ticks at 0, 100, ..., 1000 ms.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let all = stamps(&r.set);
        assert_eq!(all.len(), 3);
        for (vm, ts) in &all {
            assert_eq!(ts.len(), 11, "{vm}");
            for w in ts.windows(2) {
                assert_eq!(w[1] - w[0], 100_000_000, "cadence {ts:?}");
            }
        }
        assert_eq!(r.shared.lateness.lock().unwrap().iter().max(), Some(&Duration::ZERO));
        // A VM no longer metered is no longer sampled.
        r.set.lock().vms.remove(&r.vms[0].id);
        r.set.lock().snapshot = None;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let all = stamps(&r.set);
        assert!(!all.contains_key("a"));
        assert_eq!(all["b"].len(), 3);
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
        let ts = stamps(&r.set).remove("a").unwrap();
        let gaps: Vec<i64> = ts.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
        // Ticks 0..300 on time; the round at 300 is the first slow one.
        assert_eq!(&gaps[..3], &[100, 100, 100], "{gaps:?}");
        // Later samples are >= 250 ms apart and their stamps show it.
        assert!(gaps.len() >= 5 && gaps[3..].iter().all(|g| *g >= 250), "{gaps:?}");
        let late: Vec<Duration> = r.shared.lateness.lock().unwrap().iter().copied().filter(|d| !d.is_zero()).collect();
        assert!(late.len() >= 2, "lateness recorded: {late:?}");
    }

    /// A QEMU VM's samples carry its managed NICs' traffic from their TAPs
    /// (one read for the round); an operator's TAP and a VM without NICs
    /// get none.
    #[tokio::test]
    async fn samples_carry_the_traffic_of_managed_nics_taps() {
        use crate::core::RecordingNet;
        use crate::model::NicSpec;
        let net = Arc::new(RecordingNet::new(crate::model::net::Pools { v4: None, v6: None, ports: 1..=1 }, vec![]));
        *net.taps.lock().unwrap() = Some(
            [("mt-0000000a".to_owned(), (1500, 700, 3, 2)), ("tap9".to_owned(), (9, 9, 9, 9))].into_iter().collect(),
        );
        let nic =
            |tap: &str, managed: bool| NicSpec { id: "eth0".into(), tap: tap.into(), managed, ..Default::default() };
        let spec = |nics: Vec<NicSpec>| Arc::new(ValidSpec::unchecked(VmSpec { network: nics, ..VmSpec::default() }));
        let set = Arc::new(MeterSet::default());
        for (k, (name, s)) in [
            ("managed", spec(vec![nic("mt-0000000a", true)])),
            ("operator", spec(vec![nic("tap9", false)])),
            ("none", spec(vec![])),
        ]
        .into_iter()
        .enumerate()
        {
            let id = VmId::parse(name).unwrap();
            let m = Metered {
                key: Arc::from(name),
                id: id.clone(),
                spec: s,
                rt: Runtime::default(),
                dir: "/nonexistent".into(),
                generation: k as u64,
            };
            set.lock().vms.insert(id, Arc::new(m));
        }
        let c = Collector {
            backend: Arc::new(SlowUsage::default()),
            set: set.clone(),
            shared: Arc::new(Shared::default()),
            clock: Clock::new(),
            interval: Duration::from_millis(100),
            concurrency: 4,
            net: Some(net),
        };
        c.round(&mut Vec::new()).await;
        let mut got = BTreeMap::new();
        for r in set.take_rounds() {
            for (m, s) in r.vms.iter().zip(&r.samples) {
                got.insert(m.key.to_string(), (s.unwrap().v[4], s.unwrap().v[5]));
            }
        }
        assert_eq!(got["managed"], (1500, 700));
        assert_eq!(got["operator"], (0, 0));
        assert_eq!(got["none"], (0, 0));
    }
}
