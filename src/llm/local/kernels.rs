//! Quantised matrix multiplication for the local model.
//!
//! Weights stay in the GGUF file's block format ([`Weights`]); activations are quantised
//! per row to 8-bit blocks ([`BlockQ8`]) once per matmul and shared by every weight row.
//! The loop order is what makes prompt processing fast: a weight row (a few hundred bytes)
//! is unpacked once and dotted with up to four activation rows while it sits in L1, so a
//! prompt of `m` tokens streams the weights once instead of `m` times (candle's quantised
//! matmul walks the weights once per row, which makes prefill as memory-bound as decoding).
//!
//! Every output element is `dot(weight row, activation row)` computed by the same sequence
//! of instructions whatever the other rows are: a row gives bit-identical results alone, in
//! a prompt chunk, or in a batch of sequences. The batched and cached-prefix paths rely on it.
//!
//! Q4_1 and Q8_0 (the default model's types) have AVX2 kernels; F32/F16 weights are kept
//! as f32; any other GGML type goes through candle's `QMatMul` (correct, slower).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block (Q4_1, Q8_0 and the activations' Q8).
pub const QK: usize = 32;

/// GGML Q4_1 as stored in the file: `value = d * q + m`, q in 0..16 (f16 scales); low
/// nibbles are elements 0..16, high nibbles 16..32.
#[repr(C)]
#[derive(Clone, Copy)]
struct FileQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}

/// GGML Q8_0 as stored in the file: `value = d * q` (f16 scale).
#[repr(C)]
#[derive(Clone, Copy)]
struct FileQ8_0 {
    d: u16,
    qs: [i8; QK],
}

/// Q4_1 repacked at load time with an f32 scale (the same value: f16 widens exactly), so
/// the kernels broadcast it straight from memory instead of converting each one. The
/// block's offset `m` is kept apart, in a row-major array of its own ([`Data::Q4_1`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    d: f32,
    qs: [u8; QK / 2],
}

/// Q8_0 repacked with an f32 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    d: f32,
    qs: [i8; QK],
}

/// An activation block: `value = d * q`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8 {
    d: f32,
    qs: [i8; QK],
}

impl BlockQ8 {
    const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK],
    };
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
}

/// A weight matrix of `rows` x `cols` (each row one output feature, `cols` the inputs).
pub struct Weights {
    rows: usize,
    cols: usize,
    data: Data,
}

enum Data {
    /// The blocks, and each block's offset `m` (same order): Q4_1's offset term of a dot
    /// product, `sum over blocks of m * d_x * sum(q_x)`, is then a short f32 dot product
    /// of a weight row's offsets with the activation row's block sums.
    Q4_1 {
        blocks: Vec<BlockQ4_1>,
        mins: Vec<f32>,
    },
    Q8_0(Vec<BlockQ8_0>),
    F32(Vec<f32>),
    Candle(QMatMul),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.data {
            Data::Q4_1 { .. } => "q4_1",
            Data::Q8_0(_) => "q8_0",
            Data::F32(_) => "f32",
            Data::Candle(_) => "candle",
        };
        write!(f, "Weights({kind}, {}x{})", self.rows, self.cols)
    }
}

/// Copies raw little-endian bytes into a vector of plain-old-data blocks.
fn blocks_from_bytes<T: Copy>(bytes: &[u8], zero: T) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    let mut v = vec![zero; n];
    // SAFETY: T is a repr(C) struct of integers (every bit pattern is valid); the
    // destination holds exactly n * size bytes and does not overlap the source.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size);
    }
    v
}

impl Weights {
    /// Takes a 2-D tensor of the GGUF file (`rows` x `cols`, row-major).
    pub fn from_qtensor(name: &str, t: QTensor) -> Result<Self, KernelError> {
        let err = |msg: String| KernelError::Tensor {
            name: name.to_string(),
            msg,
        };
        let (rows, cols) = t
            .shape()
            .dims2()
            .map_err(|e| err(format!("not a matrix: {e}")))?;
        let data = match t.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
                let bytes = t.data().map_err(|e| err(e.to_string()))?;
                let blocks = rows * cols / QK;
                if cols % QK != 0 {
                    return Err(err(format!("{cols} columns is not a multiple of {QK}")));
                }
                let f16 = |b: u16| f16::from_bits(b).to_f32();
                if t.dtype() == GgmlDType::Q4_1 {
                    let zero = FileQ4_1 {
                        d: 0,
                        m: 0,
                        qs: [0; QK / 2],
                    };
                    let v = blocks_from_bytes(&bytes, zero);
                    if v.len() != blocks {
                        return Err(err(format!("{} blocks, expected {blocks}", v.len())));
                    }
                    Data::Q4_1 {
                        blocks: v
                            .iter()
                            .map(|b| BlockQ4_1 {
                                d: f16(b.d),
                                qs: b.qs,
                            })
                            .collect(),
                        mins: v.iter().map(|b| f16(b.m)).collect(),
                    }
                } else {
                    let v = blocks_from_bytes(&bytes, FileQ8_0 { d: 0, qs: [0; QK] });
                    if v.len() != blocks {
                        return Err(err(format!("{} blocks, expected {blocks}", v.len())));
                    }
                    Data::Q8_0(
                        v.iter()
                            .map(|b| BlockQ8_0 {
                                d: f16(b.d),
                                qs: b.qs,
                            })
                            .collect(),
                    )
                }
            }
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let d = t
                    .dequantize(&candle_core::Device::Cpu)
                    .and_then(|d| d.flatten_all())
                    .and_then(|d| d.to_vec1::<f32>())
                    .map_err(|e| err(e.to_string()))?;
                Data::F32(d)
            }
            _ => Data::Candle(QMatMul::from_qtensor(t).map_err(|e| err(e.to_string()))?),
        };
        Ok(Self { rows, cols, data })
    }

    /// Weights given as f32 values (`rows` x `cols`, row-major).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            rows,
            cols,
            data: Data::F32(data),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held by the weights.
    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            Data::Q4_1 { blocks, mins } => {
                std::mem::size_of_val(blocks.as_slice()) + std::mem::size_of_val(mins.as_slice())
            }
            Data::Q8_0(v) => std::mem::size_of_val(v.as_slice()),
            Data::F32(v) => std::mem::size_of_val(v.as_slice()),
            Data::Candle(_) => 0,
        }
    }

    /// Row `r` as f32 (an embedding lookup). `None` for candle-held types.
    pub fn row(&self, r: usize, out: &mut [f32]) -> Option<()> {
        let c = self.cols;
        if r >= self.rows || out.len() != c {
            return None;
        }
        match &self.data {
            Data::Q4_1 { blocks, mins } => {
                let row = r * c / QK..(r + 1) * c / QK;
                for ((b, &m), o) in blocks[row.clone()]
                    .iter()
                    .zip(&mins[row])
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = b.d;
                    for j in 0..QK / 2 {
                        o[j] = f32::from(b.qs[j] & 0x0F) * d + m;
                        o[j + QK / 2] = f32::from(b.qs[j] >> 4) * d + m;
                    }
                }
            }
            Data::Q8_0(v) => {
                for (b, o) in v[r * c / QK..(r + 1) * c / QK]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = b.d;
                    for (o, &q) in o.iter_mut().zip(&b.qs) {
                        *o = f32::from(q) * d;
                    }
                }
            }
            Data::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            Data::Candle(_) => return None,
        }
        Some(())
    }

    /// `out[i][r] = sum_j x[i][j] * w[r][j]` for the `m` rows of `x` (`m` x `cols`), into
    /// `out` (`m` x `rows`). `scratch` is reused between calls.
    pub fn matmul(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), candle_core::Error> {
        matmuls(x, m, &mut [(self, out)], scratch)
    }
}

/// Several products of the same activations (`m` rows of `x`), each `(weights, out)` as in
/// [`Weights::matmul`]: the activations are quantised once for all of them (q, k and v
/// share their input, and so do the feed-forward gate and up projections).
pub fn matmuls(
    x: &[f32],
    m: usize,
    products: &mut [(&Weights, &mut [f32])],
    scratch: &mut Scratch,
) -> Result<(), candle_core::Error> {
    let Some(k) = products.first().map(|(w, _)| w.cols) else {
        return Ok(());
    };
    assert_eq!(x.len(), m * k, "activation shape");
    let quantised = |w: &Weights| matches!(w.data, Data::Q4_1 { .. } | Data::Q8_0(_));
    let nb = k / QK;
    let wide = scratch.isa == Isa::Avx512;
    if products.iter().any(|(w, _)| quantised(w)) {
        let s = &mut *scratch;
        if wide {
            quantize_pairs(x, nb, &mut s.pairs, &mut s.pair_scales, &mut s.sums);
        } else {
            quantize_rows(x, &mut s.q8, &mut s.sums);
        }
    }
    let (q8, sums) = (&scratch.q8, &scratch.sums);
    let (pairs, pair_scales, np) = (&scratch.pairs, &scratch.pair_scales, nb.div_ceil(2));
    for (w, out) in products.iter_mut() {
        let n = w.rows;
        assert_eq!(w.cols, k, "weights share the input width");
        assert_eq!(out.len(), m * n, "output shape");
        match &w.data {
            Data::Q4_1 { blocks, mins } if wide => tiled((m, k, n), out, |wr, ai, res| {
                let (a, d) = (pick(pairs, ai, np), pick(pair_scales, ai, np));
                let s = pick(sums, ai, nb);
                let w = wr.start * nb..wr.end * nb;
                let (w, mins) = (&blocks[w.clone()], &mins[w]);
                let n = ai.len();
                wide::dot_q4_1(w, mins, nb, &a[..n], &d[..n], &s[..n], res);
            }),
            Data::Q8_0(blocks) if wide => tiled((m, k, n), out, |wr, ai, res| {
                let (a, d) = (pick(pairs, ai, np), pick(pair_scales, ai, np));
                let w = &blocks[wr.start * nb..wr.end * nb];
                wide::dot_q8_0(w, nb, &a[..ai.len()], &d[..ai.len()], res);
            }),
            Data::Q4_1 { blocks, mins } => tiled((m, k, n), out, |wr, ai, res| {
                let (a, s) = (pick(q8, ai, nb), pick(sums, ai, nb));
                let w = wr.start * nb..wr.end * nb;
                let (w, mins) = (&blocks[w.clone()], &mins[w]);
                dot_q4_1(w, mins, &a[..ai.len()], &s[..ai.len()], res);
            }),
            Data::Q8_0(blocks) => tiled((m, k, n), out, |wr, ai, res| {
                let a = pick(q8, ai, nb);
                dot_q8_0(&blocks[wr.start * nb..wr.end * nb], &a[..ai.len()], res);
            }),
            Data::F32(wd) => tiled((m, k, n), out, |wr, ai, res| {
                for (r, res) in wr.zip(res.iter_mut()) {
                    for (&i, res) in ai.iter().zip(res.iter_mut()) {
                        *res = dot_f32_1(&wd[r * k..][..k], &x[i * k..][..k]);
                    }
                }
            }),
            Data::Candle(q) => {
                use candle_core::Module;
                let t = candle_core::Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?;
                let y = q.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
    }
    Ok(())
}

/// Which kernels run the quantised products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The build's own: AVX2 + FMA in the default x86-64-v3 build, plain Rust elsewhere.
    Baseline,
    /// AVX-512 (F, BW, DQ) with VNNI: two blocks per instruction and one `vpdpbusd` for
    /// the integer dot products. Chosen at run time when the CPU has it.
    Avx512,
}

impl Isa {
    /// The best this CPU runs (`ENRICHER_KERNELS=auto`, the default), unless
    /// `ENRICHER_KERNELS=baseline` (or `avx2`) asks for the build's own kernels (to compare
    /// them). Decided once per process, so every product in it is computed the same way.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let wanted = std::env::var("ENRICHER_KERNELS").unwrap_or_default();
            let isa = match wanted.as_str() {
                "baseline" | "avx2" => Isa::Baseline,
                "" | "auto" => Isa::best(),
                other => {
                    tracing::warn!(
                        value = other,
                        "ENRICHER_KERNELS: expected `auto` or `baseline`; using auto"
                    );
                    Isa::best()
                }
            };
            tracing::info!(?isa, "local model kernels");
            isa
        })
    }

    /// The best kernels this CPU can run.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        Isa::Baseline
    }
}

/// Two consecutive activation blocks' quants (the second zero past a row's end), the
/// layout the AVX-512 kernels load in one instruction.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct PairQ8([i8; 2 * QK]);

/// The two blocks' scales of a [`PairQ8`], each repeated over the eight lanes its block's
/// integer sums land in.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct PairScales([f32; 16]);

/// Buffers a matmul reuses, and the kernels it runs.
pub struct Scratch {
    isa: Isa,
    /// The activations' blocks ([`Isa::Baseline`]).
    q8: Vec<BlockQ8>,
    /// `d * sum(q)` of each block.
    sums: Vec<f32>,
    /// The activations' blocks in pairs ([`Isa::Avx512`]).
    pairs: Vec<PairQ8>,
    pair_scales: Vec<PairScales>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::with_isa(Isa::detect())
    }
}

impl Scratch {
    /// Buffers for products computed by `isa`'s kernels (which the CPU must run:
    /// [`Isa::best`] says which it does).
    pub fn with_isa(isa: Isa) -> Self {
        let isa = if isa == Isa::Avx512 && Isa::best() != Isa::Avx512 {
            Isa::Baseline
        } else {
            isa
        };
        Self {
            isa,
            q8: Vec::new(),
            sums: Vec::new(),
            pairs: Vec::new(),
            pair_scales: Vec::new(),
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

/// Quantises one block of [`QK`] values into `qs`; returns its scale `d` and `d * sum(q)`.
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, f32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        let r = (v * id).round() as i32;
        *q = r.clamp(-127, 127) as i8;
        sum += i32::from(*q);
    }
    (d, d * sum as f32)
}

/// Quantises `x` (rows whose length is a multiple of [`QK`]) to [`BlockQ8`] blocks and
/// their sums, in parallel for large inputs (a block depends on its own 32 values only).
fn quantize_rows(x: &[f32], out: &mut Vec<BlockQ8>, sums: &mut Vec<f32>) {
    out.clear();
    out.resize(x.len() / QK, BlockQ8::ZERO);
    sums.clear();
    sums.resize(x.len() / QK, 0.0);
    let one = |((xs, b), s): ((&[f32], &mut BlockQ8), &mut f32)| {
        (b.d, *s) = quantize_block(xs, &mut b.qs);
    };
    if x.len() >= PARALLEL_WORK {
        x.par_chunks_exact(QK)
            .zip(out.par_iter_mut())
            .zip(sums.par_iter_mut())
            .with_min_len(256)
            .for_each(one);
    } else {
        x.chunks_exact(QK)
            .zip(out.iter_mut())
            .zip(sums.iter_mut())
            .for_each(one);
    }
}

/// As [`quantize_rows`], but into the layout of the AVX-512 kernels: each row of `nb`
/// blocks as `nb.div_ceil(2)` pairs (the last one half zeros when `nb` is odd), with their
/// scales spread over the lanes; parallel over rows for large inputs.
fn quantize_pairs(
    x: &[f32],
    nb: usize,
    pairs: &mut Vec<PairQ8>,
    scales: &mut Vec<PairScales>,
    sums: &mut Vec<f32>,
) {
    let np = nb.div_ceil(2);
    let rows = x.len() / (nb * QK);
    pairs.clear();
    pairs.resize(rows * np, PairQ8([0; 2 * QK]));
    scales.clear();
    scales.resize(rows * np, PairScales([0.0; 16]));
    sums.clear();
    sums.resize(rows * nb, 0.0);
    /// One row: its blocks, pairs, pair scales and sums.
    fn row(x: &[f32], pairs: &mut [PairQ8], scales: &mut [PairScales], sums: &mut [f32]) {
        for (b, (xs, s)) in x.chunks_exact(QK).zip(sums).enumerate() {
            let (pair, half) = (b / 2, b % 2);
            let d;
            (d, *s) = quantize_block(xs, &mut pairs[pair].0[half * QK..(half + 1) * QK]);
            scales[pair].0[half * 8..(half + 1) * 8].fill(d);
        }
    }
    if x.len() >= PARALLEL_WORK {
        x.par_chunks_exact(nb * QK)
            .zip(pairs.par_chunks_exact_mut(np))
            .zip(scales.par_chunks_exact_mut(np))
            .zip(sums.par_chunks_exact_mut(nb))
            .with_min_len(8)
            .for_each(|(((x, p), sc), s)| row(x, p, sc, s));
    } else {
        x.chunks_exact(nb * QK)
            .zip(pairs.chunks_exact_mut(np))
            .zip(scales.chunks_exact_mut(np))
            .zip(sums.chunks_exact_mut(nb))
            .for_each(|(((x, p), sc), s)| row(x, p, sc, s));
    }
}

/// Work (multiply-adds, or values) below which a loop stays on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Activation rows one kernel call takes.
const ACT_ROWS: usize = 4;

/// A pointer to `out` that tasks writing disjoint elements share.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tiled's tasks write disjoint elements (their own columns) and nothing reads them
// until every task is done.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Activation rows `idx` (each `len` units long) of `v`, the last one repeated to fill
/// [`ACT_ROWS`].
fn pick<'a, T>(v: &'a [T], idx: &[usize], len: usize) -> [&'a [T]; ACT_ROWS] {
    std::array::from_fn(|o| &v[idx[o.min(idx.len() - 1)] * len..][..len])
}

/// One task's results: `res[w][a]` for its weight rows and the current activation rows.
type TaskResults = [[f32; ACT_ROWS]; ROWS_PER_TASK];

/// The shared loop: parallel over blocks of [`ROWS_PER_TASK`] weight rows (output
/// columns); a task walks the activation rows four at a time and dots each group with all
/// of its weight rows, so its weights stay in L1 and each activation group is read once
/// per task. `dot(weight rows, activation rows, res)` writes `res[w - first][a]` for each
/// weight row `w` of the range and each (one to four) activation row index `a`. Results go
/// straight to `out` (`m` x `n`).
fn tiled(
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    dot: impl Fn(std::ops::Range<usize>, &[usize], &mut TaskResults) + Sync,
) {
    assert_eq!(out.len(), m * n, "output shape");
    let dst = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n));
        let mut res = [[0f32; ACT_ROWS]; ROWS_PER_TASK];
        for i in (0..m).step_by(ACT_ROWS) {
            let ai: [usize; ACT_ROWS] = std::array::from_fn(|o| i + o);
            let ai = &ai[..(m - i).min(ACT_ROWS)];
            dot(r0..r1, ai, &mut res);
            for (r, res) in (r0..r1).zip(&res) {
                for (&i, &v) in ai.iter().zip(res) {
                    // SAFETY: i < m and r < r1 <= n, so the index is inside `out` (of
                    // m * n elements, asserted above); column r belongs to this task alone.
                    unsafe { *dst.get().add(i * n + r) = v };
                }
            }
        }
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    if n * m * k >= PARALLEL_WORK {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// f32 dot product in eight lanes (vectorises; the summation order is fixed).
pub fn dot_f32_1(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Checks a kernel call's shape: whole weight rows (at most [`ROWS_PER_TASK`]) of the
/// activation rows' length, one to four activation rows of the same length (what makes
/// the unchecked loads in the AVX2 kernels sound). Returns the row length in blocks.
fn check_shape<W, A>(w: &[W], a: &[&[A]]) -> usize {
    let nb = a.first().map_or(0, |r| r.len());
    assert!(
        nb > 0
            && w.len().is_multiple_of(nb)
            && w.len() / nb <= ROWS_PER_TASK
            && a.len() <= ACT_ROWS
            && a.iter().all(|r| r.len() == nb),
        "kernel shape"
    );
    nb
}

/// Q4_1 dot products of consecutive weight rows `w` (with their blocks' offsets `mins`)
/// with activation rows `a` (with their blocks' sums `sums`).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_q4_1(
    w: &[BlockQ4_1],
    mins: &[f32],
    a: &[&[BlockQ8]],
    sums: &[&[f32]],
    res: &mut TaskResults,
) {
    let nb = check_shape(w, a);
    assert!(mins.len() == w.len() && sums.len() == a.len() && sums.iter().all(|s| s.len() == nb));
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); check_shape and the
    // assertion bound the row counts and the rows' lengths.
    unsafe {
        match a.len() {
            1 => avx2::dot_q4_1::<1>(w, mins, nb, a, sums, res),
            2 => avx2::dot_q4_1::<2>(w, mins, nb, a, sums, res),
            3 => avx2::dot_q4_1::<3>(w, mins, nb, a, sums, res),
            _ => avx2::dot_q4_1::<4>(w, mins, nb, a, sums, res),
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dot_q4_1(
    w: &[BlockQ4_1],
    mins: &[f32],
    a: &[&[BlockQ8]],
    sums: &[&[f32]],
    res: &mut TaskResults,
) {
    let nb = check_shape(w, a);
    for ((w, mins), res) in w
        .chunks_exact(nb)
        .zip(mins.chunks_exact(nb))
        .zip(res.iter_mut())
    {
        for ((a, sums), r) in a.iter().zip(sums).zip(res.iter_mut()) {
            let mut sum = 0f32;
            for (x, y) in w.iter().zip(a.iter()) {
                let mut s = 0i32;
                for j in 0..QK / 2 {
                    s += i32::from(x.qs[j] & 0x0F) * i32::from(y.qs[j])
                        + i32::from(x.qs[j] >> 4) * i32::from(y.qs[j + QK / 2]);
                }
                sum += s as f32 * (x.d * y.d);
            }
            *r = sum + dot_f32_1(mins, sums);
        }
    }
}

/// Q8_0 dot products of consecutive weight rows `w` with activation rows `a`.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_q8_0(w: &[BlockQ8_0], a: &[&[BlockQ8]], res: &mut TaskResults) {
    let nb = check_shape(w, a);
    // SAFETY: as for dot_q4_1.
    unsafe {
        match a.len() {
            1 => avx2::dot_q8_0::<1>(w, nb, a, res),
            2 => avx2::dot_q8_0::<2>(w, nb, a, res),
            3 => avx2::dot_q8_0::<3>(w, nb, a, res),
            _ => avx2::dot_q8_0::<4>(w, nb, a, res),
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dot_q8_0(w: &[BlockQ8_0], a: &[&[BlockQ8]], res: &mut TaskResults) {
    let nb = check_shape(w, a);
    for (w, res) in w.chunks_exact(nb).zip(res.iter_mut()) {
        for (a, r) in a.iter().zip(res.iter_mut()) {
            let mut sum = 0f32;
            for (x, y) in w.iter().zip(a.iter()) {
                let s: i32 =
                    x.qs.iter()
                        .zip(&y.qs)
                        .map(|(&p, &q)| i32::from(p) * i32::from(q))
                        .sum();
                sum += s as f32 * (x.d * y.d);
            }
            *r = sum;
        }
    }
}

/// The AVX2 kernels: each weight row of the task against `N` activation rows (1 to 4),
/// one accumulator per pair; a weight block is unpacked once for the `N` rows. Every
/// (weight row, activation row) pair is summed by the same instructions in the same order
/// whatever else is in the call, so results do not depend on batching. (Two weight rows at
/// a time were tried: no faster for prompts, and slower for decoding, which streams the
/// weights from memory.)
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{BlockQ4_1, BlockQ8, BlockQ8_0, TaskResults};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// u8 x i8 products of 32 pairs, summed to eight i32 lanes, as f32.
    #[inline(always)]
    unsafe fn mul_sum_us8(x: __m256i, y: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(x, y);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    /// Safety: `w` and `mins` hold whole rows of `nb` blocks, at most `TaskResults`'
    /// count; `a` and `sums` have `N` rows of `nb` blocks.
    ///
    /// The offset term, `m * d_y * sum(q_y)` per block, joins the accumulators' lanes
    /// eight blocks at a time.
    pub unsafe fn dot_q4_1<const N: usize>(
        w: &[BlockQ4_1],
        mins: &[f32],
        nb: usize,
        a: &[&[BlockQ8]],
        sums: &[&[f32]],
        res: &mut TaskResults,
    ) {
        let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
        let sums: [*const f32; N] = std::array::from_fn(|r| sums.get_unchecked(r).as_ptr());
        let mask = _mm_set1_epi8(0x0F);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (j, res) in res.iter_mut().take(w.len() / nb).enumerate() {
            let (w, mins) = (w.as_ptr().add(j * nb), mins.as_ptr().add(j * nb));
            let mut acc = [_mm256_setzero_ps(); N];
            for b0 in (0..nb).step_by(8) {
                let len = (nb - b0).min(8);
                // Lanes 0..len (masked loads read nothing past them).
                let take = _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lane);
                let mv = _mm256_maskload_ps(mins.add(b0), take);
                for r in 0..N {
                    let sv = _mm256_maskload_ps(sums[r].add(b0), take);
                    acc[r] = _mm256_fmadd_ps(mv, sv, acc[r]);
                }
                for b in b0..b0 + len {
                    let x = &*w.add(b);
                    let dx = _mm256_broadcast_ss(&x.d);
                    let qs = _mm_loadu_si128(x.qs.as_ptr().cast());
                    let lo = _mm_and_si128(qs, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                    let bx = _mm256_set_m128i(hi, lo);
                    for r in 0..N {
                        let y = &*a[r].add(b);
                        let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                        let prod = mul_sum_us8(bx, by);
                        let scale = _mm256_mul_ps(dx, _mm256_broadcast_ss(&y.d));
                        acc[r] = _mm256_fmadd_ps(scale, prod, acc[r]);
                    }
                }
            }
            for r in 0..N {
                res[r] = hsum(acc[r]);
            }
        }
    }

    /// Safety: `w` holds whole rows of `nb` blocks, at most `TaskResults`' count; `a` has
    /// `N` rows of `nb` blocks.
    pub unsafe fn dot_q8_0<const N: usize>(
        w: &[BlockQ8_0],
        nb: usize,
        a: &[&[BlockQ8]],
        res: &mut TaskResults,
    ) {
        let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
        for (j, res) in res.iter_mut().take(w.len() / nb).enumerate() {
            let w = w.as_ptr().add(j * nb);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let x = &*w.add(b);
                let dx = _mm256_broadcast_ss(&x.d);
                let bx = _mm256_loadu_si256(x.qs.as_ptr().cast());
                let ax = _mm256_sign_epi8(bx, bx);
                for r in 0..N {
                    let y = &*a[r].add(b);
                    let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                    let sy = _mm256_sign_epi8(by, bx);
                    let prod = mul_sum_us8(ax, sy);
                    let scale = _mm256_mul_ps(dx, _mm256_broadcast_ss(&y.d));
                    acc[r] = _mm256_fmadd_ps(scale, prod, acc[r]);
                }
            }
            for r in 0..N {
                res[r] = hsum(acc[r]);
            }
        }
    }
}

/// The AVX-512 kernels ([`Isa::Avx512`]), for the CPUs that have it, chosen at run time:
/// the loop of [`avx2`], but each step takes two blocks (64 quants) per register, and one
/// `vpdpbusd` replaces `vpmaddubsw` + `vpmaddwd`. Activations come in pairs of blocks
/// ([`PairQ8`]) with their scales spread over the lanes ([`PairScales`]). Each (weight row,
/// activation row) pair is again summed by the same instructions in the same order
/// whatever else is in the call. The integer sums are those of the AVX2 kernels; the float
/// sums are grouped differently, so results differ from [`Isa::Baseline`]'s in the last
/// bits (a process uses one kind throughout: [`Isa::detect`]).
mod wide {
    use super::{BlockQ4_1, BlockQ8_0, Isa, PairQ8, PairScales, TaskResults};
    use super::{ACT_ROWS, ROWS_PER_TASK};

    /// Checks a call: whole weight rows of `nb` blocks (at most [`ROWS_PER_TASK`]), one to
    /// [`ACT_ROWS`] activation rows of `nb.div_ceil(2)` pairs, and a CPU with AVX-512
    /// (what makes the unchecked loads and the instructions sound).
    fn check(w_len: usize, nb: usize, a: &[&[PairQ8]], d: &[&[PairScales]]) {
        let np = nb.div_ceil(2);
        assert!(
            nb > 0
                && w_len.is_multiple_of(nb)
                && w_len / nb <= ROWS_PER_TASK
                && !a.is_empty()
                && a.len() <= ACT_ROWS
                && a.len() == d.len()
                && a.iter().zip(d).all(|(a, d)| a.len() == np && d.len() == np),
            "kernel shape"
        );
        assert_eq!(
            Isa::best(),
            Isa::Avx512,
            "AVX-512 kernels on a CPU without AVX-512"
        );
    }

    /// Q4_1 as [`super::dot_q4_1`], activations in pairs.
    pub fn dot_q4_1(
        w: &[BlockQ4_1],
        mins: &[f32],
        nb: usize,
        a: &[&[PairQ8]],
        d: &[&[PairScales]],
        sums: &[&[f32]],
        res: &mut TaskResults,
    ) {
        check(w.len(), nb, a, d);
        assert!(
            mins.len() == w.len() && sums.len() == a.len() && sums.iter().all(|s| s.len() == nb)
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/DQ/VNNI, AVX2 and FMA, and the shapes are
        // checked (above).
        unsafe {
            match a.len() {
                1 => imp::dot_q4_1::<1>(w, mins, nb, a, d, sums, res),
                2 => imp::dot_q4_1::<2>(w, mins, nb, a, d, sums, res),
                3 => imp::dot_q4_1::<3>(w, mins, nb, a, d, sums, res),
                _ => imp::dot_q4_1::<4>(w, mins, nb, a, d, sums, res),
            }
        }
    }

    /// Q8_0 as [`super::dot_q8_0`], activations in pairs.
    pub fn dot_q8_0(
        w: &[BlockQ8_0],
        nb: usize,
        a: &[&[PairQ8]],
        d: &[&[PairScales]],
        res: &mut TaskResults,
    ) {
        check(w.len(), nb, a, d);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for dot_q4_1.
        unsafe {
            match a.len() {
                1 => imp::dot_q8_0::<1>(w, nb, a, d, res),
                2 => imp::dot_q8_0::<2>(w, nb, a, d, res),
                3 => imp::dot_q8_0::<3>(w, nb, a, d, res),
                _ => imp::dot_q8_0::<4>(w, nb, a, d, res),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use super::super::{BlockQ4_1, BlockQ8_0, PairQ8, PairScales, TaskResults};
        use std::arch::x86_64::*;

        /// The sum of the sixteen lanes, in a fixed order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
        unsafe fn hsum(v: __m512) -> f32 {
            let h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// `[d0; 8] ++ [d1; 8]`: two weight blocks' scales over their lanes.
        #[inline]
        #[target_feature(enable = "avx512f,avx512dq,avx2")]
        unsafe fn scales(d0: f32, d1: f32) -> __m512 {
            _mm512_insertf32x8(
                _mm512_castps256_ps512(_mm256_set1_ps(d0)),
                _mm256_set1_ps(d1),
                1,
            )
        }

        /// Mask of the first `n` (at most 16) lanes.
        #[inline]
        fn first(n: usize) -> __mmask16 {
            if n >= 16 {
                0xFFFF
            } else {
                (1u16 << n) - 1
            }
        }

        /// Safety: AVX-512 F/BW/DQ/VNNI; `w` and `mins` hold whole rows of `nb` blocks, at
        /// most `TaskResults`' count; `a` and `d` have `N` rows of `nb.div_ceil(2)` pairs,
        /// `sums` `N` rows of `nb` values.
        ///
        /// The offset term, `m * d_y * sum(q_y)` per block, joins the accumulators' lanes
        /// sixteen blocks at a time.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
        pub unsafe fn dot_q4_1<const N: usize>(
            w: &[BlockQ4_1],
            mins: &[f32],
            nb: usize,
            a: &[&[PairQ8]],
            d: &[&[PairScales]],
            sums: &[&[f32]],
            res: &mut TaskResults,
        ) {
            let a: [*const PairQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let d: [*const PairScales; N] = std::array::from_fn(|r| d.get_unchecked(r).as_ptr());
            let sums: [*const f32; N] = std::array::from_fn(|r| sums.get_unchecked(r).as_ptr());
            let mask = _mm256_set1_epi8(0x0F);
            let np = nb.div_ceil(2);
            for (j, res) in res.iter_mut().take(w.len() / nb).enumerate() {
                let (w, mins) = (w.as_ptr().add(j * nb), mins.as_ptr().add(j * nb));
                let mut acc = [_mm512_setzero_ps(); N];
                for b0 in (0..nb).step_by(16) {
                    let take = first(nb - b0);
                    let mv = _mm512_maskz_loadu_ps(take, mins.add(b0));
                    for r in 0..N {
                        let sv = _mm512_maskz_loadu_ps(take, sums[r].add(b0));
                        acc[r] = _mm512_fmadd_ps(mv, sv, acc[r]);
                    }
                }
                for p in 0..np {
                    let x0 = &*w.add(2 * p);
                    let q0 = _mm_loadu_si128(x0.qs.as_ptr().cast());
                    let (q1, d1) = if 2 * p + 1 < nb {
                        let x1 = &*w.add(2 * p + 1);
                        (_mm_loadu_si128(x1.qs.as_ptr().cast()), x1.d)
                    } else {
                        (_mm_setzero_si128(), 0.0)
                    };
                    // [q0, q1] -> nibbles [lo0, lo1] and [hi0, hi1] -> [lo0, hi0, lo1, hi1]:
                    // block 0's 32 quants in the low half, block 1's in the high half.
                    let v = _mm256_set_m128i(q1, q0);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    let bx = _mm512_shuffle_i64x2(z, z, 0b11_01_10_00);
                    let dx = scales(x0.d, d1);
                    for r in 0..N {
                        let by = _mm512_load_si512(a[r].add(p).cast());
                        let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bx, by);
                        let scale = _mm512_mul_ps(dx, _mm512_load_ps(d[r].add(p).cast()));
                        acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[r]);
                    }
                }
                for r in 0..N {
                    res[r] = hsum(acc[r]);
                }
            }
        }

        /// Safety: AVX-512 F/BW/DQ/VNNI; `w` holds whole rows of `nb` blocks, at most
        /// `TaskResults`' count; `a` and `d` have `N` rows of `nb.div_ceil(2)` pairs.
        ///
        /// `vpdpbusd` multiplies unsigned by signed bytes: the weights go in as their
        /// magnitudes and their signs move to the activations (as `vpsignb` does in AVX2).
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
        pub unsafe fn dot_q8_0<const N: usize>(
            w: &[BlockQ8_0],
            nb: usize,
            a: &[&[PairQ8]],
            d: &[&[PairScales]],
            res: &mut TaskResults,
        ) {
            let a: [*const PairQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let d: [*const PairScales; N] = std::array::from_fn(|r| d.get_unchecked(r).as_ptr());
            let np = nb.div_ceil(2);
            let zero = _mm512_setzero_si512();
            for (j, res) in res.iter_mut().take(w.len() / nb).enumerate() {
                let w = w.as_ptr().add(j * nb);
                let mut acc = [_mm512_setzero_ps(); N];
                for p in 0..np {
                    let x0 = &*w.add(2 * p);
                    let q0 = _mm256_loadu_si256(x0.qs.as_ptr().cast());
                    let (q1, d1) = if 2 * p + 1 < nb {
                        let x1 = &*w.add(2 * p + 1);
                        (_mm256_loadu_si256(x1.qs.as_ptr().cast()), x1.d)
                    } else {
                        (_mm256_setzero_si256(), 0.0)
                    };
                    let bx = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
                    let ax = _mm512_abs_epi8(bx);
                    let negative = _mm512_movepi8_mask(bx);
                    let dx = scales(x0.d, d1);
                    for r in 0..N {
                        let by = _mm512_load_si512(a[r].add(p).cast());
                        let sy = _mm512_mask_sub_epi8(by, negative, zero, by);
                        let sum = _mm512_dpbusd_epi32(zero, ax, sy);
                        let scale = _mm512_mul_ps(dx, _mm512_load_ps(d[r].add(p).cast()));
                        acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[r]);
                    }
                }
                for r in 0..N {
                    res[r] = hsum(acc[r]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn reference(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for r in 0..n {
                out[i * n + r] = (0..k).map(|j| x[i * k + j] * w[r * k + j]).sum();
            }
        }
        out
    }

    pub(in crate::llm::local) fn data(len: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values in -1..1 with some larger ones.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let v = (s % 20_001) as f32 / 10_000.0 - 1.0;
                if i % 37 == 0 {
                    v * 4.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Every kernel kind this CPU runs ([`Isa::Baseline`] always).
    pub(in crate::llm::local) fn kinds() -> Vec<Isa> {
        let mut v = vec![Isa::Baseline];
        if Isa::best() != Isa::Baseline {
            v.push(Isa::best());
        }
        v
    }

    fn check(dtype: GgmlDType) {
        for isa in kinds() {
            check_with(dtype, isa, 128);
            // 3 blocks a row: the wide kernels' last pair is half. (Our kernels only:
            // candle's Q5_0 product wants an even count.)
            if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
                check_with(dtype, isa, 96);
            }
        }
    }

    fn check_with(dtype: GgmlDType, isa: Isa, k: usize) {
        let n = 40;
        let w = data(n * k, 7);
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        // The weights as quantised (what the kernels should multiply by).
        let wq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let weights = Weights::from_qtensor("w", q).unwrap();
        let mut scratch = Scratch::with_isa(isa);
        assert_eq!(scratch.isa(), isa);
        let mut single = Vec::new();
        for m in [1usize, 3, 4, 7, 9] {
            let x = data(m * k, 11);
            let want = reference(&wq, &x, m, k, n);
            let mut got = vec![0f32; m * n];
            weights.matmul(&x, m, &mut got, &mut scratch).unwrap();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 0.02 * scale,
                    "{dtype:?} {isa:?} k={k} m={m}: {g} vs {w}"
                );
            }
            // Row 0 is the same whatever rides along with it.
            if m == 1 {
                single = got[..n].to_vec();
            } else {
                assert_eq!(
                    &got[..n],
                    &single[..],
                    "{dtype:?} {isa:?} m={m}: row 0 changed"
                );
            }
        }
        // Row lookup gives the dequantised weights (types only candle reads have none).
        let mut row = vec![0f32; k];
        if weights.row(3, &mut row).is_none() {
            assert!(matches!(weights.data, Data::Candle(_)));
            return;
        }
        for (a, b) in row.iter().zip(&wq[3 * k..4 * k]) {
            assert!((a - b).abs() < 1e-5, "{dtype:?} row: {a} vs {b}");
        }
    }

    #[test]
    fn q4_1_matmul_matches_the_dequantised_product_and_rows_are_independent() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matmul_matches_the_dequantised_product_and_rows_are_independent() {
        check(GgmlDType::Q8_0);
    }

    #[test]
    fn f32_and_other_types_match_too() {
        check(GgmlDType::F32);
        check(GgmlDType::Q5_0);
    }
}
