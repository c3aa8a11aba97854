//! The datapath's vocabulary: what one managed NIC needs of the kernel
//! ([`NicWiring`], its rate limits [`NicLimits`]), its counters, and
//! [`NetError`].

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::model::net::Proto;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Networking cannot work on this host; `fix` says what to do.
    #[error("{why}; {fix}")]
    Unavailable { why: String, fix: String },
    /// What was being done, and the kernel's answer (an errno where the
    /// kernel gave one: [`NetError::denied`] looks at it).
    #[error("{0}: {1}")]
    Kernel(String, std::io::Error),
    #[error("{0}")]
    Nft(String),
    /// The `tc` binary failed (rate limits, `limits`).
    #[error("{0}")]
    Tc(String),
}

impl NetError {
    /// A kernel call refused for lack of privilege (EPERM, EACCES): metald
    /// is not root and lacks `CAP_NET_ADMIN`, or cannot open
    /// `/dev/net/tun`.
    pub fn denied(&self) -> bool {
        matches!(self, NetError::Kernel(_, e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)))
    }

    /// A kernel error that is not an errno.
    pub(super) fn kernel(what: impl Into<String>, detail: impl Into<String>) -> NetError {
        NetError::Kernel(what.into(), std::io::Error::other(detail.into()))
    }
}

/// A host port forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortWiring {
    pub proto: Proto,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A token bucket: `rate` bytes per second, at most `depth` bytes at once
/// (made from a spec's `RateLimit` and turned into kernel parameters in
/// `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub rate: u64,
    pub depth: u64,
}

/// A NIC's limits as the host enforces them: rx (to the guest), tx (from
/// it). Both `None`: nothing is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicLimits {
    pub rx: Option<Bucket>,
    pub tx: Option<Bucket>,
}

/// One managed NIC: everything the kernel needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicWiring {
    /// `mt-` + 8 hex digits.
    pub tap: String,
    /// `metald:<vm host id>:<nic id>`.
    pub alias: String,
    pub guest_mac: [u8; 6],
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// A clone's in-guest addresses, which `ipv4`/`ipv6` are mapped to.
    pub inner: crate::model::net::InGuest,
    /// The VM's customer's isolation tag.
    pub tag: u32,
    pub ports: Vec<PortWiring>,
    /// uid/gid that must be able to open the TAP (a jailed hypervisor);
    /// root when `None`.
    pub owner: Option<(u32, u32)>,
    /// Rate limits the host enforces on the TAP (none when the hypervisor
    /// enforces them itself).
    pub limits: NicLimits,
}

/// Bytes and packets of a NIC, from the guest's side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_is_eperm_or_eacces_from_the_kernel() {
        let k = |errno| NetError::Kernel("x".into(), std::io::Error::from_raw_os_error(errno));
        assert!(k(libc::EPERM).denied() && k(libc::EACCES).denied());
        assert!(!k(libc::EBUSY).denied());
        assert!(!NetError::kernel("x", "Operation not permitted").denied(), "text is not an errno");
        assert!(!NetError::Nft("Operation not permitted".into()).denied());
        assert_eq!(k(libc::EPERM).to_string(), "x: Operation not permitted (os error 1)");
    }
}
