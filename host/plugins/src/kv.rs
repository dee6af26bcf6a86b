//! The per-plugin key-value store: in memory for microsecond access from plugin calls, with
//! quotas and TTLs, and a change log that a background task writes to the database.
//!
//! Host calls from Wasm are synchronous, so the store never waits on I/O inside a call;
//! persistence is write-behind (batched every few milliseconds). A crash can lose the
//! writes of the last flush interval, never more; documented in docs/plugins.md.

use foldhash::{HashMap, HashSet};

use im_store::KvRecord;
use parking_lot::Mutex;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("the plugin's key-value quota is exhausted")]
    QuotaExceeded,
    #[error("key or value too large")]
    TooLarge,
    #[error("value is not a decimal integer")]
    NotANumber,
}

struct Entry {
    value: Vec<u8>,
    expires_at_ms: Option<i64>,
    /// Changes with every write of the entry ([`KvStore::replace_if_stamp`]).
    stamp: u64,
}

impl Entry {
    /// An entry to write: [`KvStore::put`] stamps it.
    fn new(value: Vec<u8>, expires_at_ms: Option<i64>) -> Self {
        Self {
            value,
            expires_at_ms,
            stamp: 0,
        }
    }

    fn live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    bytes: u64,
    /// Keys changed since the last flush. A flush writes each key's value as it is then
    /// (deleting the keys that are gone), so a write copies nothing into the log: a plugin
    /// that rewrites one value on every message (risk control's per-user state) copied it
    /// there each time.
    dirty: HashSet<String>,
    /// The stamp given last (stamps only grow).
    last_stamp: u64,
}

impl Inner {
    /// A stamp no entry has had yet.
    fn new_stamp(&mut self) -> u64 {
        self.last_stamp += 1;
        self.last_stamp
    }
}

/// One plugin's store.
pub struct KvStore {
    inner: Mutex<Inner>,
    /// (max keys, max bytes); an upgrade may change them.
    limits: Mutex<(usize, u64)>,
}

/// Changes to persist.
#[derive(Debug, Default, PartialEq)]
pub struct KvChanges {
    pub upserts: Vec<KvRecord>,
    pub deletes: Vec<String>,
}

impl KvChanges {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

fn cost(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

fn expiry(now_ms: i64, ttl_ms: Option<u64>) -> Option<i64> {
    ttl_ms.map(|ttl| now_ms.saturating_add(ttl.min(i64::MAX as u64) as i64))
}

impl KvStore {
    pub fn new(max_keys: u32, max_bytes: u64) -> Self {
        Self {
            inner: Mutex::default(),
            limits: Mutex::new((max_keys as usize, max_bytes)),
        }
    }

    /// Changes the quota (existing data above it stays, but nothing more is added).
    pub fn set_limits(&self, max_keys: u32, max_bytes: u64) {
        *self.limits.lock() = (max_keys as usize, max_bytes);
    }

    /// Every key (for purging).
    pub fn keys(&self) -> Vec<String> {
        self.inner.lock().entries.keys().cloned().collect()
    }

    /// Marks the keys of changes whose write failed as changed again: the next flush writes
    /// their values as they are by then.
    pub fn requeue(&self, changes: KvChanges) {
        let mut inner = self.inner.lock();
        let keys = changes.upserts.into_iter().map(|r| r.key);
        inner.dirty.extend(keys.chain(changes.deletes));
    }

    /// Loads persisted records (at start or when a plugin is installed again).
    pub fn load(&self, records: Vec<KvRecord>) {
        let mut inner = self.inner.lock();
        for r in records {
            inner.bytes += cost(&r.key, &r.value);
            let mut entry = Entry::new(r.value, r.expires_at_ms);
            entry.stamp = inner.new_stamp();
            inner.entries.insert(r.key, entry);
        }
    }

    pub fn get(&self, key: &str, now_ms: i64) -> Option<Vec<u8>> {
        let inner = self.inner.lock();
        inner
            .entries
            .get(key)
            .filter(|e| e.live(now_ms))
            .map(|e| e.value.clone())
    }

    pub fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
        now_ms: i64,
    ) -> Result<(), KvError> {
        let mut inner = self.inner.lock();
        self.put(
            &mut inner,
            key,
            Entry::new(value, expiry(now_ms, ttl_ms)),
            now_ms,
        )
    }

    pub fn delete(&self, key: &str, now_ms: i64) -> bool {
        let mut inner = self.inner.lock();
        remove(&mut inner, key).is_some_and(|old| old.live(now_ms))
    }

    pub fn increment(
        &self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
        now_ms: i64,
    ) -> Result<i64, KvError> {
        let mut inner = self.inner.lock();
        let (current, expires_at_ms) = match inner.entries.get(key).filter(|e| e.live(now_ms)) {
            Some(e) => {
                let text = std::str::from_utf8(&e.value).map_err(|_| KvError::NotANumber)?;
                (
                    text.parse::<i64>().map_err(|_| KvError::NotANumber)?,
                    e.expires_at_ms,
                )
            }
            None => (0, expiry(now_ms, ttl_ms)),
        };
        let next = current.saturating_add(delta);
        let entry = Entry::new(next.to_string().into_bytes(), expires_at_ms);
        self.put(&mut inner, key, entry, now_ms)?;
        Ok(next)
    }

    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
        now_ms: i64,
    ) -> Result<bool, KvError> {
        self.replace_if(key, value, ttl_ms, now_ms, |current| {
            current.map(|e| e.value.as_slice()) == expected
        })
    }

    /// The value at `key`, if present and not expired, with its stamp: a number that
    /// changes whenever the entry is written, for [`Self::replace_if_stamp`].
    pub fn get_stamped(&self, key: &str, now_ms: i64) -> Option<(Vec<u8>, u64)> {
        let inner = self.inner.lock();
        inner
            .entries
            .get(key)
            .filter(|e| e.live(now_ms))
            .map(|e| (e.value.clone(), e.stamp))
    }

    /// Sets `key` to `value` (deletes it when `value` is none) only if its entry is still
    /// the one stamped `stamp` (none: absent or expired); true if it did. Like
    /// [`Self::compare_and_swap`] without the caller keeping a copy of the old value.
    pub fn replace_if_stamp(
        &self,
        key: &str,
        stamp: Option<u64>,
        value: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
        now_ms: i64,
    ) -> Result<bool, KvError> {
        self.replace_if(key, value, ttl_ms, now_ms, |current| {
            current.map(|e| e.stamp) == stamp
        })
    }

    /// Sets `key` to `value` (deletes it when `value` is none) if `holds` says yes of its
    /// live entry (none: absent or expired); true if it did.
    fn replace_if(
        &self,
        key: &str,
        value: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
        now_ms: i64,
        holds: impl FnOnce(Option<&Entry>) -> bool,
    ) -> Result<bool, KvError> {
        let mut inner = self.inner.lock();
        if !holds(inner.entries.get(key).filter(|e| e.live(now_ms))) {
            return Ok(false);
        }
        match value {
            Some(value) => {
                let entry = Entry::new(value, expiry(now_ms, ttl_ms));
                self.put(&mut inner, key, entry, now_ms)?
            }
            None => {
                remove(&mut inner, key);
            }
        }
        Ok(true)
    }

    /// Keys stored (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the changes made since the last call.
    pub fn take_changes(&self) -> KvChanges {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut changes = KvChanges::default();
        for key in inner.dirty.drain() {
            match inner.entries.get(&key) {
                Some(e) => changes.upserts.push(KvRecord {
                    key,
                    value: e.value.clone(),
                    expires_at_ms: e.expires_at_ms,
                }),
                None => changes.deletes.push(key),
            }
        }
        changes
    }

    fn put(
        &self,
        inner: &mut Inner,
        key: &str,
        mut entry: Entry,
        now_ms: i64,
    ) -> Result<(), KvError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || entry.value.len() > MAX_VALUE_BYTES {
            return Err(KvError::TooLarge);
        }
        let (max_keys, max_bytes) = *self.limits.lock();
        let added = cost(key, &entry.value);
        entry.stamp = inner.new_stamp();
        // The common write replaces an entry that exists (a plugin's per-user state): one
        // lookup, and the key count cannot grow.
        if let Some(slot) = inner.entries.get_mut(key) {
            let old = cost(key, &slot.value);
            if inner.bytes - old + added <= max_bytes {
                *slot = entry;
                inner.bytes = inner.bytes - old + added;
                mark_dirty(inner, key);
                return Ok(());
            }
        }
        let fits = |inner: &Inner| {
            let old = inner.entries.get(key).map_or(0, |e| cost(key, &e.value));
            let new_keys = inner.entries.len() + usize::from(!inner.entries.contains_key(key));
            new_keys <= max_keys && inner.bytes - old + cost(key, &entry.value) <= max_bytes
        };
        if !fits(inner) {
            sweep_expired(inner, now_ms);
            if !fits(inner) {
                return Err(KvError::QuotaExceeded);
            }
        }
        let replaced = match inner.entries.get_mut(key) {
            Some(slot) => cost(key, &std::mem::replace(slot, entry).value),
            None => {
                inner.entries.insert(key.to_owned(), entry);
                0
            }
        };
        inner.bytes = inner.bytes - replaced + added;
        mark_dirty(inner, key);
        Ok(())
    }
}

/// Removes `key`, keeping the byte count and the change log right.
fn remove(inner: &mut Inner, key: &str) -> Option<Entry> {
    let old = inner.entries.remove(key)?;
    inner.bytes -= cost(key, &old.value);
    mark_dirty(inner, key);
    Some(old)
}

fn mark_dirty(inner: &mut Inner, key: &str) {
    if !inner.dirty.contains(key) {
        inner.dirty.insert(key.to_owned());
    }
}

fn sweep_expired(inner: &mut Inner, now_ms: i64) {
    let expired: Vec<String> = inner
        .entries
        .iter()
        .filter(|(_, e)| !e.live(now_ms))
        .map(|(k, _)| k.clone())
        .collect();
    for key in expired {
        remove(inner, &key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete_and_ttl() {
        let kv = KvStore::new(10, 1000);
        kv.set("a", b"1".to_vec(), None, 0).unwrap();
        kv.set("t", b"x".to_vec(), Some(100), 0).unwrap();
        assert_eq!(kv.get("a", 50), Some(b"1".to_vec()));
        assert_eq!(kv.get("t", 99), Some(b"x".to_vec()));
        assert_eq!(kv.get("t", 100), None);
        assert!(kv.delete("a", 0));
        assert!(!kv.delete("a", 0));
        assert_eq!(kv.get("a", 0), None);
    }

    #[test]
    fn increment_and_compare_and_swap() {
        let kv = KvStore::new(10, 1000);
        assert_eq!(kv.increment("n", 5, Some(1000), 0), Ok(5));
        assert_eq!(kv.increment("n", -2, None, 10), Ok(3));
        // The TTL set at creation is kept; after it the counter starts again.
        assert_eq!(kv.increment("n", 1, None, 1000), Ok(1));
        kv.set("s", b"text".to_vec(), None, 0).unwrap();
        assert_eq!(kv.increment("s", 1, None, 0), Err(KvError::NotANumber));
        assert_eq!(
            kv.compare_and_swap("c", None, Some(b"v1".to_vec()), None, 0),
            Ok(true)
        );
        assert_eq!(
            kv.compare_and_swap("c", None, Some(b"v2".to_vec()), None, 0),
            Ok(false)
        );
        assert_eq!(
            kv.compare_and_swap("c", Some(b"v1"), Some(b"v2".to_vec()), None, 0),
            Ok(true)
        );
        assert_eq!(
            kv.compare_and_swap("c", Some(b"v2"), None, None, 0),
            Ok(true)
        );
        assert_eq!(kv.get("c", 0), None);
    }

    #[test]
    fn a_replace_needs_the_stamp_of_the_value_read() {
        let kv = KvStore::new(10, 1000);
        assert_eq!(
            kv.replace_if_stamp("k", None, Some(b"a".to_vec()), None, 0),
            Ok(true)
        );
        let (value, stamp) = kv.get_stamped("k", 0).unwrap();
        assert_eq!(value, b"a");
        // Another write, even of the same bytes, outdates the stamp.
        kv.set("k", b"a".to_vec(), None, 0).unwrap();
        assert_eq!(
            kv.replace_if_stamp("k", Some(stamp), Some(b"b".to_vec()), None, 0),
            Ok(false)
        );
        assert_eq!(
            kv.replace_if_stamp("k", None, Some(b"b".to_vec()), None, 0),
            Ok(false)
        );
        let (_, stamp) = kv.get_stamped("k", 0).unwrap();
        assert_eq!(
            kv.replace_if_stamp("k", Some(stamp), Some(b"b".to_vec()), Some(10), 0),
            Ok(true)
        );
        assert_eq!(kv.get("k", 0).as_deref(), Some(&b"b"[..]));
        // Expired, the entry counts as absent; deleting needs the current stamp.
        assert_eq!(kv.get_stamped("k", 10), None);
        assert_eq!(
            kv.replace_if_stamp("k", None, Some(b"c".to_vec()), None, 10),
            Ok(true)
        );
        let (_, stamp) = kv.get_stamped("k", 10).unwrap();
        assert_eq!(
            kv.replace_if_stamp("k", Some(stamp + 1), None, None, 10),
            Ok(false)
        );
        assert_eq!(
            kv.replace_if_stamp("k", Some(stamp), None, None, 10),
            Ok(true)
        );
        assert_eq!(kv.get("k", 10), None);
    }

    #[test]
    fn quotas_hold_and_expired_entries_make_room() {
        let kv = KvStore::new(2, 100);
        kv.set("a", vec![0; 10], None, 0).unwrap();
        kv.set("b", vec![0; 10], Some(5), 0).unwrap();
        assert_eq!(
            kv.set("c", vec![0; 10], None, 0),
            Err(KvError::QuotaExceeded)
        );
        // Overwriting an existing key needs no new key slot.
        kv.set("a", vec![0; 20], None, 0).unwrap();
        assert_eq!(
            kv.set("a", vec![0; 200], None, 0),
            Err(KvError::QuotaExceeded)
        );
        // Once b expired, c fits.
        kv.set("c", vec![0; 10], None, 10).unwrap();
        assert_eq!(
            kv.set(&"k".repeat(300), vec![], None, 0),
            Err(KvError::TooLarge)
        );
        assert_eq!(
            kv.set("big", vec![0; MAX_VALUE_BYTES + 1], None, 0),
            Err(KvError::TooLarge)
        );
    }

    #[test]
    fn changes_are_collected_for_persistence_and_reload() {
        let kv = KvStore::new(10, 1000);
        kv.set("a", b"1".to_vec(), None, 0).unwrap();
        kv.set("b", b"2".to_vec(), Some(50), 0).unwrap();
        kv.delete("a", 0);
        let mut changes = kv.take_changes();
        changes.upserts.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(changes.deletes, vec!["a".to_owned()]);
        assert_eq!(
            changes.upserts,
            vec![KvRecord {
                key: "b".into(),
                value: b"2".to_vec(),
                expires_at_ms: Some(50)
            }]
        );
        assert!(kv.take_changes().is_empty());
        let reloaded = KvStore::new(10, 1000);
        reloaded.load(changes.upserts);
        assert_eq!(reloaded.get("b", 10), Some(b"2".to_vec()));
    }

    #[test]
    fn a_flush_writes_each_changed_key_as_it_is_then_and_a_failed_one_is_written_again() {
        let kv = KvStore::new(10, 1000);
        kv.set("a", b"1".to_vec(), None, 0).unwrap();
        kv.set("a", b"2".to_vec(), None, 0).unwrap();
        kv.set("b", b"x".to_vec(), None, 0).unwrap();
        let failed = kv.take_changes();
        assert_eq!(
            failed.upserts.len(),
            2,
            "one record per key, however often it changed"
        );
        assert!(
            failed
                .upserts
                .iter()
                .any(|r| r.key == "a" && r.value == b"2")
        );
        // Changed again after the failed write: the retry carries the newest state.
        kv.set("a", b"3".to_vec(), None, 0).unwrap();
        kv.delete("b", 0);
        kv.requeue(failed);
        let retried = kv.take_changes();
        assert_eq!(
            retried.upserts,
            vec![KvRecord {
                key: "a".into(),
                value: b"3".to_vec(),
                expires_at_ms: None
            }]
        );
        assert_eq!(retried.deletes, vec!["b".to_owned()]);
        assert!(kv.take_changes().is_empty());
    }
}
