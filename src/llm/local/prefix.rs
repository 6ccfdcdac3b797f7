//! Reuse of the KV cache of a shared prompt prefix.
//!
//! Prompts repeat themselves in two ways. Every product of a channel is asked with the same
//! system prompt and channel instructions; only the spec after them differs. And a repair
//! (or a regeneration with reviewer feedback) asks again with the very same prompt up to
//! the end of the product data, with the findings to fix after it. Prefilling those shared
//! tokens again is most of the prompt work, so [`PrefixCache`] keeps two kinds of K/V
//! (about 13 KiB per token, 8-bit, for SmolLM2-135M):
//!
//! - **snapshots** of a sequence's cache right after a prefix that several prompts shared
//!   (a channel's instructions). A prefix is learnt, not declared: when a prompt shares at
//!   least [`MIN_PREFIX`] leading tokens with one of the last few prompts, that common part
//!   becomes a snapshot when the prompt's prefill reaches it;
//! - the caches of the **last prompts answered** (their prompt part), up to
//!   [`REMEMBERED_BYTES`] by default: a new prompt that shares a longer start with one of them starts
//!   from a copy of that part.
//!
//! A new prompt starts from the longest of these that fits and prefills only the rest.
//! The result is the same as prefilling the whole prompt, bit for bit, since the model
//! computes each position the same way however the prompt is split (the
//! `prefix_cache_gives_the_same_tokens` test checks it on the real model).

use std::collections::VecDeque;

use super::model::KvCache;

/// Shorter shared prefixes are not worth a snapshot or a copy.
pub const MIN_PREFIX: usize = 32;
/// Snapshots kept (least recently used goes first): one per channel for the shipped three,
/// plus one.
pub const MAX_SNAPSHOTS: usize = 4;
/// Bytes of K/V kept of the last prompts answered by default (oldest goes first): about
/// four prompts of 500 tokens, enough for a repair to find its first attempt with four
/// requests in flight.
pub const REMEMBERED_BYTES: usize = 48 << 20;
/// Recent prompts compared with a new one to find a shared prefix.
const RECENT: usize = 8;

struct Snapshot {
    ids: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

/// What [`PrefixCache::plan`] says to do for a prompt.
pub struct Plan {
    /// Start from this cache (it holds the first `cache.len()` prompt tokens; none when
    /// absent) and prefill the rest.
    pub cache: Option<Box<KvCache>>,
    /// Once the cache holds this many prompt tokens, [`PrefixCache::store`] it as a
    /// snapshot (a prefix shared with a recent prompt); always more than `cache.len()`.
    pub learn: Option<usize>,
}

impl Plan {
    /// Prefill everything from scratch.
    pub const PLAIN: Plan = Plan {
        cache: None,
        learn: None,
    };

    /// Prompt tokens that come from the cache.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }
}

#[derive(Default)]
pub struct PrefixCache {
    snapshots: Vec<Snapshot>,
    /// Prompts answered, newest first, with their caches (prompt part only).
    remembered: VecDeque<(Vec<u32>, KvCache)>,
    /// Bytes of K/V `remembered` may hold.
    remembered_bytes: usize,
    /// Ids of the last prompts planned (answered or not), newest first.
    recent: VecDeque<Vec<u32>>,
    clock: u64,
    enabled: bool,
}

/// Leading ids `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            remembered_bytes: REMEMBERED_BYTES,
            ..Self::default()
        }
    }

    /// Bytes of K/V kept of the last prompts answered (0: none are kept).
    pub fn set_remembered_bytes(&mut self, bytes: usize) {
        self.remembered_bytes = bytes;
        self.trim_remembered();
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if !enabled {
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.snapshots.clear();
        self.remembered.clear();
        self.recent.clear();
    }

    /// Snapshots held now.
    pub fn len(&self) -> usize {
        self.snapshots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// Prompts whose caches are remembered now.
    pub fn remembered(&self) -> usize {
        self.remembered.len()
    }

    /// Decides how to prefill `prompt`, and remembers it for the prompts to come.
    /// At least one token is always left to prefill (its logits are the first answer).
    /// New snapshots end on a multiple of `align` (1: anywhere).
    pub fn plan(&mut self, prompt: &[u32], align: usize) -> Plan {
        if !self.enabled || prompt.is_empty() {
            return Plan::PLAIN;
        }
        self.clock += 1;
        let most = prompt.len() - 1;
        let snapshot = self
            .snapshots
            .iter_mut()
            .filter(|s| s.ids.len() <= most && prompt.starts_with(&s.ids))
            .max_by_key(|s| s.ids.len());
        let snapshot_len = snapshot.as_ref().map_or(0, |s| s.ids.len());
        let remembered = self
            .remembered
            .iter()
            .map(|(ids, cache)| (common_prefix(ids, prompt).min(most), cache))
            .filter(|(n, _)| *n >= MIN_PREFIX)
            .max_by_key(|(n, _)| *n);
        let cache = match (remembered, snapshot) {
            (Some((n, cache)), _) if n > snapshot_len => Some(Box::new(cache.prefix(n))),
            (_, Some(s)) => {
                s.last_used = self.clock;
                Some(Box::new(s.cache.clone()))
            }
            _ => None,
        };
        let start = cache.as_ref().map_or(0, |c| c.len());
        let shared = self
            .recent
            .iter()
            .map(|r| common_prefix(r, prompt))
            .max()
            .unwrap_or(0)
            .min(most);
        let shared = shared - shared % align.max(1);
        // `start` is at least the snapshot's length: learn only what no cache holds yet
        let learn = (shared >= MIN_PREFIX && shared > start).then_some(shared);
        if self.recent.len() == RECENT {
            self.recent.pop_back();
        }
        self.recent.push_front(prompt.to_vec());
        Plan { cache, learn }
    }

    /// Keeps `cache` (which holds exactly `ids`) as a snapshot.
    pub fn store(&mut self, ids: &[u32], cache: KvCache) {
        if !self.enabled || self.snapshots.iter().any(|s| s.ids == ids) {
            return;
        }
        if self.snapshots.len() == MAX_SNAPSHOTS {
            if let Some(oldest) = self
                .snapshots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
            {
                self.snapshots.swap_remove(oldest);
            }
        }
        self.snapshots.push(Snapshot {
            ids: ids.to_vec(),
            cache,
            last_used: self.clock,
        });
    }

    /// Keeps the cache of a prompt just answered (`cache` holds at least `prompt`; what
    /// follows, the answer, is dropped), forgetting the oldest beyond the byte budget.
    pub fn remember(&mut self, prompt: &[u32], mut cache: KvCache) {
        if !self.enabled || prompt.len() < MIN_PREFIX || cache.len() < prompt.len() {
            return;
        }
        cache.truncate(prompt.len());
        self.remembered.retain(|(ids, _)| ids != prompt);
        self.remembered.push_front((prompt.to_vec(), cache));
        self.trim_remembered();
    }

    fn trim_remembered(&mut self) {
        let mut bytes = 0;
        let keep = self
            .remembered
            .iter()
            .take_while(|(_, c)| {
                bytes += c.size_in_bytes();
                bytes <= self.remembered_bytes
            })
            .count();
        self.remembered.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_leading_equal_ids() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }

    #[test]
    fn learns_a_prefix_shared_with_a_recent_prompt_and_leaves_a_token() {
        let mut c = PrefixCache::new(true);
        let a: Vec<u32> = (0..40).collect();
        let mut b: Vec<u32> = (0..35).collect();
        b.extend([900, 901]);
        let learn = |p: Plan| (p.cached(), p.learn);
        assert_eq!(learn(c.plan(&a, 1)), (0, None));
        assert_eq!(learn(c.plan(&b, 1)), (0, Some(35)));
        // a prompt equal to a recent one still prefills its last token
        assert_eq!(learn(c.plan(&a, 1)), (0, Some(39)));
        // snapshots end on a chunk boundary
        assert_eq!(learn(c.plan(&a, 16)), (0, Some(32)));
        assert_eq!(learn(c.plan(&b, 64)), (0, None));
        // too short a shared part is not learnt
        let mut d: Vec<u32> = (0..10).collect();
        d.extend(500..560);
        assert_eq!(learn(c.plan(&d, 1)), (0, None));
        // disabled: always plain
        let mut off = PrefixCache::new(false);
        off.plan(&a, 1);
        assert_eq!(learn(off.plan(&a, 1)), (0, None));
    }

    #[test]
    fn starts_from_the_longest_start_shared_with_a_prompt_answered() {
        let mut c = PrefixCache::new(true);
        let first: Vec<u32> = (0..100).collect();
        assert!(c.plan(&first, 1).cache.is_none());
        c.remember(&first, KvCache::numbered(2, 4, 120)); // prompt + 20 answer tokens
        assert_eq!(c.remembered(), 1);
        // a repair: the same prompt up to token 90, then findings
        let mut repair: Vec<u32> = (0..90).collect();
        repair.extend(1000..1030);
        let plan = c.plan(&repair, 1);
        let cache = plan.cache.expect("starts from the remembered prompt");
        assert_eq!(cache.len(), 90);
        assert_eq!(cache.size_in_bytes(), 2 * 2 * (4 + 4) * 90); // 4 quants + a scale
        assert_eq!(plan.learn, None, "the shared part came from the cache");
        // the very same prompt again still prefills its last token
        assert_eq!(c.plan(&first, 1).cached(), 99);
        // a longer snapshot wins over a shorter remembered start, and vice versa
        c.store(&repair[..110], KvCache::numbered(2, 4, 110));
        assert_eq!(c.plan(&repair, 1).cached(), 110);
        c.store(&first[..50], KvCache::numbered(2, 4, 50));
        assert_eq!(c.plan(&first, 1).cached(), 99);
        // too short a shared start is not copied
        let mut other: Vec<u32> = (0..20).collect();
        other.extend(5000..5100);
        assert_eq!(c.plan(&other, 1).cached(), 0);
    }

    #[test]
    fn remembers_the_newest_prompts_within_its_byte_budget() {
        let mut c = PrefixCache::new(true);
        // 256 KiB per token: a few hundred tokens fill the budget
        let per_token = 256 << 10;
        let width = per_token / (2 * 64) - 4; // quants + a 4-byte scale per stream
        let n = REMEMBERED_BYTES / per_token / 2 + 1; // more than half the budget each
        for p in 0..3u32 {
            let ids: Vec<u32> = (0..n as u32).map(|i| p * 10_000 + i).collect();
            c.remember(&ids, KvCache::numbered(64, width, n));
        }
        assert_eq!(c.remembered(), 1, "only the newest fits");
        let newest: Vec<u32> = (0..n as u32).map(|i| 20_000 + i).collect();
        assert_eq!(c.plan(&newest, 1).cached(), n - 1);
        // too short a prompt, a cache that does not hold the prompt, or disabled: not kept
        let mut d = PrefixCache::new(true);
        d.remember(&[1, 2, 3], KvCache::numbered(1, 1, 3));
        d.remember(&newest, KvCache::numbered(1, 1, 5));
        assert_eq!(d.remembered(), 0);
        d.set_enabled(false);
        d.remember(&newest, KvCache::numbered(1, 1, n));
        assert_eq!(d.remembered(), 0);
        // a smaller budget forgets at once
        c.set_remembered_bytes(0);
        assert_eq!(c.remembered(), 0);
    }
}
