//! Reuse of the KV cache of a shared prompt prefix.
//!
//! Every product of a channel is asked with the same system prompt and the same channel
//! instructions; only the spec at the end differs. Prefilling those shared tokens again
//! for every product is most of the prompt work. [`PrefixCache`] keeps a few snapshots of
//! a sequence's [`KvCache`] right after such a prefix (the K/V of the prefix, about
//! 23 KiB per token in f16 for SmolLM2-135M); a new prompt starts from a copy of one.
//!
//! A prefix is learnt, not declared: when a prompt shares at least [`MIN_PREFIX`] leading
//! tokens with one of the last few prompts, that common part becomes a snapshot, and later
//! prompts that start with it prefill only the rest. The result is the same as prefilling
//! the whole prompt, bit for bit, since the model computes each position the same way
//! however the prompt is split (the `prefix_cache_gives_the_same_tokens` test checks it on
//! the real model).

use std::collections::VecDeque;

use super::model::KvCache;

/// Shorter shared prefixes are not worth a snapshot.
pub const MIN_PREFIX: usize = 32;
/// Snapshots kept (least recently used goes first): one per channel for the shipped three,
/// plus one.
pub const MAX_SNAPSHOTS: usize = 4;
/// Recent prompts compared with a new one to find a shared prefix.
const RECENT: usize = 4;

struct Snapshot {
    ids: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

/// What [`PrefixCache::plan`] says to do for a prompt.
pub enum Plan {
    /// Start from this cache (it holds the first `len` prompt tokens) and prefill the rest.
    Restore { cache: Box<KvCache>, len: usize },
    /// Prefill the first `len` tokens from scratch, [`PrefixCache::store`] a snapshot, then
    /// prefill the rest.
    Learn { len: usize },
    /// Prefill everything from scratch.
    Plain,
}

#[derive(Default)]
pub struct PrefixCache {
    snapshots: Vec<Snapshot>,
    recent: VecDeque<Vec<u32>>,
    clock: u64,
    enabled: bool,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if !enabled {
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.snapshots.clear();
        self.recent.clear();
    }

    /// Snapshots held now.
    pub fn len(&self) -> usize {
        self.snapshots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// Decides how to prefill `prompt`, and remembers it for the prompts to come.
    /// At least one token is always left to prefill (its logits are the first answer).
    /// New snapshots end on a multiple of `align` (1: anywhere).
    pub fn plan(&mut self, prompt: &[u32], align: usize) -> Plan {
        if !self.enabled {
            return Plan::Plain;
        }
        self.clock += 1;
        let best = self
            .snapshots
            .iter_mut()
            .filter(|s| s.ids.len() < prompt.len() && prompt.starts_with(&s.ids))
            .max_by_key(|s| s.ids.len());
        let plan = if let Some(s) = best {
            s.last_used = self.clock;
            Plan::Restore {
                cache: Box::new(s.cache.clone()),
                len: s.ids.len(),
            }
        } else {
            let shared = self
                .recent
                .iter()
                .map(|r| common_prefix(r, prompt))
                .max()
                .unwrap_or(0)
                .min(prompt.len().saturating_sub(1));
            let shared = shared - shared % align.max(1);
            if shared >= MIN_PREFIX {
                Plan::Learn { len: shared }
            } else {
                Plan::Plain
            }
        };
        if self.recent.len() == RECENT {
            self.recent.pop_back();
        }
        self.recent.push_front(prompt.to_vec());
        plan
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
        assert!(matches!(c.plan(&a, 1), Plan::Plain));
        assert!(matches!(c.plan(&b, 1), Plan::Learn { len: 35 }));
        // a prompt equal to a recent one still prefills its last token
        assert!(matches!(c.plan(&a, 1), Plan::Learn { len: 39 }));
        // snapshots end on a chunk boundary
        assert!(matches!(c.plan(&a, 16), Plan::Learn { len: 32 }));
        assert!(matches!(c.plan(&b, 64), Plan::Plain));
        // too short a shared part is not learnt
        let mut d: Vec<u32> = (0..10).collect();
        d.extend(500..560);
        assert!(matches!(c.plan(&d, 1), Plan::Plain));
        // disabled: always plain
        let mut off = PrefixCache::new(false);
        off.plan(&a, 1);
        assert!(matches!(off.plan(&a, 1), Plan::Plain));
    }
}
