//! Choosing the next token from the last position's logits: repeat penalty, an optional
//! constraint mask, then greedy or temperature + top-p sampling from a seeded RNG.
//!
//! Same semantics as candle's `LogitsProcessor` + `apply_repeat_penalty` (and llama.cpp's
//! classic samplers), but working in place on a reused buffer, with a hook for constrained
//! decoding. One difference: tokens whose probability is below e^-30 of the most likely
//! one are dropped before the softmax (together they weigh less than 1e-8), so each step
//! exponentiates and sorts a few hundred candidates instead of the whole vocabulary.
//!
//! Deterministic: the same logits, history and seed give the same tokens.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::llm::{LlmError, Sampling};

/// A rule on which tokens may come next, applied at every step before sampling. This is
/// the seam for constrained decoding (e.g. only valid JSON of the request's schema, or only
/// the numbers the spec allows).
pub trait LogitsConstraint: Send {
    /// Clears `allowed[id]` for every token that may not come next. `allowed` has one entry
    /// per vocabulary id and is all `true` on entry.
    fn mask(&mut self, allowed: &mut [bool]);
    /// The token that was chosen; the constraint moves to its next state.
    fn advance(&mut self, token: u32) -> Result<(), String>;
}

/// Logits below `max - CUTOFF * temperature` are treated as probability 0.
const CUTOFF: f32 = 30.0;

#[derive(Debug)]
pub struct Sampler {
    rng: StdRng,
    /// `None`: greedy.
    temperature: Option<f32>,
    /// `None`: sample from the whole distribution.
    top_p: Option<f32>,
    repeat_penalty: f32,
    repeat_last_n: usize,
    /// Scratch buffers, reused across steps.
    candidates: Vec<(u32, f32)>,
    recent: Vec<u32>,
    allowed: Vec<bool>,
}

impl Sampler {
    /// Checks the parameters; `temperature <= 0` (or NaN) means greedy.
    pub fn new(s: &Sampling) -> Result<Self, LlmError> {
        if !(s.repeat_penalty > 0.0 && s.repeat_penalty.is_finite()) {
            return Err(LlmError::Rejected(format!(
                "repeat_penalty must be a positive number, got {}",
                s.repeat_penalty
            )));
        }
        let temperature = (s.temperature > 0.0 && s.temperature.is_finite())
            .then_some(s.temperature as f32)
            .filter(|t| *t > 1e-7);
        let top_p = (s.top_p > 0.0 && s.top_p < 1.0).then_some(s.top_p as f32);
        Ok(Self {
            rng: StdRng::seed_from_u64(s.seed),
            temperature,
            top_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n,
            candidates: Vec::with_capacity(1024),
            recent: Vec::with_capacity(s.repeat_last_n.min(4096)),
            allowed: Vec::new(),
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none()
    }

    /// Picks the next token. `logits` is modified in place (penalty, mask, scaling).
    /// `generated` is the completion so far (the repeat penalty looks at its last
    /// `repeat_last_n` tokens; the prompt is not penalised, so wording from the spec may be
    /// repeated).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        generated: &[u32],
        constraint: Option<&mut (dyn LogitsConstraint + '_)>,
    ) -> Result<u32, LlmError> {
        self.apply_repeat_penalty(logits, generated);
        if let Some(c) = constraint {
            self.allowed.clear();
            self.allowed.resize(logits.len(), true);
            c.mask(&mut self.allowed);
            for (l, &ok) in logits.iter_mut().zip(&self.allowed) {
                if !ok {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        match self.temperature {
            None => argmax(logits),
            Some(t) => self.sample_nucleus(logits, t),
        }
        .ok_or_else(|| LlmError::Model("no token can come next (all logits masked or NaN)".into()))
    }

    fn apply_repeat_penalty(&mut self, logits: &mut [f32], generated: &[u32]) {
        if self.repeat_penalty == 1.0 || self.repeat_last_n == 0 || generated.is_empty() {
            return;
        }
        let from = generated.len().saturating_sub(self.repeat_last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&generated[from..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &id in &self.recent {
            if let Some(l) = logits.get_mut(id as usize) {
                if *l >= 0.0 {
                    *l /= self.repeat_penalty;
                } else {
                    *l *= self.repeat_penalty;
                }
            }
        }
    }

    fn sample_nucleus(&mut self, logits: &[f32], temperature: f32) -> Option<u32> {
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let floor = max - CUTOFF * temperature;
        self.candidates.clear();
        for (id, &l) in logits.iter().enumerate() {
            if l >= floor {
                self.candidates.push((id as u32, l));
            }
        }
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            c.1 = ((c.1 - max) / temperature).exp();
            total += f64::from(c.1);
        }
        let keep = match self.top_p {
            None => self.candidates.len(),
            Some(p) => nucleus(&mut self.candidates, p, total),
        };
        let kept = &self.candidates[..keep];
        let sum: f64 = kept.iter().map(|c| f64::from(c.1)).sum();
        let mut r = self.rng.gen::<f64>() * sum;
        for c in kept {
            r -= f64::from(c.1);
            if r < 0.0 {
                return Some(c.0);
            }
        }
        kept.last().map(|c| c.0)
    }
}

/// Most likely first; ties by id, so the order is total and never depends on the algorithm.
fn by_weight_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Moves the nucleus (the fewest most likely tokens whose weights reach `p * total`) to the
/// front of `cands`, most likely first, and returns its length.
///
/// Without sorting everything: first drops the tokens too unlikely to be in any nucleus
/// (below `(1 - p) * total / n`: together they weigh less than `1 - p`, so the others reach
/// `p` on their own), then sorts only the top k, growing k until the nucleus fits.
fn nucleus(cands: &mut Vec<(u32, f32)>, p: f32, total: f64) -> usize {
    let n = cands.len();
    if n == 0 {
        return 0;
    }
    let target = f64::from(p) * total;
    let tail = (1.0 - f64::from(p)) * total / n as f64;
    cands.retain(|c| f64::from(c.1) >= tail);
    let n = cands.len();
    let mut k = n.min(64);
    loop {
        if k < n {
            cands.select_nth_unstable_by(k - 1, by_weight_desc);
        }
        cands[..k].sort_unstable_by(by_weight_desc);
        let mut cum = 0.0f64;
        for (i, c) in cands[..k].iter().enumerate() {
            cum += f64::from(c.1);
            if cum >= target {
                return i + 1;
            }
        }
        if k == n {
            return n;
        }
        k = (k * 4).min(n);
    }
}

/// Index of the largest logit (the first one on ties); `None` if there is none.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_p: f64, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed,
            max_new_tokens: 16,
        }
    }

    #[test]
    fn greedy_picks_the_largest() {
        let mut s = Sampler::new(&sampling(0.0, 0.9, 1)).unwrap();
        assert!(s.is_greedy());
        let mut l = vec![0.1, 3.0, f32::NAN, 2.0];
        assert_eq!(s.sample(&mut l, &[], None).unwrap(), 1);
        let mut l = vec![f32::NEG_INFINITY; 3];
        assert!(s.sample(&mut l, &[], None).is_err());
    }

    #[test]
    fn repeat_penalty_follows_llama_cpp() {
        let mut s = Sampler::new(&Sampling {
            repeat_penalty: 2.0,
            ..sampling(0.0, 1.0, 0)
        })
        .unwrap();
        let mut l = vec![4.0, -1.0, 3.0];
        s.apply_repeat_penalty(&mut l, &[0, 1, 0]);
        assert_eq!(l, vec![2.0, -2.0, 3.0]);
        // Greedy now prefers the unpenalised token.
        let mut l = vec![4.0, -1.0, 3.0];
        assert_eq!(s.sample(&mut l, &[0], None).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_top_p_cuts_the_tail() {
        let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(&sampling(1.0, 0.5, seed)).unwrap();
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[], None).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Classes 16, 15 and 14 (mod 17) hold 26%, 19% and 14% of the mass: top_p = 0.5
        // keeps those three and nothing else.
        let r = run(7);
        assert!(r.iter().all(|&t| t % 17 >= 14), "{r:?}");
        assert!(r.iter().any(|&t| t % 17 == 14), "{r:?}");
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        let mut x = 99u64;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        for (n, p, spread) in [
            (5000, 0.9, 1.0),
            (5000, 0.5, 20.0),
            (300, 0.99, 3.0),
            (1, 0.9, 1.0),
        ] {
            let cands: Vec<(u32, f32)> =
                (0..n).map(|i| (i as u32, (rnd() * spread).exp())).collect();
            let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
            let mut reference = cands.clone();
            reference.sort_by(by_weight_desc);
            let mut cum = 0.0;
            let want = reference
                .iter()
                .position(|c| {
                    cum += f64::from(c.1);
                    cum >= f64::from(p as f32) * total
                })
                .map_or(reference.len(), |i| i + 1);
            let mut got = cands.clone();
            let k = nucleus(&mut got, p as f32, total);
            assert_eq!(&got[..k], &reference[..want], "n={n} p={p}");
        }
    }

    #[test]
    fn a_constraint_masks_and_advances() {
        struct OnlyEven(Vec<u32>);
        impl LogitsConstraint for OnlyEven {
            fn mask(&mut self, allowed: &mut [bool]) {
                for (i, a) in allowed.iter_mut().enumerate() {
                    *a = i % 2 == 0;
                }
            }
            fn advance(&mut self, token: u32) -> Result<(), String> {
                self.0.push(token);
                Ok(())
            }
        }
        let mut c = OnlyEven(vec![]);
        let mut s = Sampler::new(&sampling(0.8, 0.95, 3)).unwrap();
        for _ in 0..20 {
            let mut l = vec![0.0, 5.0, 1.0, 5.0, 0.5];
            let t = s.sample(&mut l, &[], Some(&mut c)).unwrap();
            assert_eq!(t % 2, 0);
            c.advance(t).unwrap();
        }
        assert_eq!(c.0.len(), 20);
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// Cost of one sampling step over a 49,152-entry vocabulary (debug builds run this
    /// crate at opt-level 0): `cargo test --lib sampler_step_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing: run explicitly"]
    fn sampler_step_cost() {
        let mut x = 12345u64;
        let logits: Vec<f32> = (0..49_152)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
            })
            .collect();
        let history: Vec<u32> = (0..64).map(|i| i * 7).collect();
        for (name, s) in [
            (
                "greedy",
                Sampling {
                    temperature: 0.0,
                    ..Sampling::default()
                },
            ),
            (
                "default (t=0.2, top_p=0.9, penalty 1.1)",
                Sampling::default(),
            ),
            (
                "t=1.0, top_p=0.95",
                Sampling {
                    temperature: 1.0,
                    top_p: 0.95,
                    ..Sampling::default()
                },
            ),
        ] {
            let mut sampler = Sampler::new(&s).unwrap();
            let mut buf = logits.clone();
            let n = 200;
            let t = std::time::Instant::now();
            for _ in 0..n {
                buf.copy_from_slice(&logits);
                sampler.sample(&mut buf, &history, None).unwrap();
            }
            println!("{name}: {:?} per step", t.elapsed() / n);
        }
    }
}
