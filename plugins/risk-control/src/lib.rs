//! Risk-control plugin: token-bucket rate limits per user (sends) and per IP (logins), and
//! detection of the same message repeated by one user. State lives in the plugin's KV
//! store, so limits hold across instances, restarts and upgrades: a user's send state is
//! the one the host keeps per sender for `send-screen` (handed in with each send and
//! handed back, no host call and no handle lent), a login bucket an entry the plugin reads
//! and swaps itself.

use im_plugin_sdk::risk::{RiskControl, RiskEvent, RiskVerdict, Throttle};
use im_plugin_sdk::send_screen::{
    Assessment, SendFacts, SendScreen, SendVerdict, StateChange, StateWrite,
    Throttle as SendThrottle,
};
use im_plugin_sdk::{CallContext, clock, config, current, kv};

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
}

/// The bucket state after taking one token at `now_ms`, or how long to wait.
/// State is encoded as "<tokens>:<updated_ms>".
pub fn take(bucket: Bucket, state: Option<&str>, now_ms: i64) -> Result<String, u64> {
    let state = state
        .and_then(|s| s.split_once(':'))
        .and_then(|(t, u)| Some((t.parse::<f64>().ok()?, u.parse::<i64>().ok()?)));
    let tokens = take_token(bucket, state, now_ms)?;
    Ok(format!("{tokens}:{now_ms}"))
}

/// A user's send state, one KV entry: the send bucket (tokens as `f64`, last update in ms
/// as `i64`, both little-endian) followed by the repeat ring ([`count_repeat`]'s state).
/// One state means one value carried in and out of each check, where the bucket and the
/// ring in KV entries of their own took two reads and two swaps.
const SEND_HEADER: usize = 16;

/// Assesses one send in the user's state `state` at `now_ms`: takes a token from `bucket`
/// (or says how long to wait) and counts the body's repeats under `repeats`. Returns the
/// new state, written over the old one in place (no second buffer to allocate, fill and
/// free), and the body's count within its window.
pub fn assess_send(
    state: Option<Vec<u8>>,
    bucket: Bucket,
    fingerprint: u64,
    now_ms: i64,
    repeats: Repeats,
) -> Result<(Vec<u8>, u32), u64> {
    let mut state = state
        .filter(|state| state.len() >= SEND_HEADER)
        .unwrap_or_default();
    let header = (!state.is_empty()).then(|| {
        let tokens = f64::from_le_bytes(state[0..8].try_into().expect("8 bytes"));
        let updated = i64::from_le_bytes(state[8..16].try_into().expect("8 bytes"));
        (tokens, updated)
    });
    let tokens = take_token(bucket, header, now_ms)?;
    if state.is_empty() {
        state.reserve_exact(SEND_HEADER + SEEN_BYTES);
        state.resize(SEND_HEADER, 0);
    }
    state[0..8].copy_from_slice(&tokens.to_le_bytes());
    state[8..16].copy_from_slice(&now_ms.to_le_bytes());
    let kept = kept_range(state.len() - SEND_HEADER, repeats.slots);
    state.truncate(SEND_HEADER + kept.end);
    if kept.start > 0 {
        state.drain(SEND_HEADER..SEND_HEADER + kept.start);
    }
    let count = count_in_ring(&mut state, SEND_HEADER, fingerprint, now_ms, repeats);
    Ok((state, count))
}

/// The tokens left after taking one at `now_ms` from a bucket last at `state` (tokens,
/// updated ms; `None`: full), or how long to wait for one.
fn take_token(bucket: Bucket, state: Option<(f64, i64)>, now_ms: i64) -> Result<f64, u64> {
    let (tokens, updated) = state.unwrap_or((bucket.burst, now_ms));
    let elapsed_s = (now_ms - updated).max(0) as f64 / 1000.0;
    let available = (tokens + elapsed_s * bucket.rate).min(bucket.burst);
    if available >= 1.0 {
        Ok(available - 1.0)
    } else {
        let missing = 1.0 - available;
        Err(((missing / bucket.rate) * 1000.0).ceil() as u64)
    }
}

/// How long an idle bucket is kept: it refills to full in burst/rate seconds, and a little
/// longer.
fn refill_ttl_ms(bucket: Bucket) -> u64 {
    ((bucket.burst / bucket.rate) * 1000.0) as u64 + 1000
}

/// Replaces the value at `key` with what `next` makes of it at the current time, atomically
/// across instances (retrying when another instance got there first), and returns what
/// `next` returned beside the value. `Err(wait ms)` from `next` is returned as it is; out of
/// KV space, the request fails closed (wait 1 s) rather than let floods through.
fn update_in_kv<T>(
    key: &str,
    ttl_ms: u64,
    mut next: impl FnMut(Option<&[u8]>, i64) -> Result<(Vec<u8>, T), u64>,
) -> Result<T, u64> {
    for _ in 0..16 {
        let current = kv::get(key);
        let (value, answer) = next(current.as_deref(), clock::now_ms())?;
        match kv::compare_and_swap(key, current.as_deref(), Some(&value), Some(ttl_ms)) {
            Ok(true) => return Ok(answer),
            Ok(false) => continue,
            Err(_) => return Err(1000),
        }
    }
    Err(100)
}

/// Takes a token from the bucket stored at `key`.
fn take_from_kv(key: &str, bucket: Bucket) -> Result<(), u64> {
    update_in_kv(key, refill_ttl_ms(bucket), |state, now| {
        let state = state.and_then(|b| std::str::from_utf8(b).ok());
        Ok((take(bucket, state, now)?.into_bytes(), ()))
    })
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

/// How repeats of one body are counted: within `window_ms` of its first sending, among
/// the `slots` distinct bodies a user sent most recently.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Repeats {
    pub window_ms: i64,
    pub slots: usize,
}

/// Distinct recent bodies remembered per user unless configured (`repeat_slots`). One KV
/// entry per user holds them all (a key per body would write a new row for nearly every
/// message), and every check moves that entry across the sandbox, in with the call and out
/// with the answer: 16 slots make it 336 bytes. Measured when a check moved it three times
/// (read, and a swap's expected and new values): with 64 slots (1,296 bytes) a
/// check took 9.0-12.5 µs after an idle millisecond against 8.2-9.3 µs with 16, and 2.5
/// against 2.35 µs back to back (docs/benchmarks.md, 2026-12-07, third session, "Risk
/// control's state").
pub const DEFAULT_REPEAT_SLOTS: usize = 16;

/// The most slots `repeat_slots` may ask for.
pub const MAX_REPEAT_SLOTS: usize = 256;

/// One remembered body: fingerprint, times seen, start of its window; 20 bytes encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Seen {
    fingerprint: u64,
    count: u32,
    since_ms: i64,
}

const SEEN_BYTES: usize = 20;

/// Counts one more sending of the body with `fingerprint` at `now_ms` in a user's state
/// (`None`: nothing remembered). A body's count restarts once the window passed since its
/// first sending; beyond `repeats.slots` bodies the one remembered longest is forgotten.
/// Returns the new state and the body's count within its window.
pub fn count_repeat(
    state: Option<&[u8]>,
    fingerprint: u64,
    now_ms: i64,
    repeats: Repeats,
) -> (Vec<u8>, u32) {
    let ring = state.unwrap_or_default();
    let kept = &ring[kept_range(ring.len(), repeats.slots)];
    let mut next = Vec::with_capacity(kept.len() + SEEN_BYTES);
    next.extend_from_slice(kept);
    let count = count_in_ring(&mut next, 0, fingerprint, now_ms, repeats);
    (next, count)
}

/// Where the newest `slots` whole slots lie in a ring of `ring_len` bytes (kept oldest
/// first): a ring written under a larger `repeat_slots` loses its oldest bodies, not its
/// latest, and a partial slot is dropped.
fn kept_range(ring_len: usize, slots: usize) -> std::ops::Range<usize> {
    let whole = ring_len / SEEN_BYTES;
    whole.saturating_sub(slots) * SEEN_BYTES..whole * SEEN_BYTES
}

/// The little-endian u64 at `at` in `bytes`.
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads slot `slot` of the ring starting at `start`.
fn seen_at(state: &[u8], start: usize, slot: usize) -> Seen {
    let at = start + slot * SEEN_BYTES;
    let c = &state[at..at + SEEN_BYTES];
    Seen {
        fingerprint: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
        count: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
        since_ms: i64::from_le_bytes(c[12..20].try_into().expect("8 bytes")),
    }
}

/// Writes `seen` into slot `slot` of the ring starting at `start`, one past the end
/// appending a slot.
fn put_seen(state: &mut Vec<u8>, start: usize, slot: usize, seen: Seen) {
    let at = start + slot * SEEN_BYTES;
    if at == state.len() {
        state.resize(at + SEEN_BYTES, 0);
    }
    let c = &mut state[at..at + SEEN_BYTES];
    c[0..8].copy_from_slice(&seen.fingerprint.to_le_bytes());
    c[8..12].copy_from_slice(&seen.count.to_le_bytes());
    c[12..20].copy_from_slice(&seen.since_ms.to_le_bytes());
}

/// Counts the body with `fingerprint` in the ring that fills `state` from `start`, in
/// place. The ring is kept oldest first: a body's count restarts at one, as the newest,
/// once its window has passed; a new body is added at the end, and the oldest is forgotten
/// when its window has passed or the ring is full. So only fingerprints are
/// compared: most bodies are new (every time-stamped payload is), and a pass that also
/// looked for a free and the oldest slot among all of them cost 2,400 more of the call's
/// 25,600 instructions (callgrind over hook_bench).
fn count_in_ring(
    state: &mut Vec<u8>,
    start: usize,
    fingerprint: u64,
    now_ms: i64,
    repeats: Repeats,
) -> u32 {
    let window_ms = repeats.window_ms;
    let slots = (state.len() - start) / SEEN_BYTES;
    let found = state[start..start + slots * SEEN_BYTES]
        .chunks_exact(SEEN_BYTES)
        .position(|slot| u64_at(slot, 0) == fingerprint);
    let forget = match found {
        Some(slot) => {
            let seen = seen_at(state, start, slot);
            if now_ms - seen.since_ms < window_ms {
                let count = seen.count.saturating_add(1);
                put_seen(state, start, slot, Seen { count, ..seen });
                return count;
            }
            Some(slot)
        }
        None if slots == 0 => None,
        None => {
            let oldest_expired = now_ms - seen_at(state, start, 0).since_ms >= window_ms;
            (slots >= repeats.slots || oldest_expired).then_some(0)
        }
    };
    if let Some(slot) = forget {
        let at = start + slot * SEEN_BYTES;
        state.drain(at..at + SEEN_BYTES);
    }
    let newest = (state.len() - start) / SEEN_BYTES;
    let seen = Seen {
        fingerprint,
        count: 1,
        since_ms: now_ms,
    };
    put_seen(state, start, newest, seen);
    1
}

/// A window for people: whole seconds as seconds, anything else in milliseconds (a window
/// of 1,500 ms is not "1 s").
fn duration_text(ms: i64) -> String {
    if ms >= 1000 && ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// The plugin's configuration, read once per instance: an instance lives within one
/// installed version, whose configuration never changes (a new configuration is a new
/// version, with new instances), and each read is a host call.
struct Settings {
    send: Bucket,
    login: Bucket,
    repeat_limit: i64,
    repeats: Repeats,
    /// How long a user's send state is kept: the longer of the ring's window and the
    /// send bucket's refill.
    send_state_ttl_ms: u64,
}

fn settings() -> &'static Settings {
    static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
    SETTINGS.get_or_init(|| {
        let send = bucket("send_rate", "send_burst", "20", "40");
        let repeats = Repeats {
            window_ms: config::get_or("repeat_window_ms", "60000")
                .parse::<u64>()
                .map_or(60_000, |ms| i64::try_from(ms).unwrap_or(i64::MAX)),
            slots: config::get_or("repeat_slots", "")
                .parse()
                .unwrap_or(DEFAULT_REPEAT_SLOTS)
                .clamp(1, MAX_REPEAT_SLOTS),
        };
        Settings {
            send,
            login: bucket("login_rate", "login_burst", "5", "20"),
            repeat_limit: config::get_or("repeat_limit", "5").parse().unwrap_or(5),
            repeats,
            send_state_ttl_ms: u64::try_from(repeats.window_ms)
                .unwrap_or(0)
                .max(refill_ttl_ms(send)),
        }
    })
}

struct Limits;

impl SendScreen for Limits {
    fn screen_send(facts: SendFacts) -> Assessment {
        let settings = settings();
        let (limit, repeats) = (settings.send, settings.repeats);
        match assess_send(facts.state, limit, facts.body_digest, facts.now_ms, repeats) {
            Err(retry_after_ms) => Assessment {
                // Only a refusal names the user: reading the sender is a host call.
                verdict: SendVerdict::Throttle(SendThrottle {
                    retry_after_ms,
                    reason: format!(
                        "user {} sends faster than {} messages/s",
                        current::sender().map(|p| p.user_id).unwrap_or_default(),
                        limit.rate
                    ),
                }),
                state: StateChange::Keep,
            },
            Ok((next, count)) => Assessment {
                verdict: if i64::from(count) > settings.repeat_limit {
                    SendVerdict::Block(format!(
                        "the same message was sent {count} times within {}",
                        duration_text(repeats.window_ms)
                    ))
                } else {
                    SendVerdict::Allow
                },
                state: StateChange::Set(StateWrite {
                    value: next,
                    ttl_ms: Some(settings.send_state_ttl_ms),
                }),
            },
        }
    }
}

impl RiskControl for Limits {
    fn assess(ctx: &CallContext, event: RiskEvent<'_>) -> RiskVerdict {
        match event {
            // The host assesses sends with `screen_send`: this plugin exports send-screen.
            RiskEvent::Send(_) => RiskVerdict::Allow,
            RiskEvent::Login(attempt) => {
                let Some(ip) = ctx.remote_ip() else {
                    return RiskVerdict::Allow;
                };
                let limit = settings().login;
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

im_plugin_sdk::export_send_screen!(Limits);
im_plugin_sdk::export_risk_control!(Limits);

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: usize = DEFAULT_REPEAT_SLOTS;

    fn within(window_ms: i64) -> Repeats {
        Repeats {
            window_ms,
            slots: SLOTS,
        }
    }

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
    fn repeats_are_counted_per_body_within_the_window() {
        let (a, b) = (0x0a, 0x0b);
        let mut state: Option<Vec<u8>> = None;
        let mut send = |fp, now| {
            let (next, count) = count_repeat(state.as_deref(), fp, now, within(1_000));
            state = Some(next);
            count
        };
        assert_eq!(send(a, 0), 1);
        assert_eq!(send(a, 100), 2);
        assert_eq!(send(b, 200), 1);
        assert_eq!(send(a, 900), 3);
        // a's window started at 0: at 1,000 it starts again; b's is still open.
        assert_eq!(send(a, 1_000), 1);
        assert_eq!(send(b, 1_100), 2);
    }

    #[test]
    fn repeat_state_is_bounded_and_forgets_the_oldest_body() {
        let mut state: Option<Vec<u8>> = None;
        for n in 0..(SLOTS as u64 + 10) {
            let (next, count) = count_repeat(state.as_deref(), n, n as i64, within(1_000_000));
            assert_eq!(count, 1);
            state = Some(next);
        }
        assert_eq!(state.as_ref().unwrap().len(), SLOTS * SEEN_BYTES);
        // The first bodies were forgotten; the latest is remembered.
        let (_, count) = count_repeat(state.as_deref(), 0, 100, within(1_000_000));
        assert_eq!(count, 1);
        let last = SLOTS as u64 + 9;
        let (_, count) = count_repeat(state.as_deref(), last, 100, within(1_000_000));
        assert_eq!(count, 2);
    }

    /// A full ring under a window of 1,000: body 0 sent at time 0, each body n > 0 at
    /// `rest_from + n`.
    fn full_ring(rest_from: i64) -> Vec<u8> {
        let mut state: Option<Vec<u8>> = None;
        for n in 0..SLOTS as u64 {
            let now = if n == 0 { 0 } else { rest_from + n as i64 };
            state = Some(count_repeat(state.as_deref(), n, now, within(1_000)).0);
        }
        state.expect("at least one slot")
    }

    #[test]
    fn a_new_body_takes_an_expired_slot_before_forgetting_a_live_one() {
        // Bodies 1.. at 501..: body 0's slot is the only one expired at 1,000.
        let state = full_ring(500);
        let (next, count) = count_repeat(Some(&state), 1_000, 1_000, within(1_000));
        assert_eq!(count, 1);
        assert_eq!(next.len(), SLOTS * SEEN_BYTES, "no slot is added");
        // Every live body is still counted: none was forgotten for the new one.
        for n in 1..SLOTS as u64 {
            assert_eq!(
                count_repeat(Some(&next), n, 1_001, within(1_000)).1,
                2,
                "body {n}"
            );
        }
        assert_eq!(count_repeat(Some(&next), 1_000, 1_001, within(1_000)).1, 2);
    }

    #[test]
    fn a_body_counted_again_after_its_window_is_kept_as_the_newest() {
        // Bodies 1.. at 10..: nothing expired at 1,000 but body 0.
        let state = full_ring(9);
        let (next, count) = count_repeat(Some(&state), 0, 1_000, within(1_000));
        assert_eq!(count, 1, "its window passed: counted from one again");
        // A new body forgets the body remembered longest, 1, not 0.
        let (next, count) = count_repeat(Some(&next), 1_000, 1_001, within(1_000));
        assert_eq!(count, 1);
        assert_eq!(next.len(), SLOTS * SEEN_BYTES);
        assert_eq!(count_repeat(Some(&next), 0, 1_002, within(1_000)).1, 2);
        assert_eq!(count_repeat(Some(&next), 1, 1_002, within(1_000)).1, 1);
        assert_eq!(count_repeat(Some(&next), 2, 1_002, within(1_000)).1, 2);
    }

    #[test]
    fn a_ring_longer_than_the_configured_slots_keeps_its_newest_bodies() {
        let mut state: Option<Vec<u8>> = None;
        for n in 0..8u64 {
            state = Some(count_repeat(state.as_deref(), n, n as i64, within(1_000)).0);
        }
        let three = Repeats {
            window_ms: 1_000,
            slots: 3,
        };
        let (next, count) = count_repeat(state.as_deref(), 7, 10, three);
        assert_eq!(count, 2, "the newest body is still counted");
        assert_eq!(next.len(), 3 * SEEN_BYTES);
        assert_eq!(count_repeat(Some(&next), 5, 11, three).1, 2);
        assert_eq!(
            count_repeat(Some(&next), 4, 11, three).1,
            1,
            "older ones are gone"
        );
    }

    #[test]
    fn a_send_takes_a_token_and_counts_its_body_in_one_state() {
        let bucket = Bucket {
            rate: 1.0,
            burst: 2.0,
        };
        let fp = 0x4869;
        let (state, count) = assess_send(None, bucket, fp, 0, within(60_000)).unwrap();
        assert_eq!(count, 1);
        let (state, count) =
            assess_send(Some(state.clone()), bucket, fp, 10, within(60_000)).unwrap();
        assert_eq!(count, 2);
        // The burst of two is spent: the third send waits for a token, and counts nothing.
        assert_eq!(
            assess_send(Some(state.clone()), bucket, fp, 10, within(60_000)),
            Err(990)
        );
        let (_, count) =
            assess_send(Some(state.clone()), bucket, fp, 1_010, within(60_000)).unwrap();
        assert_eq!(count, 3);
        // A state too short to hold the bucket is taken as none.
        assert_eq!(
            assess_send(Some(b"x".to_vec()), bucket, fp, 0, within(60_000))
                .unwrap()
                .1,
            1
        );
    }

    #[test]
    fn windows_are_told_in_seconds_only_when_whole() {
        assert_eq!(duration_text(60_000), "60 s");
        assert_eq!(duration_text(1_500), "1500 ms");
        assert_eq!(duration_text(500), "500 ms");
    }
}
