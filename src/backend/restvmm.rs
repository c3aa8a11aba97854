//! What the VMMs driven over a JSON REST API on a Unix socket (Firecracker,
//! Cloud Hypervisor) share, written once: the rate-limiter wire type both
//! APIs use ([`RateLimiter`], Firecracker's `RateLimiter` and Cloud
//! Hypervisor's `RateLimiterConfig`) and its conversion from the spec's
//! [`RateLimit`].

use serde::{Deserialize, Serialize};

use crate::core::spec::RateLimit;

/// `RateLimiter` (Firecracker) / `RateLimiterConfig` (Cloud Hypervisor):
/// independent bytes/s and ops/s token buckets, the same JSON in both APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ops: Option<TokenBucket>,
}

/// `TokenBucket`: `size` tokens refilled every `refill_time` ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl RateLimiter {
    /// A bandwidth limiter from metald's `RateLimit` (bytes per second,
    /// refill period in ms, initial burst in bytes); `None` when unlimited.
    pub fn from_spec(rl: Option<&RateLimit>) -> Option<RateLimiter> {
        let rl = rl?;
        let bandwidth = u64::try_from(rl.bandwidth).ok().filter(|b| *b > 0)?;
        let refill_time = u64::try_from(rl.refill_time_ms).ok().filter(|r| *r > 0).unwrap_or(1000);
        let size = u64::try_from(u128::from(bandwidth) * u128::from(refill_time) / 1000).unwrap_or(u64::MAX).max(1);
        let one_time_burst = u64::try_from(rl.burst).ok().filter(|b| *b > 0);
        Some(RateLimiter { bandwidth: Some(TokenBucket { size, one_time_burst, refill_time }), ops: None })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rate_limits_become_one_bandwidth_bucket() {
        let rl = |bandwidth, refill_time_ms, burst| RateLimit { bandwidth, refill_time_ms, burst };
        let json = |r: &RateLimit| serde_json::to_value(RateLimiter::from_spec(Some(r))).unwrap();
        assert_eq!(
            json(&rl(1_000_000, 100, 4096)),
            json!({"bandwidth": {"size": 100_000, "one_time_burst": 4096, "refill_time": 100}})
        );
        assert_eq!(json(&rl(2_000_000, 0, 0)), json!({"bandwidth": {"size": 2_000_000, "refill_time": 1000}}));
        assert_eq!(json(&rl(1, 10, 0)), json!({"bandwidth": {"size": 1, "refill_time": 10}}), "at least one token");
        assert_eq!(RateLimiter::from_spec(Some(&rl(0, 100, 5))), None);
        assert_eq!(RateLimiter::from_spec(None), None);
    }
}
