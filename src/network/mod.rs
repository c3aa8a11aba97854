//! Host networking's kernel side (docs/NETWORK.md): per managed NIC a
//! persistent TAP in the host namespace with its alias, routes and
//! addresses; one dummy gateway device; one `inet` nftables table whose
//! rules never change and whose set elements are the NICs; a NIC's rate
//! limits where the host enforces them (`limits`: a `tbf` qdisc on the TAP,
//! an nft `limit` object and map element). [`Datapath`]
//! makes and removes a NIC's objects and rebuilds everything from a list
//! (the store's leases) at start. It knows nothing of VMs beyond that list:
//! the core decides, this module does.
//!
//! Everything it touches is its own: links whose alias starts with
//! [`ALIAS_PREFIX`], the gateway device, the table. Nothing else is read
//! for a decision or changed.

mod config;
mod limits;
mod links;
mod nft;
mod reap;
mod types;

use std::net::IpAddr;
use std::sync::Arc;

pub use config::NetSettings;
pub use links::TAP_GATEWAY6;
pub use types::{Bucket, NetError, NicCounters, NicLimits, NicWiring, PortWiring};

use tokio::sync::Mutex;

/// Alias prefix of every TAP metald makes: `metald:<vm host id>:<nic id>`.
pub const ALIAS_PREFIX: &str = "metald:";
/// Alias of the gateway device.
const GATEWAY_ALIAS: &str = "metald-gateway";

/// What [`Datapath::rebuild`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub taps_removed: usize,
    pub taps_created: usize,
    pub nics: usize,
}

/// The kernel datapath of managed NICs.
pub struct Datapath {
    settings: NetSettings,
    handle: rtnetlink::Handle,
    /// Serialises nft transactions and link changes of NICs and a
    /// rebuild.
    lock: Arc<Mutex<()>>,
    /// Removed NICs whose set elements are still in the table.
    stale: Arc<reap::Stale>,
    /// Removal off the caller's path, in batches (see [`Datapath::remove`]).
    reaper: reap::Reaper,
}

impl Datapath {
    /// Checks that networking can work here (root or `CAP_NET_ADMIN`,
    /// `/dev/net/tun`, the `nft` and `tc` binaries, IPv6 forwarding that would not
    /// cost the host its router-advertised routes), makes the gateway
    /// device and sets forwarding on. Idempotent; changes nothing when it
    /// refuses.
    pub async fn start(settings: NetSettings) -> Result<Arc<Datapath>, NetError> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(NetError::Unavailable {
                why: "/dev/net/tun does not exist".into(),
                fix: "load the tun module (modprobe tun) or set UNKEY_METALD_NETWORK_ENABLED=false".into(),
            });
        }
        match tokio::process::Command::new(&settings.nft).arg("--version").kill_on_drop(true).output().await {
            Ok(o) if o.status.success() => {}
            _ => {
                return Err(NetError::Unavailable {
                    why: format!("the nftables tool {:?} cannot be run", settings.nft),
                    fix: "install it (apt-get install nftables) or set UNKEY_METALD_NETWORK_NFT".into(),
                });
            }
        }
        // Rate limits of QEMU's NICs need it: found out now, not at the
        // first VM that asks for one.
        match tokio::process::Command::new(&settings.tc).arg("-V").kill_on_drop(true).output().await {
            Ok(o) if o.status.success() => {}
            _ => {
                return Err(NetError::Unavailable {
                    why: format!("the traffic control tool {:?} cannot be run", settings.tc),
                    fix: "install it (apt-get install iproute2) or set UNKEY_METALD_NETWORK_TC".into(),
                });
            }
        }
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::Kernel("opening a netlink socket".into(), e))?;
        tokio::spawn(conn);
        let (lock, stale) = (Arc::new(Mutex::new(())), Arc::new(reap::Stale::default()));
        let reaper = reap::Reaper::start(settings.clone(), handle.clone(), lock.clone(), stale.clone());
        let dp = Datapath { settings, handle, lock, stale, reaper };
        if dp.settings.ipv6_pool.is_some() {
            dp.check_ipv6_forwarding().await?;
        }
        let gw = match links::ensure_gateway(&dp.handle, &dp.settings.gateway_device, GATEWAY_ALIAS).await {
            Ok(i) => i,
            Err(e) if e.denied() => {
                return Err(NetError::Unavailable {
                    why: e.to_string(),
                    fix: "run metald as root, or with CAP_NET_ADMIN and read-write access to /dev/net/tun, \
                          or set UNKEY_METALD_NETWORK_ENABLED=false"
                        .into(),
                });
            }
            Err(e) => return Err(e),
        };
        let pools = dp.settings.pools();
        if let Some(g) = pools.gateway4() {
            links::add_address(&dp.handle, gw, IpAddr::V4(g), 32, &dp.settings.gateway_device).await?;
        }
        if let Some(g) = pools.gateway6() {
            links::add_address(&dp.handle, gw, IpAddr::V6(g), 128, &dp.settings.gateway_device).await?;
        }
        links::sysctl("ipv4/ip_forward", "1")?;
        if dp.settings.ipv6_pool.is_some() {
            links::sysctl("ipv6/conf/all/forwarding", "1")?;
        }
        Ok(Arc::new(dp))
    }

    /// Refuses to turn IPv6 forwarding on where that would cut the host
    /// off: with forwarding on, a link whose `accept_ra` is 1 (the default)
    /// ignores router advertisements, so routes learned from them (often
    /// the host's IPv6 default route) vanish when their lifetime ends.
    /// `accept_ra=2` keeps them. Nothing to check when forwarding is on
    /// already.
    async fn check_ipv6_forwarding(&self) -> Result<(), NetError> {
        if links::sysctl_get("ipv6/conf/all/forwarding").as_deref() == Some("1") {
            return Ok(());
        }
        let at_risk: Vec<String> = links::ra_route_links(&self.handle)
            .await?
            .into_iter()
            .filter(|l| links::sysctl_get(&format!("ipv6/conf/{l}/accept_ra")).as_deref() == Some("1"))
            .collect();
        if at_risk.is_empty() {
            return Ok(());
        }
        let names = at_risk.join(", ");
        let sysctls: Vec<String> = at_risk.iter().map(|l| format!("net.ipv6.conf.{l}.accept_ra=2")).collect();
        Err(NetError::Unavailable {
            why: format!(
                "turning IPv6 forwarding on would make the kernel ignore router advertisements on {names} \
                 (accept_ra=1), and the IPv6 routes learned from them would expire"
            ),
            fix: format!(
                "set {} (keeps router advertisements with forwarding on), or UNKEY_METALD_NETWORK_IPV6_POOL=off",
                sysctls.join(" ")
            ),
        })
    }

    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }

    /// Makes `nic`'s TAP, routes, rate limits and set elements exist.
    /// Idempotent. The same nft transaction deletes the elements of NICs
    /// removed since the last one (see [`Datapath::remove`]), so none of
    /// theirs can meet a re-leased address, MAC or host port of this one.
    pub async fn add(&self, nic: &NicWiring) -> Result<(), NetError> {
        if self.reaper.has(&nic.tap) {
            // A removed NIC's TAP of this name is still queued (names are
            // random and may come back): let it go first.
            self.reaper.idle().await;
        }
        let _g = self.lock.lock().await;
        self.wire_links(nic).await?;
        limits::shape(&self.settings.tc, &[nic]).await?;
        let pending = reap::take(&self.stale);
        let script = reap::flush_script(&self.settings, &pending, &nft::elements(&self.settings, "add", &[nic]));
        // Echo (`Wait::Commit`) makes nft fetch every set's elements first
        // (~5 ms more at 1,000 NICs): worth it only when the transaction
        // deletes something, whose exit would wait for a grace period.
        let wait = if pending.is_empty() { nft::Wait::Exit } else { nft::Wait::Commit };
        if let Err(e) = nft::apply(&self.settings.nft, &script, wait).await {
            reap::put_back(&self.stale, pending);
            return Err(e);
        }
        Ok(())
    }

    /// Removes `nic`: its set elements and TAP go off the caller's path, in
    /// a batch with every NIC removed meanwhile (`reap.rs`), and in any case
    /// before the next [`Datapath::add`] commits. For the core's order of
    /// things (the hypervisor that held the TAP is gone), that is as good
    /// as at once: nothing sends or receives on the TAP any more. What a
    /// crash leaves queued, the next start's rebuild removes (the TAP's
    /// alias says it is ours, the store that it belongs to no VM). Missing
    /// is fine, and so is removing twice.
    pub async fn remove(&self, nic: &NicWiring) -> Result<(), NetError> {
        reap::mark(&self.stale, nic);
        if self.reaper.queue(nic) {
            return Ok(());
        }
        // No reaper (the runtime is shutting down): everything here.
        let _g = self.lock.lock().await;
        let pending = reap::take(&self.stale);
        nft::apply(&self.settings.nft, &reap::flush_script(&self.settings, &pending, ""), nft::Wait::Exit).await?;
        if let Some(l) = links::get(&self.handle, &nic.tap).await? {
            links::delete(&self.handle, l.index, &nic.tap).await?;
        }
        Ok(())
    }

    /// Waits until every NIC [`Datapath::remove`] queued is gone from the
    /// kernel (its elements and TAP).
    pub async fn reaped(&self) {
        self.reaper.idle().await;
    }

    /// Makes the kernel hold exactly `nics`: removes every TAP of ours that
    /// is not among them, makes or repairs theirs, and replaces the table
    /// in one transaction.
    pub async fn rebuild(&self, nics: &[NicWiring]) -> Result<RebuildReport, NetError> {
        self.reaped().await;
        let _g = self.lock.lock().await;
        // The table is replaced below: whatever was pending goes with it.
        reap::take(&self.stale);
        let mut report = RebuildReport { nics: nics.len(), ..RebuildReport::default() };
        let wanted: std::collections::HashSet<&str> = nics.iter().map(|n| n.tap.as_str()).collect();
        let strays: Vec<links::Link> = links::list(&self.handle)
            .await?
            .into_iter()
            .filter(|l| {
                l.alias.as_deref().is_some_and(|a| a.starts_with(ALIAS_PREFIX)) && !wanted.contains(l.name.as_str())
            })
            .collect();
        links::delete_many(&self.handle, &strays).await?;
        report.taps_removed = strays.len();
        for nic in nics {
            if self.wire_links(nic).await? {
                report.taps_created += 1;
            }
        }
        let all: Vec<&NicWiring> = nics.iter().collect();
        nft::apply(&self.settings.nft, &nft::rebuild_script(&self.settings, &all), nft::Wait::Exit).await?;
        limits::shape(&self.settings.tc, &all).await?;
        Ok(report)
    }

    /// The TAP and everything on it; returns whether the TAP was made.
    async fn wire_links(&self, nic: &NicWiring) -> Result<bool, NetError> {
        let h = &self.handle;
        // A TAP a running hypervisor holds cannot be attached again (EBUSY):
        // only make it when it is missing.
        let made = match links::get(h, &nic.tap).await? {
            Some(_) => false,
            None => {
                // A few non-blocking syscalls, made on this thread: it is in
                // the network namespace metald manages (a blocking-pool
                // thread need not be, in tests that unshare one).
                links::create_tap(&nic.tap, nic.owner)?;
                true
            }
        };
        let l = links::get(h, &nic.tap)
            .await?
            .ok_or_else(|| NetError::kernel(format!("creating TAP {}", nic.tap), "it vanished"))?;
        links::sysctl(&format!("ipv4/conf/{}/proxy_arp", nic.tap), "1")?;
        links::sysctl(&format!("ipv4/conf/{}/route_localnet", nic.tap), "1")?;
        links::set_up(h, l.index, &nic.tap, &nic.alias).await?;
        links::add_address(h, l.index, IpAddr::V6(TAP_GATEWAY6), 64, &nic.tap).await?;
        if let Some(a) = nic.ipv4 {
            links::add_host_route(h, l.index, IpAddr::V4(a), &nic.tap).await?;
        }
        if let Some(a) = nic.ipv6 {
            links::add_host_route(h, l.index, IpAddr::V6(a), &nic.tap).await?;
        }
        Ok(made)
    }

    /// Counters of every TAP of ours from the guest's side (the TAP's
    /// transmit is the guest's receive), from one read of
    /// `/proc/thread-self/net/dev` (this thread's namespace): no netlink or
    /// hypervisor round trip.
    pub fn counters(&self) -> std::collections::HashMap<String, NicCounters> {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
        parse_net_dev(&text)
    }

    /// Rules in the table now (constant in the number of NICs).
    pub async fn rule_count(&self) -> Result<usize, NetError> {
        nft::rule_count(&self.settings).await
    }

    /// Names of the TAPs of ours that exist now.
    pub async fn taps(&self) -> Result<Vec<String>, NetError> {
        Ok(links::list(&self.handle)
            .await?
            .into_iter()
            .filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with(ALIAS_PREFIX)))
            .map(|l| l.name)
            .collect())
    }
}

/// `/proc/net/dev` rows of TAPs named `mt-*`, guest's side.
fn parse_net_dev(text: &str) -> std::collections::HashMap<String, NicCounters> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let name = name.trim();
        if !name.starts_with("mt-") {
            continue;
        }
        let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 10 {
            out.insert(
                name.to_owned(),
                NicCounters { rx_bytes: v[8], rx_packets: v[9], tx_bytes: v[0], tx_packets: v[1] },
            );
        }
    }
    out
}

/// Parses `02:00:00:00:00:0a`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_rows_are_read_from_the_guests_side() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
mt-0000000a:   5000      50    0    0    0     0          0         0     7000      70    0    0    0     0       0          0
";
        let c = parse_net_dev(text);
        assert_eq!(c.len(), 1);
        assert_eq!(c["mt-0000000a"], NicCounters { rx_bytes: 7000, rx_packets: 70, tx_bytes: 5000, tx_packets: 50 });
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:0b"), None);
    }
}
