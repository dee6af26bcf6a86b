//! Risk-control plugin: token-bucket rate limits per user (sends) and per IP (logins), and
//! detection of the same message repeated by one user. State lives in the plugin's KV
//! store, so limits hold across instances, restarts and upgrades.

use im_plugin_sdk::risk::{RiskControl, RiskEvent, RiskVerdict, Throttle};
use im_plugin_sdk::{CallContext, clock, config, kv};

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
}

/// The bucket state after taking one token at `now_ms`, or how long to wait.
/// State is encoded as "<tokens>:<updated_ms>".
pub fn take(bucket: Bucket, state: Option<&str>, now_ms: i64) -> Result<String, u64> {
    let (tokens, updated) = state
        .and_then(|s| s.split_once(':'))
        .and_then(|(t, u)| Some((t.parse::<f64>().ok()?, u.parse::<i64>().ok()?)))
        .unwrap_or((bucket.burst, now_ms));
    let elapsed_s = (now_ms - updated).max(0) as f64 / 1000.0;
    let available = (tokens + elapsed_s * bucket.rate).min(bucket.burst);
    if available >= 1.0 {
        Ok(format!("{}:{now_ms}", available - 1.0))
    } else {
        let missing = 1.0 - available;
        Err(((missing / bucket.rate) * 1000.0).ceil() as u64)
    }
}

/// Takes a token from the bucket stored at `key`, atomically across instances.
fn take_from_kv(key: &str, bucket: Bucket) -> Result<(), u64> {
    // Idle buckets refill to full in burst/rate seconds; keep them a little longer.
    let ttl_ms = ((bucket.burst / bucket.rate) * 1000.0) as u64 + 1000;
    for _ in 0..16 {
        let now = clock::now_ms();
        let current = kv::get(key);
        let state = current.as_deref().and_then(|b| std::str::from_utf8(b).ok());
        let next = take(bucket, state, now)?;
        match kv::compare_and_swap(key, current.as_deref(), Some(next.as_bytes()), Some(ttl_ms)) {
            Ok(true) => return Ok(()),
            Ok(false) => continue,
            // Out of KV space: fail closed for this request rather than let floods through.
            Err(_) => return Err(1000),
        }
    }
    Err(100)
}

fn bucket(rate_key: &str, burst_key: &str, rate: &str, burst: &str) -> Bucket {
    let rate = config::get_or(rate_key, rate)
        .parse()
        .unwrap_or(1.0f64)
        .max(0.001);
    let burst = config::get_or(burst_key, burst)
        .parse()
        .unwrap_or(1.0f64)
        .max(1.0);
    Bucket { rate, burst }
}

/// FNV-1a: a stable, cheap fingerprint of a body for repeat detection.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

struct Limits;

impl RiskControl for Limits {
    fn assess(ctx: &CallContext, event: RiskEvent<'_>) -> RiskVerdict {
        match event {
            RiskEvent::Send(message) => {
                let sender = message.sender();
                let user = &sender.user_id;
                let limit = bucket("send_rate", "send_burst", "20", "40");
                if let Err(retry_after_ms) = take_from_kv(&format!("send:{user}"), limit) {
                    return RiskVerdict::Throttle(Throttle {
                        retry_after_ms,
                        reason: format!("user {user} sends faster than {} messages/s", limit.rate),
                    });
                }
                let repeat_limit: i64 = config::get_or("repeat_limit", "5").parse().unwrap_or(5);
                let window: u64 = config::get_or("repeat_window_ms", "60000")
                    .parse()
                    .unwrap_or(60_000);
                let key = format!("repeat:{user}:{:016x}", fingerprint(&message.body()));
                match kv::increment(&key, 1, Some(window)) {
                    Ok(count) if count > repeat_limit => RiskVerdict::Block(format!(
                        "the same message was sent {count} times within {} s",
                        window / 1000
                    )),
                    _ => RiskVerdict::Allow,
                }
            }
            RiskEvent::Login(attempt) => {
                let Some(ip) = ctx.remote_ip() else {
                    return RiskVerdict::Allow;
                };
                let limit = bucket("login_rate", "login_burst", "5", "20");
                match take_from_kv(&format!("login:{ip}"), limit) {
                    Ok(()) => RiskVerdict::Allow,
                    Err(retry_after_ms) => RiskVerdict::Throttle(Throttle {
                        retry_after_ms,
                        reason: format!("too many logins from {ip} (last for {})", attempt.user_id),
                    }),
                }
            }
        }
    }
}

im_plugin_sdk::export_risk_control!(Limits);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refills_at_the_rate() {
        let b = Bucket {
            rate: 2.0,
            burst: 3.0,
        };
        let mut state: Option<String> = None;
        for _ in 0..3 {
            state = Some(take(b, state.as_deref(), 0).unwrap());
        }
        // Empty: one token takes 500 ms at 2/s.
        assert_eq!(take(b, state.as_deref(), 0), Err(500));
        assert_eq!(take(b, state.as_deref(), 250), Err(250));
        assert!(take(b, state.as_deref(), 500).is_ok());
    }

    #[test]
    fn fingerprints_differ_for_different_bodies() {
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
        assert_eq!(fingerprint(b"same"), fingerprint(b"same"));
    }
}
