//! The llama forward pass, over quantised weights, for one or many sequences at once.
//!
//! [`Model`] holds the weights (read-only; shared by every sequence). A sequence's
//! state is its [`KvCache`]: keys and values of every token it has seen, per layer and
//! kv head, in 8-bit buffers (a scale per 32 values) that grow by appending (no copy of
//! the past per token). [`Model::forward`] runs a list of [`Step`]s — each a sequence
//! and the tokens to add to it (a prompt chunk, or one sampled token) — through the
//! layers together: the matmuls see all the steps' rows at once, so the weights are
//! read once for the whole batch ([`super::kernels`]); attention is done per sequence
//! against its own cache. It returns the logits of each step's last token.
//!
//! Exactness: every row's numbers depend only on that row and its own sequence's cache
//! (the kernels compute each output element the same way whatever else is in the batch,
//! and attention is per row), so a sequence gets bit-identical logits whether it runs
//! alone, in a batch, prefilled in one chunk or many, or restored from a prefix snapshot.

use candle_core::{quantized::gguf_file, Device};
use rayon::prelude::*;

use super::kernels::{self, dot_f32_1, KernelError, Scratch, Weights};

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

/// Keys and values of one sequence, per layer and kv head (index `layer * n_kv_head +
/// head`): `len` rows of `head_dim` values each, as 8-bit quants with one f32 scale per
/// [`KV_BLOCK`] values ([`Stream`]). Decoding reads the whole cache once per token, so its
/// size is bandwidth: 8-bit rows are a little over half of f16 ones (72 against 128 bytes
/// for 64 values), and a head's rows side by side are read as one stream.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<Stream>,
    v: Vec<Stream>,
    len: usize,
}

/// Values per scale in the KV cache (as llama.cpp's `q8_0` cache type); a row whose width
/// is not a multiple of it has one scale.
const KV_BLOCK: usize = 32;

/// Values per scale in rows of `width`.
fn kv_block(width: usize) -> usize {
    if width.is_multiple_of(KV_BLOCK) {
        KV_BLOCK
    } else {
        width
    }
}

/// Scales of `rows` rows of `width` values.
fn kv_scales(rows: usize, width: usize) -> usize {
    rows * width / kv_block(width)
}

/// Whether `q` and `d` are `rows` rows of `width` quants and their scales.
fn kv_rows(q: &[i8], d: &[f32], rows: usize, width: usize) -> bool {
    q.len() == rows * width && d.len() == kv_scales(rows, width)
}

/// One layer's keys (or values) of one kv head: each block of a row as `q * d`, `q` in
/// -127..=127 and `d` the block's largest magnitude / 127. A row is quantised once, when it
/// is appended, by the same code whatever the pass, so every path that computes a row
/// stores the same bytes.
#[derive(Clone, Debug, Default, PartialEq)]
struct Stream {
    /// `width` quants per row.
    q: Vec<i8>,
    /// One scale per block: [`kv_scales`] of the rows.
    d: Vec<f32>,
}

impl Stream {
    /// Appends one row.
    fn push(&mut self, x: &[f32]) {
        for x in x.chunks(kv_block(x.len())) {
            let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            // Ties to even: one vector instruction (`round` is a libm call per value).
            self.q.extend(
                x.iter()
                    .map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8),
            );
            self.d.push(d);
        }
    }

    /// The quants and scales of the first `rows` rows (`width` values each).
    fn rows(&self, rows: usize, width: usize) -> (&[i8], &[f32]) {
        (&self.q[..rows * width], &self.d[..kv_scales(rows, width)])
    }

    /// Keeps the first `rows` rows (`width` values each).
    fn truncate(&mut self, rows: usize, width: usize) {
        self.q.truncate(rows * width);
        self.d.truncate(kv_scales(rows, width));
    }

    fn bytes(&self) -> usize {
        self.q.len() + self.d.len() * std::mem::size_of::<f32>()
    }
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
            l.truncate(0, 0);
        }
        self.len = 0;
    }

    /// A copy of the first `n` tokens (all of them when fewer are held).
    pub fn prefix(&self, n: usize) -> KvCache {
        let (rows, width) = (n.min(self.len), self.width());
        let cut = |l: &Stream| {
            let (q, d) = l.rows(rows, width);
            Stream {
                q: q.to_vec(),
                d: d.to_vec(),
            }
        };
        KvCache {
            k: self.k.iter().map(cut).collect(),
            v: self.v.iter().map(cut).collect(),
            len: rows,
        }
    }

    /// Makes room for `total` tokens in all (`head_dim` values per token and stream), so the
    /// cache grows without reallocating (and without the slack of doubling).
    pub fn reserve(&mut self, total: usize, head_dim: usize) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.q.reserve_exact((total * head_dim).saturating_sub(l.q.len()));
            l.d.reserve_exact(kv_scales(total, head_dim).saturating_sub(l.d.len()));
        }
    }

    /// Forgets every token after the first `n`, and the memory they held.
    pub fn truncate(&mut self, n: usize) {
        let (rows, width) = (n.min(self.len), self.width());
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(rows, width);
            l.q.shrink_to_fit();
            l.d.shrink_to_fit();
        }
        self.len = rows;
    }

    /// A cache of `len` tokens in `streams` streams of `width` values per token, each
    /// token's quants its index (mod 128) and its scales 1 (for tests of what uses caches).
    #[cfg(test)]
    pub(in crate::llm::local) fn numbered(streams: usize, width: usize, len: usize) -> KvCache {
        let stream = Stream {
            q: (0..len * width)
                .map(|i| ((i / width) % 128) as i8)
                .collect(),
            d: vec![1.0; kv_scales(len, width)],
        };
        KvCache {
            k: vec![stream.clone(); streams],
            v: vec![stream; streams],
            len,
        }
    }

    /// Values per token in each stream (the head dimension; 0 while empty).
    fn width(&self) -> usize {
        match self.k.first() {
            Some(l) if self.len > 0 => l.q.len() / self.len,
            _ => 0,
        }
    }

    /// Bytes of keys and values held.
    pub fn size_in_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Stream::bytes).sum()
    }
}

/// One layer of a sequence's cache: its keys and values, per kv head.
type LayerCache<'a> = (&'a [Stream], &'a [Stream]);

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
        let n = self.cfg.n_layer * self.cfg.n_kv_head;
        KvCache {
            k: vec![Stream::default(); n],
            v: vec![Stream::default(); n],
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
            if st.cache.k.len() != c.n_layer * c.n_kv_head {
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
                    l.truncate(start, c.head_dim);
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
            kernels::matmuls(
                h,
                m,
                &mut [(&layer.wq, q), (&layer.wk, k), (&layer.wv, v)],
                scratch,
            )?;
            for (i, &(_, pos)) in rows.iter().enumerate() {
                self.rope(&mut q[i * dim..(i + 1) * dim], pos);
                self.rope(&mut k[i * kvd..(i + 1) * kvd], pos);
            }
            // Append this layer's keys and values to each sequence's cache, per kv head.
            let (hd, nkv) = (c.head_dim, c.n_kv_head);
            let mut r = 0;
            for st in steps.iter_mut() {
                for t in r..r + st.tokens.len() {
                    for g in 0..nkv {
                        let at = t * kvd + g * hd;
                        let i = li * nkv + g;
                        st.cache.k[i].push(&k[at..at + hd]);
                        st.cache.v[i].push(&v[at..at + hd]);
                    }
                }
                r += st.tokens.len();
            }
            let caches: Vec<LayerCache<'_>> = steps
                .iter()
                .map(|st| {
                    let heads = li * nkv..(li + 1) * nkv;
                    (&st.cache.k[heads.clone()], &st.cache.v[heads])
                })
                .collect();
            self.attention(q, rows, &caches, att);
            layer.wo.matmul(att, m, o, scratch)?;
            add(x, o);
            rms_norm(x, &layer.ffn_norm, c.eps, h);
            kernels::matmuls(h, m, &mut [(&layer.gate, g), (&layer.up, u)], scratch)?;
            let swiglu = |(g, u): (&mut [f32], &[f32])| head::silu_mul(g, u);
            if m > 1 {
                g.par_chunks_mut(c.ffn)
                    .zip(u.par_chunks(c.ffn))
                    .for_each(swiglu);
            } else {
                swiglu((g, u));
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
    /// Work is split by (sequence, kv head, block of rows), so even one decoding row
    /// keeps every core busy; a work item computes the query heads that share its kv
    /// head together, so each key and value is loaded and widened from 8 bits once for all
    /// of them. Each query's scores, softmax and weighted sum are computed by the same
    /// instructions whatever else is in its block or pass ([`head`]), so results do not
    /// depend on batching or chunking.
    fn attention(
        &self,
        q: &[f32],
        rows: &[(usize, usize)],
        caches: &[LayerCache<'_>],
        out: &mut [f32],
    ) {
        /// Rows per work item.
        const BLOCK: usize = 16;
        let c = &self.cfg;
        let (hd, dim) = (c.head_dim, c.dim);
        let group = c.n_head / c.n_kv_head;
        let gw = group * hd;
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
            let (kh, vh) = (&kc[g], &vc[g]);
            let longest = rows[b - 1].1 + 1;
            let mut scores = vec![0f32; group * longest];
            let mut acc = vec![0f32; (b - a) * gw];
            let mut sums = Vec::with_capacity(group);
            for (i, o) in (a..b).zip(acc.chunks_exact_mut(gw)) {
                let n = rows[i].1 + 1;
                // The query heads of kv head `g` are contiguous in the row.
                let qg = &q[i * dim + g * gw..i * dim + (g + 1) * gw];
                let sc = &mut scores[..group * n];
                let (kq, kd) = kh.rows(n, hd);
                head::scores(qg, group, kq, kd, scale, sc);
                sums.clear();
                sums.extend(sc.chunks_exact_mut(n).map(head::softmax));
                let (vq, vd) = vh.rows(n, hd);
                head::weighted_sum(sc, group, vq, vd, o);
                for (o, &sum) in o.chunks_exact_mut(hd).zip(&sums) {
                    let inv = 1.0 / sum;
                    for x in o.iter_mut() {
                        *x *= inv;
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
        for (&(_, g, a, _), acc) in items.iter().zip(&results) {
            for (i, o) in (a..).zip(acc.chunks_exact(gw)) {
                out[i * dim + g * gw..i * dim + (g + 1) * gw].copy_from_slice(o);
            }
        }
    }
}

/// Query heads against their kv head's 8-bit keys and values ([`Stream`]: quants `k`, `v`
/// and their block scales `kd`, `vd`). Every key's score and every value's weight go
/// through the same instructions whatever the number of keys or of heads computed
/// together, so a query's result depends only on the query and the cache.
mod head {
    use super::{kv_block, kv_rows};

    /// For each of the `heads` queries in `q` (rows of `d = q.len() / heads`) and each of
    /// the `n = out.len() / heads` rows of `k` (block scales `kd`, `d / kv_block(d)` per
    /// row): `out[h * n + j] = dot(q_h, k_j) * scale`. Each block's eight lanes are scaled
    /// and added up lane by lane, then the lanes are summed.
    pub fn scores(q: &[f32], heads: usize, k: &[i8], kd: &[f32], scale: f32, out: &mut [f32]) {
        let (d, n) = (q.len() / heads, out.len() / heads);
        let blk = kv_block(d);
        assert!(q.len() == heads * d && out.len() == heads * n && kv_rows(k, kd, n, d));
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        if d == 64 {
            // SAFETY: the CPU features are enabled at compile time (cfg); the lengths are
            // asserted above.
            unsafe {
                match heads {
                    1 => return avx2::scores64::<1>(q, k, kd, scale, out),
                    2 => return avx2::scores64::<2>(q, k, kd, scale, out),
                    3 => return avx2::scores64::<3>(q, k, kd, scale, out),
                    4 => return avx2::scores64::<4>(q, k, kd, scale, out),
                    _ => {
                        for h in 0..heads {
                            avx2::scores64::<1>(
                                &q[h * 64..(h + 1) * 64],
                                k,
                                kd,
                                scale,
                                &mut out[h * n..(h + 1) * n],
                            );
                        }
                        return;
                    }
                }
            }
        }
        for (qh, out) in q.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
            let keys = k.chunks_exact(d).zip(kd.chunks_exact(d / blk));
            for (o, (kj, dj)) in out.iter_mut().zip(keys) {
                let mut acc = [0f32; 8];
                for ((qb, kb), &s) in qh.chunks(blk).zip(kj.chunks(blk)).zip(dj) {
                    let mut part = [0f32; 8];
                    for (qc, kc) in qb.chunks(8).zip(kb.chunks(8)) {
                        for (l, (&a, &b)) in qc.iter().zip(kc).enumerate() {
                            part[l] = a.mul_add(f32::from(b), part[l]);
                        }
                    }
                    for (a, p) in acc.iter_mut().zip(part) {
                        *a = p.mul_add(s, *a);
                    }
                }
                *o = ((acc[0] + acc[1])
                    + (acc[2] + acc[3])
                    + ((acc[4] + acc[5]) + (acc[6] + acc[7])))
                    * scale;
            }
        }
    }

    /// Turns scores into `exp(x - max)` in place and returns their sum.
    pub fn softmax(x: &mut [f32]) -> f32 {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: the CPU features are enabled at compile time (cfg).
        unsafe {
            avx2::exp_sum(x, max)
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        {
            let mut sum = 0f32;
            for v in x.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            sum
        }
    }

    /// SwiGLU's product: `g[i] = silu(g[i]) * u[i]`, `silu(x) = x / (1 + e^-x)`.
    pub fn silu_mul(g: &mut [f32], u: &[f32]) {
        assert_eq!(g.len(), u.len());
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: the CPU features are enabled at compile time (cfg); the lengths are equal.
        unsafe {
            avx2::silu_mul(g, u)
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        for (gi, ui) in g.iter_mut().zip(u) {
            *gi = *gi / (1.0 + (-*gi).exp()) * ui;
        }
    }

    /// For each of the `heads` weight rows in `w` (of `n` weights each): `out_h = sum_j
    /// w_h[j] * v_j` over the `n` rows of `v` (rows of `d = out.len() / heads`, block scales
    /// `vd` as in [`scores`]); each block's values are multiplied by `w_h[j]` times the
    /// block's scale.
    pub fn weighted_sum(w: &[f32], heads: usize, v: &[i8], vd: &[f32], out: &mut [f32]) {
        let (d, n) = (out.len() / heads, w.len() / heads);
        let blk = kv_block(d);
        assert!(out.len() == heads * d && w.len() == heads * n && kv_rows(v, vd, n, d));
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        if d == 64 {
            // SAFETY: as for `scores`.
            unsafe {
                match heads {
                    1 => return avx2::weighted_sum64::<1, 4>(w, v, vd, out),
                    2 => return avx2::weighted_sum64::<2, 4>(w, v, vd, out),
                    3 => return avx2::weighted_sum64::<3, 2>(w, v, vd, out),
                    4 => return avx2::weighted_sum64::<4, 2>(w, v, vd, out),
                    _ => {
                        for h in 0..heads {
                            avx2::weighted_sum64::<1, 4>(
                                &w[h * n..(h + 1) * n],
                                v,
                                vd,
                                &mut out[h * 64..(h + 1) * 64],
                            );
                        }
                        return;
                    }
                }
            }
        }
        for (wh, out) in w.chunks_exact(n).zip(out.chunks_exact_mut(d)) {
            out.fill(0.0);
            let rows = v.chunks_exact(d).zip(vd.chunks_exact(d / blk));
            for (&wj, (vj, dj)) in wh.iter().zip(rows) {
                for ((ob, vb), &s) in out.chunks_mut(blk).zip(vj.chunks(blk)).zip(dj) {
                    let s = wj * s;
                    for (o, &x) in ob.iter_mut().zip(vb) {
                        *o = s.mul_add(f32::from(x), *o);
                    }
                }
            }
        }
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    mod avx2 {
        use std::arch::x86_64::*;

        // Rows of 64 are two blocks of 32.
        const _: () = assert!(super::super::KV_BLOCK == 32);

        /// Eight quants, widened to f32.
        #[inline(always)]
        unsafe fn load8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
        }

        /// The sum of the eight lanes as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let lo = _mm_hadd_ps(lo, lo); // l0+l1, l2+l3
            let hi = _mm_hadd_ps(hi, hi); // l4+l5, l6+l7
            let lo = _mm_hadd_ps(lo, lo);
            let hi = _mm_hadd_ps(hi, hi);
            _mm_cvtss_f32(_mm_add_ss(lo, hi))
        }

        /// [`hsum`] of each of four vectors, as one 4-lane vector. Within each 128-bit half,
        /// hadd(a, b) gives (a0+a1, a2+a3, b0+b1, b2+b3); a second round gives
        /// ((a0+a1)+(a2+a3), ...) for the four vectors; the halves then hold lanes 0..4 and
        /// 4..8 of each vector, and one add joins them.
        #[inline(always)]
        unsafe fn hsum4(a: &[__m256; 4]) -> __m128 {
            let h01 = _mm256_hadd_ps(a[0], a[1]);
            let h23 = _mm256_hadd_ps(a[2], a[3]);
            let g = _mm256_hadd_ps(h01, h23);
            _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1))
        }

        /// One block of 32 quants against `G` queries (32 values into each query's row):
        /// for each, eight lanes accumulated over the four 8-wide chunks, in order. The
        /// key's chunks are widened once for all queries.
        #[inline(always)]
        unsafe fn dot32<const G: usize>(q: *const f32, k: *const i8) -> [__m256; G] {
            let k0 = load8(k);
            let mut acc: [__m256; G] =
                std::array::from_fn(|h| _mm256_mul_ps(_mm256_loadu_ps(q.add(h * 64)), k0));
            for c in 1..4 {
                let kc = load8(k.add(c * 8));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * 64 + c * 8)), kc, *a);
                }
            }
            acc
        }

        /// One key (two blocks, scales `kd[0..2]`) against `G` queries: each block's lanes
        /// ([`dot32`]) times its scale, added lane by lane (the first block's product, then
        /// a fused multiply-add), as the generic loop does.
        #[inline(always)]
        unsafe fn dot64<const G: usize>(
            q: *const f32,
            k: *const i8,
            kd: *const f32,
        ) -> [__m256; G] {
            let a = dot32::<G>(q, k);
            let d0 = _mm256_set1_ps(*kd);
            let mut acc: [__m256; G] = std::array::from_fn(|h| _mm256_mul_ps(a[h], d0));
            let b = dot32::<G>(q.add(32), k.add(32));
            let d1 = _mm256_set1_ps(*kd.add(1));
            for (acc, b) in acc.iter_mut().zip(b) {
                *acc = _mm256_fmadd_ps(b, d1, *acc);
            }
            acc
        }

        /// Safety: AVX2, FMA; `q` holds `G` rows of 64, `k` `n` rows of 64, `kd` `2 n`
        /// scales and `out` `G * n` values.
        #[allow(clippy::needless_range_loop)] // indices into two arrays at once
        pub unsafe fn scores64<const G: usize>(
            q: &[f32],
            k: &[i8],
            kd: &[f32],
            scale: f32,
            out: &mut [f32],
        ) {
            let (qp, kp, kdp) = (q.as_ptr(), k.as_ptr(), kd.as_ptr());
            let n = out.len() / G;
            let op = out.as_mut_ptr();
            let mut j = 0;
            // Four keys per round (the `G` heads' lanes of four keys: twelve registers for
            // three heads, where eight keys took 24 and spilled): their lanes are computed as in the one-key tail and summed by a
            // tree of horizontal adds that adds each key's lanes in hsum's order, four keys
            // at once.
            let sv = _mm_set1_ps(scale);
            while j + 4 <= n {
                let mut a = [[_mm256_setzero_ps(); 4]; G];
                for i in 0..4 {
                    let d = dot64::<G>(qp, kp.add((j + i) * 64), kdp.add((j + i) * 2));
                    for h in 0..G {
                        a[h][i] = d[h];
                    }
                }
                for (h, a) in a.iter().enumerate() {
                    _mm_storeu_ps(op.add(h * n + j), _mm_mul_ps(hsum4(a), sv));
                }
                j += 4;
            }
            while j < n {
                let d = dot64::<G>(qp, kp.add(j * 64), kdp.add(j * 2));
                for (h, d) in d.iter().enumerate() {
                    *op.add(h * n + j) = hsum(*d) * scale;
                }
                j += 1;
            }
        }

        /// Safety: AVX2, FMA; `w` holds `G` rows of `n` weights, `v` `n` rows of 64, `vd`
        /// `2 n` scales and `out` `G` rows of 64; `C` is 2 or 4 (a part lies in one block).
        ///
        /// Each output lane accumulates its weighted values in key order; the 64 lanes go in
        /// parts of `C` chunks of eight so that the `G` heads' accumulators (`G * C`) fit in
        /// registers with room to spare (three heads and four chunks would spill).
        #[allow(clippy::needless_range_loop)] // indices into two arrays at once
        pub unsafe fn weighted_sum64<const G: usize, const C: usize>(
            w: &[f32],
            v: &[i8],
            vd: &[f32],
            out: &mut [f32],
        ) {
            let n = w.len() / G;
            let (wp, vp, vdp) = (w.as_ptr(), v.as_ptr(), vd.as_ptr());
            for part in 0..8 / C {
                let mut acc = [[_mm256_setzero_ps(); C]; G];
                for j in 0..n {
                    let row = vp.add(j * 64 + part * C * 8);
                    // The scale of the block this part lies in.
                    let s = *vdp.add(j * 2 + part * C * 8 / 32);
                    let wv: [__m256; G] =
                        std::array::from_fn(|h| _mm256_set1_ps(*wp.add(h * n + j) * s));
                    for c in 0..C {
                        let vc = load8(row.add(c * 8));
                        for h in 0..G {
                            acc[h][c] = _mm256_fmadd_ps(wv[h], vc, acc[h][c]);
                        }
                    }
                }
                for (h, acc) in acc.iter().enumerate() {
                    for (c, a) in acc.iter().enumerate() {
                        let at = h * 64 + part * C * 8 + c * 8;
                        _mm256_storeu_ps(out.as_mut_ptr().add(at), *a);
                    }
                }
            }
        }

        /// `e^x` for eight lanes: range reduction by ln 2 and a degree-5 polynomial
        /// (Cephes' expf), about 1 ulp; inputs below -87.3 give e^-87.3, above 88.3 e^88.3.
        #[inline(always)]
        unsafe fn exp8(x: __m256) -> __m256 {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-87.336_54)),
                _mm256_set1_ps(88.376_26),
            );
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let r2 = _mm256_mul_ps(r, r);
            let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
            let e = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            _mm256_mul_ps(y, _mm256_castsi256_ps(e))
        }

        /// `g = g / (1 + e^-g) * u`, eight lanes at a time; the tail goes through the same
        /// lanes (its unused ones are zero, and dropped).
        /// Safety: AVX2 and FMA; `u` is as long as `g`.
        pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
            let one = _mm256_set1_ps(1.0);
            let f = |gv: __m256, uv: __m256| {
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv)
            };
            let n = g.len() / 8 * 8;
            let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
            for i in (0..n).step_by(8) {
                let r = f(_mm256_loadu_ps(gp.add(i)), _mm256_loadu_ps(up.add(i)));
                _mm256_storeu_ps(gp.add(i), r);
            }
            if n < g.len() {
                let (mut gb, mut ub) = ([0f32; 8], [0f32; 8]);
                let t = g.len() - n;
                gb[..t].copy_from_slice(&g[n..]);
                ub[..t].copy_from_slice(&u[n..]);
                let r = f(_mm256_loadu_ps(gb.as_ptr()), _mm256_loadu_ps(ub.as_ptr()));
                _mm256_storeu_ps(gb.as_mut_ptr(), r);
                g[n..].copy_from_slice(&gb[..t]);
            }
        }

        /// `x[j] = e^(x[j] - max)` and their sum (eight lanes in order, then [`hsum`]).
        /// Safety: AVX2 and FMA.
        pub unsafe fn exp_sum(x: &mut [f32], max: f32) -> f32 {
            let mv = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            let mut chunks = x.chunks_exact_mut(8);
            for c in &mut chunks {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                sum = _mm256_add_ps(sum, e);
            }
            let tail = chunks.into_remainder();
            if !tail.is_empty() {
                // The tail goes through the same lanes, its unused ones zeroed.
                let mut buf = [max; 8];
                buf[..tail.len()].copy_from_slice(tail);
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let used = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail.len() as i32), lane);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mv));
                let e = _mm256_and_ps(e, _mm256_castsi256_ps(used));
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
                tail.copy_from_slice(&buf[..tail.len()]);
                sum = _mm256_add_ps(sum, e);
            }
            hsum(sum)
        }
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

#[cfg(test)]
mod tests {
    use super::{head, KvCache, Stream};
    use crate::llm::local::kernels::tests::data as values;

    #[test]
    fn a_cache_prefix_and_a_truncated_cache_hold_the_first_tokens() {
        let c = KvCache::numbered(3, 4, 10);
        let p = c.prefix(6);
        assert_eq!(p.len(), 6);
        // Per token and stream: 4 quants and one f32 scale.
        assert_eq!(p.size_in_bytes(), 2 * 3 * (4 + 4) * 6);
        assert_eq!(p.k[2].q[..], c.k[2].q[..24]);
        assert_eq!((p.k[2].d.len(), p.v[0].q.last()), (6, Some(&5)));
        assert_eq!(c.prefix(99).len(), 10);
        let mut t = c.clone();
        t.truncate(6);
        assert_eq!((t.len(), &t.k, &t.v), (6, &p.k, &p.v));
        t.truncate(0);
        assert!(t.is_empty() && t.size_in_bytes() == 0);
        assert_eq!(t.prefix(3).len(), 0);
    }

    /// `n` rows of `d` values, stored as the cache stores them.
    fn stream(n: usize, d: usize, seed: u32) -> Stream {
        let mut s = Stream::default();
        for row in values(n * d, seed).chunks_exact(d) {
            s.push(row);
        }
        s
    }

    #[test]
    fn cache_rows_are_quantised_to_within_half_a_step_of_their_values() {
        // The second block ten times the first: each has its own scale.
        let x: Vec<f32> = values(64, 9)
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i < 32 { v } else { v * 10.0 })
            .collect();
        let mut s = Stream::default();
        s.push(&x);
        s.push(&[0.0; 64]);
        assert_eq!((s.q.len(), s.d.len()), (128, 4));
        for (b, (x, q)) in x.chunks(32).zip(s.q.chunks(32)).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = s.d[b];
            assert_eq!(d, amax / 127.0, "block {b}");
            assert!(q.iter().any(|q| q.abs() == 127), "block {b}");
            for (&q, &v) in q.iter().zip(x) {
                let err = (f32::from(q) * d - v).abs();
                assert!(err <= d * 0.5 + 1e-6, "{v} stored as {q} * {d}");
            }
        }
        // An all-zero row: scales 0, quants 0 (no division by zero).
        assert_eq!((&s.d[2..], &s.q[64..]), (&[0.0; 2][..], &[0i8; 64][..]));
        s.truncate(1, 64);
        assert_eq!((s.q.len(), s.d.len(), s.bytes()), (64, 2, 72));
        // A row that is not a multiple of the block has one scale.
        let mut odd = Stream::default();
        odd.push(&x[..24]);
        assert_eq!((odd.q.len(), odd.d.len()), (24, 1));
    }

    #[test]
    fn head_scores_and_weighted_sum_match_a_plain_loop_and_do_not_depend_on_length() {
        for d in [64, 24] {
            let n = 37;
            let q = values(d, 1);
            let (k, v) = (stream(n, d, 2), stream(n, d, 3));
            let (kq, kd) = (&k.q[..], &k.d[..]);
            let per = d / super::kv_block(d); // scales per row
            let blk = d / per;
            let key =
                |j: usize, c: usize| f64::from(kq[j * d + c]) * f64::from(kd[j * per + c / blk]);
            let value =
                |j: usize, c: usize| f64::from(v.q[j * d + c]) * f64::from(v.d[j * per + c / blk]);
            let mut s = vec![0f32; n];
            head::scores(&q, 1, kq, kd, 0.125, &mut s);
            for j in 0..n {
                let want: f64 = (0..d).map(|c| f64::from(q[c]) * key(j, c)).sum::<f64>() * 0.125;
                assert!((f64::from(s[j]) - want).abs() < 1e-4, "d {d} key {j}");
                // The same key scored alone (or as part of a shorter cache) gives the same bits.
                let mut one = [0f32; 1];
                let kdj = &kd[j * per..(j + 1) * per];
                head::scores(&q, 1, &kq[j * d..(j + 1) * d], kdj, 0.125, &mut one);
                assert_eq!(one[0].to_bits(), s[j].to_bits(), "d {d} key {j} alone");
                let mut prefix = vec![0f32; j + 1];
                head::scores(
                    &q,
                    1,
                    &kq[..(j + 1) * d],
                    &kd[..(j + 1) * per],
                    0.125,
                    &mut prefix,
                );
                assert_eq!(prefix[j].to_bits(), s[j].to_bits(), "d {d} prefix {j}");
            }
            let w = values(n, 4);
            let mut out = vec![0f32; d];
            head::weighted_sum(&w, 1, &v.q, &v.d, &mut out);
            for (c, &got) in out.iter().enumerate() {
                let want: f64 = (0..n).map(|j| f64::from(w[j]) * value(j, c)).sum();
                assert!((f64::from(got) - want).abs() < 1e-4, "d {d} lane {c}");
            }
            // Heads computed together (queries sharing a kv head) give each head's bits alone.
            for heads in 2..=5 {
                let qs = values(heads * d, 5);
                let ws = values(heads * n, 6);
                let mut s = vec![0f32; heads * n];
                head::scores(&qs, heads, kq, kd, 0.125, &mut s);
                let mut out = vec![0f32; heads * d];
                head::weighted_sum(&ws, heads, &v.q, &v.d, &mut out);
                for h in 0..heads {
                    let mut one = vec![0f32; n];
                    head::scores(&qs[h * d..(h + 1) * d], 1, kq, kd, 0.125, &mut one);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&s[h * n..(h + 1) * n]),
                        bits(&one),
                        "d {d} {heads} heads: scores of {h}"
                    );
                    let mut alone = vec![0f32; d];
                    head::weighted_sum(&ws[h * n..(h + 1) * n], 1, &v.q, &v.d, &mut alone);
                    assert_eq!(
                        bits(&out[h * d..(h + 1) * d]),
                        bits(&alone),
                        "d {d} {heads} heads: sum of {h}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_formula_at_every_length() {
        let g: Vec<f32> = values(45, 4).into_iter().map(|v| v * 30.0).collect();
        let u = values(45, 5);
        for n in [0, 1, 7, 8, 9, 45] {
            let mut got = g[..n].to_vec();
            head::silu_mul(&mut got, &u[..n]);
            for (i, &v) in got.iter().enumerate() {
                let x = f64::from(g[i]);
                let want = x / (1.0 + (-x).exp()) * f64::from(u[i]);
                assert!(
                    (f64::from(v) - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "n {n} at {i}: {v} vs {want}"
                );
            }
        }
        // Far out: no overflow to NaN, silu(-100) ~ 0, silu(100) = 100.
        let mut x = vec![-100.0, 100.0, -1e30, 1e30];
        head::silu_mul(&mut x, &[1.0; 4]);
        assert!(
            x[0].abs() < 1e-30 && x[1] == 100.0 && x[2].abs() < 1e-6,
            "{x:?}"
        );
        assert_eq!(x[3], 1e30);
    }

    #[test]
    fn softmax_weights_match_exp_and_do_not_depend_on_length() {
        let x: Vec<f32> = values(29, 8).into_iter().map(|v| v * 20.0).collect();
        for n in 1..=x.len() {
            let mut e = x[..n].to_vec();
            let sum = head::softmax(&mut e);
            let max = x[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut want_sum = 0f64;
            for (j, &v) in e.iter().enumerate() {
                let want = f64::from(x[j] - max).exp();
                want_sum += want;
                assert!(
                    (f64::from(v) - want).abs() <= 1e-6 * want.max(1e-30) + 1e-37,
                    "n {n} key {j}: {v} vs {want}"
                );
            }
            assert!(
                (f64::from(sum) - want_sum).abs() <= 1e-5 * want_sum,
                "n {n}: {sum} vs {want_sum}"
            );
            // A key's weight is the same whatever the length, for the same max.
            if n > 1 {
                let mut shorter = x[..n - 1].to_vec();
                let m2 = shorter.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                if m2 == max {
                    head::softmax(&mut shorter);
                    assert_eq!(shorter[..], e[..n - 1], "n {n}");
                }
            }
        }
        // Far below the max: a weight of (almost) zero, never NaN.
        let mut e = vec![0.0, -1e30, f32::NEG_INFINITY];
        let sum = head::softmax(&mut e);
        assert_eq!(e[0], 1.0);
        assert!(
            e[1] < 1e-37 && e[2] < 1e-37 && e[1] >= 0.0 && e[2] >= 0.0,
            "{e:?}"
        );
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
