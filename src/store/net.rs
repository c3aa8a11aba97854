//! Network leases: what metald-managed NICs hold (TAP name, MAC, IPv4 and
//! IPv6 address, host ports) and each customer's isolation tag.
//!
//! Leases are handed out in the transaction that writes a VM's `create`
//! intent, before any kernel object exists (so the kernel state can always
//! be derived from here), kept while the VM exists and released in the
//! transaction that deletes it (or rolls its create back). Unique
//! constraints on TAP, addresses and `(protocol, host port)` make a double
//! lease impossible; the lowest free address or port is taken.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Intent, Result, Store, StoreError, release_net as release};
use crate::model::VmId;
use crate::model::net::{InGuest, NetLease, NicLease, NicRates, NicRequest, Pools, PortLease, Proto, Want};

impl Store {
    /// Writes `intent` (a create) and leases what `nics` ask for, in one
    /// transaction. Refuses with [`StoreError::Exhausted`] when a pool has
    /// nothing left and [`StoreError::Taken`] when an address or host port
    /// asked for by name is another VM's; then nothing is written.
    pub fn begin_create(&self, intent: &Intent, nics: &[NicRequest], pools: &Pools) -> Result<NetLease> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO intents (vm_id, customer_id, op, started_at) VALUES (?1, ?2, ?3, ?4)",
                params![intent.vm_id.as_str(), intent.customer.0, intent.op, intent.started_at],
            )?;
            // Leftovers of an earlier create of this host id that a crash
            // interrupted are this create's to replace.
            release(&tx, &intent.vm_id)?;
            let lease = if nics.is_empty() { NetLease::default() } else { lease(&tx, intent, nics, pools)? };
            tx.commit()?;
            Ok(lease)
        })
    }

    /// Ends a create that did not happen: its intent and its leases go.
    pub fn abort_create(&self, id: &VmId) -> Result<()> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM intents WHERE vm_id = ?1", params![id.as_str()])?;
            release(&tx, id)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Every VM's leases (host id → lease), VMs and creates in progress
    /// alike: the kernel state metald derives at start.
    pub fn net_leases(&self) -> Result<BTreeMap<VmId, NetLease>> {
        let conn = self.conn();
        let mut out: BTreeMap<VmId, NetLease> = BTreeMap::new();
        let mut stmt = conn.prepare(
            "SELECT vm_id, nic_id, tag, tap, mac, ipv4, ipv6, rates, inner FROM net_nics ORDER BY vm_id, nic_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?;
        for row in rows {
            let (vm, nic_id, tag, tap, mac, v4, v6, rates, inner) = row?;
            let id = VmId::parse(&vm).map_err(|e| StoreError::Corrupt(format!("net_nics: {e}")))?;
            let ipv4 = v4.map(|a| a.parse()).transpose().map_err(|e| corrupt(&vm, "ipv4", e))?;
            let ipv6 = v6.map(|a| a.parse()).transpose().map_err(|e| corrupt(&vm, "ipv6", e))?;
            let rates: NicRates = rates
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(|e| corrupt(&vm, "rates", e))?
                .unwrap_or_default();
            let inner: InGuest = inner
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(|e| corrupt(&vm, "inner", e))?
                .unwrap_or_default();
            let lease = out.entry(id).or_default();
            lease.tag = u32::try_from(tag).map_err(|e| corrupt(&vm, "tag", e))?;
            lease.nics.push(NicLease { nic_id, tap, mac, ipv4, ipv6, ports: Vec::new(), rates, inner });
        }
        let mut stmt = conn
            .prepare("SELECT vm_id, nic_id, proto, host_port, guest_port FROM net_ports ORDER BY vm_id, host_port")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (vm, nic_id, proto, host, guest) = row?;
            let id = VmId::parse(&vm).map_err(|e| StoreError::Corrupt(format!("net_ports: {e}")))?;
            let port = PortLease {
                proto: Proto::parse(&proto).ok_or_else(|| corrupt(&vm, "proto", proto.clone()))?,
                host_port: u16::try_from(host).map_err(|e| corrupt(&vm, "host_port", e))?,
                guest_port: u16::try_from(guest).map_err(|e| corrupt(&vm, "guest_port", e))?,
            };
            let nic = out
                .get_mut(&id)
                .and_then(|l| l.nics.iter_mut().find(|n| n.nic_id == nic_id))
                .ok_or_else(|| corrupt(&vm, "net_ports", format!("no NIC {nic_id}")))?;
            nic.ports.push(port);
        }
        Ok(out)
    }
}

fn corrupt(vm: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("VM {vm}: network lease {what}: {e}"))
}

fn lease(tx: &Transaction<'_>, intent: &Intent, nics: &[NicRequest], pools: &Pools) -> Result<NetLease> {
    let tag = customer_tag(tx, &intent.customer.0)?;
    let mut used4: HashSet<Ipv4Addr> = column(tx, "SELECT ipv4 FROM net_nics WHERE ipv4 IS NOT NULL")?;
    let mut used6: HashSet<Ipv6Addr> = column(tx, "SELECT ipv6 FROM net_nics WHERE ipv6 IS NOT NULL")?;
    let mut taps: HashSet<String> = column(tx, "SELECT tap FROM net_nics")?;
    let mut ports: HashSet<(Proto, u16)> = {
        let mut stmt = tx.prepare("SELECT proto, host_port FROM net_ports")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut set = HashSet::new();
        for row in rows {
            let (p, n) = row?;
            if let (Some(p), Ok(n)) = (Proto::parse(&p), u16::try_from(n)) {
                set.insert((p, n));
            }
        }
        set
    };
    let vm = intent.vm_id.as_str();
    let mut out = NetLease { tag, nics: Vec::with_capacity(nics.len()) };
    for req in nics {
        let tap = loop {
            let name = format!("mt-{:08x}", rand::random::<u32>());
            if taps.insert(name.clone()) {
                break name;
            }
        };
        let ipv4 = match req.v4 {
            Want::No => None,
            Want::Exactly(a) if used4.contains(&a) => {
                return Err(StoreError::Taken(format!("IPv4 address {a} is leased to another VM")));
            }
            Want::Exactly(a) => Some(a),
            Want::Any => Some(pools.leasable4().find(|a| !used4.contains(a)).ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "the IPv4 pool {} has no free address (UNKEY_METALD_NETWORK_IPV4_POOL)",
                    pools.v4.map_or_else(|| "(none)".into(), |n| n.to_string())
                ))
            })?),
        };
        let ipv6 = match req.v6 {
            Want::No => None,
            Want::Exactly(a) if used6.contains(&a) => {
                return Err(StoreError::Taken(format!("IPv6 address {a} is leased to another VM")));
            }
            Want::Exactly(a) => Some(a),
            Want::Any => Some(pools.leasable6().find(|a| !used6.contains(a)).ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "the IPv6 pool {} has no free address (UNKEY_METALD_NETWORK_IPV6_POOL)",
                    pools.v6.map_or_else(|| "(none)".into(), |n| n.to_string())
                ))
            })?),
        };
        used4.extend(ipv4);
        used6.extend(ipv6);
        let mut leased = Vec::with_capacity(req.ports.len());
        for p in &req.ports {
            let host_port = if p.host_port != 0 {
                if !ports.insert((p.proto, p.host_port)) {
                    return Err(StoreError::Taken(format!(
                        "host port {}/{} is mapped to another VM",
                        p.host_port, p.proto
                    )));
                }
                p.host_port
            } else {
                let free = pools.ports.clone().find(|n| !ports.contains(&(p.proto, *n))).ok_or_else(|| {
                    StoreError::Exhausted(format!(
                        "no {} host port is free in {}-{} (UNKEY_METALD_NETWORK_PORT_RANGE)",
                        p.proto,
                        pools.ports.start(),
                        pools.ports.end()
                    ))
                })?;
                ports.insert((p.proto, free));
                free
            };
            tx.execute(
                "INSERT INTO net_ports (proto, host_port, vm_id, nic_id, guest_port) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.proto.as_str(), host_port, vm, req.nic_id, p.guest_port],
            )?;
            leased.push(PortLease { proto: p.proto, host_port, guest_port: p.guest_port });
        }
        let rates = if req.rates.is_none() {
            None
        } else {
            Some(serde_json::to_string(&req.rates).map_err(|e| StoreError::Corrupt(format!("VM {vm}: rates: {e}")))?)
        };
        let inner = if req.inner.is_none() {
            None
        } else {
            Some(serde_json::to_string(&req.inner).map_err(|e| StoreError::Corrupt(format!("VM {vm}: inner: {e}")))?)
        };
        tx.execute(
            "INSERT INTO net_nics (vm_id, nic_id, tag, tap, mac, ipv4, ipv6, rates, inner) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                vm,
                req.nic_id,
                tag,
                tap,
                req.mac,
                ipv4.map(|a| a.to_string()),
                ipv6.map(|a| a.to_string()),
                rates,
                inner
            ],
        )?;
        out.nics.push(NicLease {
            nic_id: req.nic_id.clone(),
            tap,
            mac: req.mac.clone(),
            ipv4,
            ipv6,
            ports: leased,
            rates: req.rates,
            inner: req.inner,
        });
    }
    Ok(out)
}

/// The customer's isolation tag, made the first time it is needed.
fn customer_tag(tx: &Transaction<'_>, customer: &str) -> Result<u32> {
    let have: Option<i64> =
        tx.query_row("SELECT tag FROM net_tags WHERE customer_id = ?1", params![customer], |r| r.get(0)).optional()?;
    let tag = match have {
        Some(t) => t,
        None => {
            let next: i64 = tx.query_row("SELECT COALESCE(MAX(tag), 0) + 1 FROM net_tags", [], |r| r.get(0))?;
            tx.execute("INSERT INTO net_tags (customer_id, tag) VALUES (?1, ?2)", params![customer, next])?;
            next
        }
    };
    u32::try_from(tag).map_err(|e| StoreError::Corrupt(format!("net_tags: customer {customer}: {e}")))
}

/// One text column parsed into a set (unparsable values are skipped: the
/// unique constraint still guards them).
fn column<T: std::str::FromStr + std::hash::Hash + Eq>(tx: &Transaction<'_>, sql: &str) -> Result<HashSet<T>> {
    let mut stmt = tx.prepare(sql)?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut set = HashSet::new();
    for row in rows {
        if let Ok(v) = row?.parse() {
            set.insert(v);
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::CustomerId;
    use crate::model::net::PortRequest;

    fn intent(id: &str, customer: &str) -> Intent {
        Intent {
            vm_id: VmId::parse(id).unwrap(),
            customer: CustomerId(customer.into()),
            op: "create".into(),
            started_at: 1,
        }
    }

    fn nic(id: &str) -> NicRequest {
        NicRequest {
            nic_id: id.into(),
            mac: "02:00:00:00:00:01".into(),
            v4: Want::Any,
            v6: Want::Any,
            ports: vec![],
            rates: NicRates::default(),
            inner: Default::default(),
        }
    }

    fn pools() -> Pools {
        Pools { v4: Some("10.9.0.0/29".parse().unwrap()), v6: Some("fd00::/64".parse().unwrap()), ports: 100..=101 }
    }

    #[test]
    fn leases_are_lowest_free_unique_and_released_with_the_vm() {
        let s = Store::open_in_memory().unwrap();
        let p = pools();
        let a = s.begin_create(&intent("a", "c1"), &[nic("eth0"), nic("eth1")], &p).unwrap();
        let b = s.begin_create(&intent("b", "c2"), &[nic("eth0")], &p).unwrap();
        let c = s.begin_create(&intent("c", "c1"), &[nic("eth0")], &p).unwrap();
        let v4: Vec<String> =
            [&a.nics[0], &a.nics[1], &b.nics[0], &c.nics[0]].iter().map(|n| n.ipv4.unwrap().to_string()).collect();
        assert_eq!(v4, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5"]);
        assert_eq!(a.nics[0].ipv6.unwrap().to_string(), "fd00::2");
        assert_eq!(a.tag, c.tag, "one customer, one tag");
        assert_ne!(a.tag, b.tag);
        assert!(a.nics.iter().all(|n| n.tap.len() == 11 && n.tap.starts_with("mt-")));
        assert_ne!(a.nics[0].tap, a.nics[1].tap);
        // What is stored reads back the same (a restart).
        let all = s.net_leases().unwrap();
        assert_eq!(all[&VmId::parse("a").unwrap()], a);
        assert_eq!(all.len(), 3);
        // Released with the VM: the address is handed out again.
        s.delete(&VmId::parse("b").unwrap()).unwrap();
        let d = s.begin_create(&intent("d", "c3"), &[nic("eth0")], &p).unwrap();
        assert_eq!(d.nics[0].ipv4.unwrap().to_string(), "10.9.0.4");
        // A rolled-back create releases too.
        s.abort_create(&VmId::parse("d").unwrap()).unwrap();
        assert!(!s.net_leases().unwrap().contains_key(&VmId::parse("d").unwrap()));
        assert!(s.intents().unwrap().iter().all(|i| i.vm_id.as_str() != "d"));
    }

    #[test]
    fn rate_limits_are_kept_with_the_lease() {
        let s = Store::open_in_memory().unwrap();
        let rl = crate::model::RateLimit { bandwidth: 65536, refill_time_ms: 100, burst: 0 };
        let mut limited = nic("eth0");
        limited.rates = NicRates { rx: Some(rl), tx: None };
        let l = s.begin_create(&intent("a", "c1"), &[limited, nic("eth1")], &pools()).unwrap();
        assert_eq!(l.nics[0].rates.rx, Some(rl));
        assert!(l.nics[1].rates.is_none());
        // Read back at start, as written (rebuilding the host's limits).
        assert_eq!(s.net_leases().unwrap()[&VmId::parse("a").unwrap()], l);
    }

    #[test]
    fn exhaustion_and_taken_leases_refuse_and_write_nothing() {
        let s = Store::open_in_memory().unwrap();
        let p = pools();
        for i in 0..5 {
            s.begin_create(&intent(&format!("v{i}"), "c1"), &[nic("eth0")], &p).unwrap();
        }
        let e = s.begin_create(&intent("full", "c1"), &[nic("eth0")], &p).unwrap_err();
        assert!(matches!(&e, StoreError::Exhausted(m) if m.contains("10.9.0.0/29")), "{e}");
        assert!(s.intents().unwrap().iter().all(|i| i.vm_id.as_str() != "full"), "nothing written");
        assert_eq!(s.write_health().errors, 0, "a refusal is not a write failure");
        let mut fixed = nic("eth0");
        fixed.v4 = Want::Exactly("10.9.0.3".parse().unwrap());
        let e = s.begin_create(&intent("x", "c1"), &[fixed], &p).unwrap_err();
        assert!(matches!(&e, StoreError::Taken(m) if m.contains("10.9.0.3")), "{e}");
        // IPv6-only still fits; ports: explicit, allocated, then none left.
        let port = |host_port| PortRequest { proto: Proto::Tcp, host_port, guest_port: 80 };
        let mut v6 = nic("eth0");
        v6.v4 = Want::No;
        v6.ports = vec![port(101), port(0)];
        let l = s.begin_create(&intent("six", "c2"), &[v6.clone()], &p).unwrap();
        assert_eq!(l.nics[0].ipv4, None);
        let hosts: Vec<u16> = l.nics[0].ports.iter().map(|p| p.host_port).collect();
        assert_eq!(hosts, [101, 100]);
        v6.ports = vec![port(0)];
        let e = s.begin_create(&intent("seven", "c2"), &[v6.clone()], &p).unwrap_err();
        assert!(matches!(&e, StoreError::Exhausted(m) if m.contains("100-101")), "{e}");
        v6.ports = vec![PortRequest { proto: Proto::Udp, host_port: 101, guest_port: 53 }];
        s.begin_create(&intent("udp", "c2"), &[v6.clone()], &p).unwrap();
        let e = s.begin_create(&intent("udp2", "c2"), &[v6], &p).unwrap_err();
        assert!(matches!(&e, StoreError::Taken(m) if m.contains("101/udp")), "{e}");
    }
}
