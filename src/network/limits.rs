//! Rate limits of managed NICs enforced on the host side of their TAPs, for
//! hypervisors without a limiter of their own (QEMU; docs/NETWORK.md "Rate
//! limits"). This module owns the mapping of a spec's `RateLimit` to token
//! buckets (`Bucket`), the `tbf` qdisc that shapes what the host sends to
//! a guest (rx), and the nftables pieces that police what a guest sends
//! (tx): one `limit` object per limited NIC, one `tx_limits` map element
//! pointing its TAP at it, and one constant rule (rules do not grow with
//! NICs).
//!
//! - **rx** (host → guest, the TAP's egress): `tc qdisc replace dev <tap>
//!   root tbf`. A shaper queues, so TCP sees delay rather than loss. The
//!   qdisc lives on the TAP and goes with it: removal has nothing to do.
//! - **tx** (guest → host, the TAP's ingress): the kernel here has the
//!   ingress qdisc but no `police` action, and redirecting to an `ifb`
//!   device would add a second device per NIC to make and clean up. An
//!   nftables `limit ... over` object in the table metald owns drops what
//!   exceeds the rate in `pre_filter` (prerouting); TCP backs off.
//!
//! The `tc` binary (iproute2) is run rather than netlink: `rtnetlink` /
//! `netlink-packet-route` (0.24 / 0.34) encode only the `ingress` and
//! `fq_codel` qdiscs, and a hand-written `tc_tbf_qopt` needs the kernel's
//! psched tick conversion and rate tables that `tc` already gets right.
//! One `tc -batch` run covers any number of NICs (a rebuild).

use std::fmt::Write as _;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use super::types::{Bucket, NetError, NicLimits, NicWiring};
use crate::model::RateLimit;

/// The bucket depth a `RateLimit` without `refill_time` gets: one second
/// of its rate (as Firecracker's and Cloud Hypervisor's limiters in
/// `backend::restvmm`).
const DEFAULT_REFILL_MS: u64 = 1000;
/// Smallest `tbf` burst: several full-size frames, so the shaper never
/// holds back a single frame for good.
pub const TBF_MIN_BURST: u64 = 16 * 1024;
/// Smallest `tbf` queue: a guest's TCP may be sent one 64 KiB GSO packet,
/// which `tbf` splits into segments that must all fit.
pub const TBF_MIN_QUEUE: u64 = 128 * 1024;
/// Largest `tbf` queue: at high rates a quarter second would be a large
/// standing buffer per TAP.
pub const TBF_MAX_QUEUE: u64 = 4 * 1024 * 1024;
/// Smallest depth of the tx policer: a guest's virtio-net sends GSO
/// packets of up to 64 KiB, and a packet larger than the bucket would
/// never pass.
pub const POLICE_MIN_DEPTH: u64 = 128 * 1024;

impl Bucket {
    /// From the spec: `bandwidth` bytes/s (none when 0 or negative), a
    /// depth of `bandwidth × refill_time` (1 s when 0), as the VMMs'
    /// limiters size theirs. `burst` — the VMMs' one-time initial credit —
    /// has no equivalent in a bucket that refills, so it is not used: the
    /// host-side limit is never looser than the spec.
    pub fn from_spec(rl: &RateLimit) -> Option<Bucket> {
        let rate = u64::try_from(rl.bandwidth).ok().filter(|b| *b > 0)?;
        let refill = u64::try_from(rl.refill_time_ms).ok().filter(|r| *r > 0).unwrap_or(DEFAULT_REFILL_MS);
        let depth = u64::try_from(u128::from(rate) * u128::from(refill) / 1000).unwrap_or(u64::MAX).max(1);
        Some(Bucket { rate, depth })
    }

    /// `tbf` parameters (bytes/s, bytes, bytes): the burst is the depth (at
    /// least `TBF_MIN_BURST`); the queue holds a quarter second at the
    /// rate (between `TBF_MIN_QUEUE` and `TBF_MAX_QUEUE`) beyond it.
    pub fn tbf(self) -> (u64, u64, u64) {
        let burst = self.depth.max(TBF_MIN_BURST);
        let queue = (self.rate / 4).clamp(TBF_MIN_QUEUE, TBF_MAX_QUEUE);
        (self.rate, burst, burst.saturating_add(queue))
    }

    /// nftables `limit rate over <rate> bytes/second burst <burst> bytes`:
    /// in byte mode the kernel's bucket holds one second of the rate plus
    /// `burst` (nft_limit_init), so the depth is at least a second's worth,
    /// and at least `POLICE_MIN_DEPTH`.
    pub fn police(self) -> (u64, u64) {
        let depth = self.depth.max(POLICE_MIN_DEPTH);
        (self.rate, depth.saturating_sub(self.rate))
    }

    /// The depth the policer really has (what passes at once after idling).
    pub fn police_depth(self) -> u64 {
        let (rate, burst) = self.police();
        rate.saturating_add(burst)
    }
}

impl NicLimits {
    pub fn from_spec(rx: Option<&RateLimit>, tx: Option<&RateLimit>) -> NicLimits {
        NicLimits { rx: rx.and_then(Bucket::from_spec), tx: tx.and_then(Bucket::from_spec) }
    }
}

/// The map in the table's definition.
pub const MAP: &str = "  map tx_limits { type ifname : limit; }\n";
/// The one rule (in `pre_filter`, after its `return` for non-VM traffic):
/// a TAP without an element does not match.
pub const RULE: &str = "    limit name iifname map @tx_limits drop\n";

/// The `limit` object of `tap`.
fn object(tap: &str) -> String {
    format!("tx_{tap}")
}

/// `add` lines: the limit objects of `nics` (they must exist before a map
/// element names them).
pub fn add_objects(table: &str, nics: &[&NicWiring]) -> String {
    let mut out = String::new();
    for n in nics {
        if let Some(b) = n.limits.tx {
            let (rate, burst) = b.police();
            let _ = writeln!(
                out,
                "add limit inet {table} {} {{ rate over {rate} bytes/second burst {burst} bytes; }}",
                object(&n.tap)
            );
        }
    }
    out
}

/// `delete` lines of the objects (after their map elements are deleted).
pub fn delete_objects(table: &str, nics: &[&NicWiring]) -> String {
    let mut out = String::new();
    for n in nics.iter().filter(|n| n.limits.tx.is_some()) {
        let _ = writeln!(out, "delete limit inet {table} {}", object(&n.tap));
    }
    out
}

/// `tx_limits` map elements of `nics` (`"<tap>" : "tx_<tap>"`).
pub fn map_elements(nics: &[&NicWiring]) -> Vec<String> {
    nics.iter().filter(|n| n.limits.tx.is_some()).map(|n| format!("\"{}\" : \"{}\"", n.tap, object(&n.tap))).collect()
}

/// `tc -batch` lines giving each rx-limited NIC of `nics` its `tbf`
/// (`replace`: idempotent, and a rebuild repairs a changed one).
pub fn tc_batch(nics: &[&NicWiring]) -> String {
    let mut out = String::new();
    for n in nics {
        if let Some(b) = n.limits.rx {
            let (rate, burst, limit) = b.tbf();
            // tc's `bps` is bytes per second; bits are unambiguous.
            let _ = writeln!(
                out,
                "qdisc replace dev {} root tbf rate {}bit burst {burst} limit {limit}",
                n.tap,
                rate.saturating_mul(8)
            );
        }
    }
    out
}

/// Runs `tc -batch -` with the qdiscs of `nics` (nothing when none is
/// rx-limited). Forked from the calling thread: it acts in that thread's
/// network namespace, like `nft`.
pub async fn shape(tc: &str, nics: &[&NicWiring]) -> Result<(), NetError> {
    let batch = tc_batch(nics);
    if batch.is_empty() {
        return Ok(());
    }
    let mut child = Command::new(tc)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetError::Tc(format!("running {tc} (iproute2; UNKEY_METALD_NETWORK_TC): {e}")))?;
    let stdin = child.stdin.take();
    let write = async move {
        match stdin {
            Some(mut stdin) => stdin.write_all(batch.as_bytes()).await,
            None => Ok(()),
        }
    };
    let (written, out) = tokio::join!(write, child.wait_with_output());
    let out = out.map_err(|e| NetError::Tc(format!("waiting for {tc}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(NetError::Tc(format!("{tc} -batch refused the rate limits: {}", err.trim())));
    }
    written.map_err(|e| NetError::Tc(format!("writing to {tc}: {e}")))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rl(bandwidth: i64, refill_time_ms: i64, burst: i64) -> RateLimit {
        RateLimit { bandwidth, refill_time_ms, burst }
    }

    fn nic(tap: &str, limits: NicLimits) -> NicWiring {
        NicWiring {
            tap: tap.into(),
            alias: "metald:vm:eth0".into(),
            guest_mac: [2, 0, 0, 0, 0, 1],
            ipv4: None,
            ipv6: None,
            inner: Default::default(),
            tag: 1,
            ports: vec![],
            owner: None,
            limits,
        }
    }

    #[test]
    fn a_rate_limit_maps_to_buckets_never_looser_than_the_spec() {
        assert_eq!(Bucket::from_spec(&rl(0, 100, 5)), None, "no bandwidth: unlimited");
        assert_eq!(Bucket::from_spec(&rl(-1, 100, 5)), None);
        // Depth = bandwidth × refill time; 1 s when unset; burst unused.
        let b = Bucket::from_spec(&rl(1_000_000, 100, 1 << 30)).unwrap();
        assert_eq!(b, Bucket { rate: 1_000_000, depth: 100_000 });
        assert_eq!(Bucket::from_spec(&rl(65536, 0, 0)).unwrap(), Bucket { rate: 65536, depth: 65536 });
        // tbf: burst at least 16 KiB, queue beyond it at least 128 KiB.
        assert_eq!(b.tbf(), (1_000_000, 100_000, 100_000 + 250_000));
        let slow = Bucket::from_spec(&rl(65536, 100, 0)).unwrap();
        assert_eq!(slow.depth, 6553);
        assert_eq!(slow.tbf(), (65536, TBF_MIN_BURST, TBF_MIN_BURST + TBF_MIN_QUEUE));
        // Police: the kernel's bucket is a second of the rate plus burst;
        // at least 128 KiB so a 64 KiB GSO packet passes.
        assert_eq!(slow.police(), (65536, POLICE_MIN_DEPTH - 65536));
        assert_eq!(slow.police_depth(), POLICE_MIN_DEPTH);
        assert_eq!(b.police(), (1_000_000, 0));
        let deep = Bucket::from_spec(&rl(1_000_000, 3000, 0)).unwrap();
        assert_eq!(deep.police(), (1_000_000, 2_000_000));
        // Huge values do not overflow.
        let huge = Bucket::from_spec(&rl(i64::MAX, i64::MAX, 0)).unwrap();
        assert_eq!(huge.depth, u64::MAX);
        let _ = huge.police();
        assert_eq!(huge.tbf().2, u64::MAX, "saturates");
        let fast = Bucket::from_spec(&rl(1_250_000_000, 10, 0)).unwrap();
        assert_eq!(fast.tbf(), (1_250_000_000, 12_500_000, 12_500_000 + TBF_MAX_QUEUE), "queue capped");
        let l = NicLimits::from_spec(Some(&rl(10, 0, 0)), None);
        assert!(l.rx.is_some() && l.tx.is_none());
    }

    #[test]
    fn scripts_name_only_limited_nics() {
        let b = Bucket { rate: 65536, depth: 65536 };
        let (both, rx, none) = (
            nic("mt-0000000a", NicLimits { rx: Some(b), tx: Some(b) }),
            nic("mt-0000000b", NicLimits { rx: Some(b), tx: None }),
            nic("mt-0000000c", NicLimits::default()),
        );
        let all = [&both, &rx, &none];
        assert_eq!(
            add_objects("metald", &all),
            "add limit inet metald tx_mt-0000000a { rate over 65536 bytes/second burst 65536 bytes; }\n"
        );
        assert_eq!(delete_objects("metald", &all), "delete limit inet metald tx_mt-0000000a\n");
        assert_eq!(map_elements(&all), vec!["\"mt-0000000a\" : \"tx_mt-0000000a\"".to_owned()]);
        assert_eq!(
            tc_batch(&all),
            "qdisc replace dev mt-0000000a root tbf rate 524288bit burst 65536 limit 196608\n\
             qdisc replace dev mt-0000000b root tbf rate 524288bit burst 65536 limit 196608\n"
        );
        assert!(tc_batch(&[&none]).is_empty());
    }

    #[tokio::test]
    async fn nothing_to_shape_runs_nothing_and_a_missing_tc_says_so() {
        let none = nic("mt-0000000c", NicLimits::default());
        assert!(shape("/nonexistent/tc", &[&none]).await.is_ok());
        let b = Bucket { rate: 1, depth: 1 };
        let rx = nic("mt-0000000b", NicLimits { rx: Some(b), tx: None });
        match shape("/nonexistent/tc", &[&rx]).await {
            Err(NetError::Tc(m)) => assert!(m.contains("UNKEY_METALD_NETWORK_TC"), "{m}"),
            r => panic!("{r:?}"),
        }
    }
}
