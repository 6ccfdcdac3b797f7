//! The llama forward pass, over quantised weights, for one or many sequences at once.
//!
//! [`Model`] holds the weights (read-only; shared by every sequence). A sequence's state is
//! its [`KvCache`]: keys and values of every token it has seen, per layer, in buffers that
//! grow by appending (no copy of the past per token). [`Model::forward`] runs a list of
//! [`Step`]s — each a sequence and the tokens to add to it (a prompt chunk, or one sampled
//! token) — through the layers together: the matmuls see all the steps' rows at once, so
//! the weights are read once for the whole batch ([`super::kernels`]); attention is done
//! per sequence against its own cache. It returns the logits of each step's last token.
//!
//! Exactness: every row's numbers depend only on that row and its own sequence's cache
//! (the kernels compute each output element the same way whatever else is in the batch,
//! and attention is per row), so a sequence gets bit-identical logits whether it runs
//! alone, in a batch, prefilled in one chunk or many, or restored from a prefix snapshot.

use candle_core::{quantized::gguf_file, Device};
use rayon::prelude::*;

use super::kernels::{dot_f32_1, KernelError, Scratch, Weights};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file: {0}")]
    File(String),
    #[error(transparent)]
    Tensor(#[from] KernelError),
    #[error("matmul: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("token {0} is outside the vocabulary")]
    Token(u32),
    #[error("{tokens} tokens from position {start} exceed the context of {context}")]
    Context {
        tokens: usize,
        start: usize,
        context: usize,
    },
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub eps: f32,
    pub rope_base: f32,
    pub vocab: usize,
    /// Positions the rotary table covers (the trained context, capped).
    pub context: usize,
}

/// Longest context prepared (rotary table and the caller's limit).
pub const MAX_CONTEXT: usize = 8192;

struct Layer {
    attn_norm: Vec<f32>,
    wq: Weights,
    wk: Weights,
    wv: Weights,
    wo: Weights,
    ffn_norm: Vec<f32>,
    gate: Weights,
    up: Weights,
    down: Weights,
}

pub struct Model {
    cfg: Config,
    /// Token embeddings (rows looked up per token).
    embd: Weights,
    /// The output projection; `None` when tied to the embeddings.
    output: Option<Weights>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// cos/sin of the rotary angles, `context` x `head_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("cfg", &self.cfg).finish()
    }
}

/// Keys and values of one sequence, per layer: `len` rows of `n_kv_head * head_dim`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.clear();
        }
        self.len = 0;
    }

    /// Bytes of keys and values held.
    pub fn size_in_bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|l| l.len() * std::mem::size_of::<f32>())
            .sum()
    }
}

/// One sequence's part of a forward pass.
pub struct Step<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

/// Buffers reused across forward passes.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    last: Vec<f32>,
    scratch: Scratch,
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Result<usize, ModelError> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .ok_or_else(|| ModelError::File(format!("metadata `{key}` is missing")))
}

fn load<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    name: &str,
) -> Result<Weights, ModelError> {
    let t = ct
        .tensor(reader, name, &Device::Cpu)
        .map_err(|e| ModelError::File(format!("tensor `{name}`: {e}")))?;
    Ok(Weights::from_qtensor(name, t)?)
}

fn load_vector<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    name: &str,
) -> Result<Vec<f32>, ModelError> {
    let t = ct
        .tensor(reader, name, &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| ModelError::File(format!("tensor `{name}`: {e}")))?;
    Ok(t)
}

fn meta_f32(ct: &gguf_file::Content, key: &str) -> Option<f32> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl Model {
    /// Reads a llama-architecture GGUF file.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
    ) -> Result<Self, ModelError> {
        let dim = meta_u32(ct, "llama.embedding_length")?;
        let n_head = meta_u32(ct, "llama.attention.head_count")?;
        let n_kv_head = meta_u32(ct, "llama.attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || dim % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::File(format!(
                "unsupported head layout: {dim} dims, {n_head} heads, {n_kv_head} kv heads"
            )));
        }
        let head_dim = dim / n_head;
        let rope_dim = meta_u32(ct, "llama.rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim || head_dim % 2 != 0 {
            return Err(ModelError::File(format!(
                "rotary dimension {rope_dim} with head size {head_dim} is not supported"
            )));
        }
        let context = meta_u32(ct, "llama.context_length")
            .unwrap_or(4096)
            .min(MAX_CONTEXT);
        let n_layer = meta_u32(ct, "llama.block_count")?;
        let ffn = meta_u32(ct, "llama.feed_forward_length")?;
        let eps = meta_f32(ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
        let rope_base = meta_f32(ct, "llama.rope.freq_base").unwrap_or(10_000.0);
        if ct.metadata.contains_key("llama.expert_count") {
            return Err(ModelError::File(
                "mixture-of-experts models are not supported".into(),
            ));
        }

        let embd = load(ct, reader, "token_embd.weight")?;
        let output = if ct.tensor_infos.contains_key("output.weight") {
            Some(load(ct, reader, "output.weight")?)
        } else {
            None
        };
        // Look-ups need rows as f32; types only candle can read are widened once.
        let embd = if embd.row(0, &mut vec![0f32; embd.cols()]).is_some() {
            embd
        } else {
            let t = ct
                .tensor(reader, "token_embd.weight", &Device::Cpu)
                .and_then(|t| t.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| ModelError::File(format!("token_embd.weight: {e}")))?;
            Weights::from_f32(embd.rows(), embd.cols(), t)
        };
        let norm = load_vector(ct, reader, "output_norm.weight")?;
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = format!("blk.{l}");
            layers.push(Layer {
                attn_norm: load_vector(ct, reader, &format!("{p}.attn_norm.weight"))?,
                wq: load(ct, reader, &format!("{p}.attn_q.weight"))?,
                wk: load(ct, reader, &format!("{p}.attn_k.weight"))?,
                wv: load(ct, reader, &format!("{p}.attn_v.weight"))?,
                wo: load(ct, reader, &format!("{p}.attn_output.weight"))?,
                ffn_norm: load_vector(ct, reader, &format!("{p}.ffn_norm.weight"))?,
                gate: load(ct, reader, &format!("{p}.ffn_gate.weight"))?,
                up: load(ct, reader, &format!("{p}.ffn_up.weight"))?,
                down: load(ct, reader, &format!("{p}.ffn_down.weight"))?,
            });
        }
        let vocab = embd.rows();
        let cfg = Config {
            n_layer,
            dim,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            eps,
            rope_base,
            vocab,
            context,
        };
        let kvd = n_kv_head * head_dim;
        let out_ok = output.as_ref().unwrap_or(&embd);
        let shapes_ok = embd.cols() == dim
            && out_ok.rows() == vocab
            && out_ok.cols() == dim
            && norm.len() == dim
            && layers.iter().all(|l| {
                (l.wq.rows(), l.wq.cols()) == (dim, dim)
                    && (l.wk.rows(), l.wk.cols()) == (kvd, dim)
                    && (l.wv.rows(), l.wv.cols()) == (kvd, dim)
                    && (l.wo.rows(), l.wo.cols()) == (dim, dim)
                    && (l.gate.rows(), l.gate.cols()) == (ffn, dim)
                    && (l.up.rows(), l.up.cols()) == (ffn, dim)
                    && (l.down.rows(), l.down.cols()) == (dim, ffn)
                    && l.attn_norm.len() == dim
                    && l.ffn_norm.len() == dim
            });
        if !shapes_ok {
            return Err(ModelError::File(
                "tensor shapes do not match the metadata".into(),
            ));
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for pos in 0..context {
            for i in 0..half {
                let theta = 1f32 / rope_base.powf((2 * i) as f32 / head_dim as f32);
                let a = pos as f32 * theta;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cfg,
            embd,
            output,
            norm,
            layers,
            cos,
            sin,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.size_in_bytes())
                    .sum::<usize>()
            })
            .sum();
        l + self.embd.size_in_bytes() + self.output.as_ref().map_or(0, Weights::size_in_bytes)
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            k: vec![Vec::new(); self.cfg.n_layer],
            v: vec![Vec::new(); self.cfg.n_layer],
            len: 0,
        }
    }

    /// Runs each step's tokens through the model after its cache (which grows by them);
    /// `logits` receives `steps.len()` rows of `vocab` values: each step's last token's.
    /// On error no cache has grown.
    pub fn forward(
        &self,
        steps: &mut [Step<'_>],
        ws: &mut Workspace,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let (dim, kvd) = (c.dim, c.n_kv_head * c.head_dim);
        // Rows: every step's tokens, in order; each with its step and position.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (s, st) in steps.iter_mut().enumerate() {
            if st.cache.len + st.tokens.len() > c.context {
                return Err(ModelError::Context {
                    tokens: st.tokens.len(),
                    start: st.cache.len,
                    context: c.context,
                });
            }
            if st.cache.k.len() != c.n_layer {
                *st.cache = self.new_cache();
            }
            for (t, &tok) in st.tokens.iter().enumerate() {
                if tok as usize >= c.vocab {
                    return Err(ModelError::Token(tok));
                }
                rows.push((s, st.cache.len + t));
            }
        }
        let m = rows.len();
        if m == 0 {
            logits.clear();
            return Ok(());
        }
        let Workspace {
            x,
            h,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
            last,
            scratch,
        } = ws;
        x.resize(m * dim, 0.0);
        let mut r = 0;
        for st in steps.iter() {
            for &tok in st.tokens {
                self.embd
                    .row(tok as usize, &mut x[r * dim..(r + 1) * dim])
                    .ok_or(ModelError::Token(tok))?;
                r += 1;
            }
        }
        h.resize(m * dim, 0.0);
        q.resize(m * dim, 0.0);
        k.resize(m * kvd, 0.0);
        v.resize(m * kvd, 0.0);
        att.resize(m * dim, 0.0);
        o.resize(m * dim, 0.0);
        g.resize(m * c.ffn, 0.0);
        u.resize(m * c.ffn, 0.0);
        let starts: Vec<usize> = steps.iter().map(|s| s.cache.len).collect();
        let layers = self.run_layers(steps, &rows, x, h, q, k, v, att, o, g, u, scratch);
        if let Err(e) = layers {
            // Leave every cache as it was.
            for (st, &start) in steps.iter_mut().zip(&starts) {
                for l in st.cache.k.iter_mut().chain(st.cache.v.iter_mut()) {
                    l.truncate(start * kvd);
                }
            }
            return Err(e);
        }
        for (st, start) in steps.iter_mut().zip(&starts) {
            st.cache.len = start + st.tokens.len();
        }

        // Logits of each step's last row only.
        let n = steps.len();
        last.resize(n * dim, 0.0);
        let mut r = 0;
        for (s, st) in steps.iter().enumerate() {
            r += st.tokens.len();
            let row = &x[(r - 1) * dim..r * dim];
            rms_norm(row, &self.norm, c.eps, &mut last[s * dim..(s + 1) * dim]);
        }
        logits.resize(n * c.vocab, 0.0);
        let out = self.output.as_ref().unwrap_or(&self.embd);
        out.matmul(last, n, logits, scratch)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        steps: &mut [Step<'_>],
        rows: &[(usize, usize)],
        x: &mut [f32],
        h: &mut [f32],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        att: &mut [f32],
        o: &mut [f32],
        g: &mut [f32],
        u: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let (dim, kvd, m) = (c.dim, c.n_kv_head * c.head_dim, rows.len());
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(x, &layer.attn_norm, c.eps, h);
            layer.wq.matmul(h, m, q, scratch)?;
            layer.wk.matmul(h, m, k, scratch)?;
            layer.wv.matmul(h, m, v, scratch)?;
            for (i, &(_, pos)) in rows.iter().enumerate() {
                self.rope(&mut q[i * dim..(i + 1) * dim], pos);
                self.rope(&mut k[i * kvd..(i + 1) * kvd], pos);
            }
            // Append this layer's keys and values to each sequence's cache.
            let mut r = 0;
            for st in steps.iter_mut() {
                let n = st.tokens.len();
                st.cache.k[li].extend_from_slice(&k[r * kvd..(r + n) * kvd]);
                st.cache.v[li].extend_from_slice(&v[r * kvd..(r + n) * kvd]);
                r += n;
            }
            let caches: Vec<(&[f32], &[f32])> = steps
                .iter()
                .map(|st| (st.cache.k[li].as_slice(), st.cache.v[li].as_slice()))
                .collect();
            self.attention(q, rows, &caches, att);
            layer.wo.matmul(att, m, o, scratch)?;
            add(x, o);
            rms_norm(x, &layer.ffn_norm, c.eps, h);
            layer.gate.matmul(h, m, g, scratch)?;
            layer.up.matmul(h, m, u, scratch)?;
            for (gi, ui) in g.iter_mut().zip(u.iter()) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            layer.down.matmul(g, m, o, scratch)?;
            add(x, o);
        }
        Ok(())
    }

    /// Interleaved rotary embedding of the heads in `x` at `pos`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Causal attention of every row's query heads over its own sequence's cache.
    ///
    /// Work is split by (sequence, kv head, block of rows): the query heads that share a
    /// kv head, for every row of the block, are walked over the keys together, so each key
    /// and value row is read once per block instead of once per query (grouped-query
    /// attention reads the cache `n_head / n_kv_head` times less). Each query's scores,
    /// softmax and weighted sum are computed in the same order whatever else is in its
    /// block, so results do not depend on batching or chunking.
    fn attention(
        &self,
        q: &[f32],
        rows: &[(usize, usize)],
        caches: &[(&[f32], &[f32])],
        out: &mut [f32],
    ) {
        /// Rows per work item.
        const BLOCK: usize = 16;
        let c = &self.cfg;
        let (hd, dim, kvd) = (c.head_dim, c.dim, c.n_kv_head * c.head_dim);
        let group = c.n_head / c.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        // (step, kv head, first row, end row); a step's rows are contiguous.
        let mut items = Vec::new();
        let mut r = 0;
        while r < rows.len() {
            let s = rows[r].0;
            let end = rows[r..].iter().take_while(|x| x.0 == s).count() + r;
            for a in (r..end).step_by(BLOCK) {
                for g in 0..c.n_kv_head {
                    items.push((s, g, a, (a + BLOCK).min(end)));
                }
            }
            r = end;
        }
        let work = |&(s, g, a, b): &(usize, usize, usize, usize)| -> Vec<f32> {
            let (kc, vc) = caches[s];
            let off = g * hd;
            // Queries: (row, head) for the heads of kv head g.
            let queries: Vec<(usize, usize)> = (a..b)
                .flat_map(|i| (g * group..(g + 1) * group).map(move |h| (i, h)))
                .collect();
            let len = rows[b - 1].1 + 1;
            let mut scores = vec![0f32; queries.len() * len];
            for j in 0..len {
                let kj = &kc[j * kvd + off..j * kvd + off + hd];
                for (qi, &(i, h)) in queries.iter().enumerate() {
                    if j <= rows[i].1 {
                        let qh = &q[i * dim + h * hd..i * dim + (h + 1) * hd];
                        scores[qi * len + j] = dot_head(qh, kj) * scale;
                    }
                }
            }
            let mut sums = vec![0f32; queries.len()];
            for (qi, &(i, _)) in queries.iter().enumerate() {
                let sc = &mut scores[qi * len..qi * len + rows[i].1 + 1];
                let max = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for x in sc.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                sums[qi] = sum;
            }
            let mut acc = vec![0f32; queries.len() * hd];
            for j in 0..len {
                let vj = &vc[j * kvd + off..j * kvd + off + hd];
                for (qi, &(i, _)) in queries.iter().enumerate() {
                    if j <= rows[i].1 {
                        let w = scores[qi * len + j] / sums[qi];
                        for (d, &vv) in acc[qi * hd..(qi + 1) * hd].iter_mut().zip(vj) {
                            *d += w * vv;
                        }
                    }
                }
            }
            acc
        };
        let total: usize = rows.iter().map(|&(_, p)| p + 1).sum();
        let results: Vec<Vec<f32>> = if total * c.n_head >= 2048 && items.len() > 1 {
            items.par_iter().map(work).collect()
        } else {
            items.iter().map(work).collect()
        };
        for (&(_, g, a, b), acc) in items.iter().zip(&results) {
            let mut qi = 0;
            for i in a..b {
                for h in g * group..(g + 1) * group {
                    out[i * dim + h * hd..i * dim + (h + 1) * hd]
                        .copy_from_slice(&acc[qi * hd..(qi + 1) * hd]);
                    qi += 1;
                }
            }
        }
    }
}

/// A dot product of two head vectors; 64-wide heads (the common size) take a fully
/// unrolled path. Attention always uses this one function, so its results do not depend
/// on which sequences share a pass.
fn dot_head(a: &[f32], b: &[f32]) -> f32 {
    match (<&[f32; 64]>::try_from(a), <&[f32; 64]>::try_from(b)) {
        (Ok(a), Ok(b)) => {
            let mut acc = [0f32; 8];
            for c in 0..8 {
                for l in 0..8 {
                    acc[l] += a[c * 8 + l] * b[c * 8 + l];
                }
            }
            acc.iter().sum()
        }
        _ => dot_f32_1(a, b),
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot_f32_1(xr, xr) / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * scale * wv;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
