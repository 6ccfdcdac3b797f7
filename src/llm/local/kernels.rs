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
//! Q4_1 and Q8_0 (the default model's types) have kernels for the file's row layout
//! ([`Isa::Baseline`]), and kernels that take the weights repacked at load time in groups of
//! rows, same size as the file's blocks: eight rows for AVX2 ([`GroupQ4_1x8`],
//! [`GroupQ8_0x8`]), sixteen for AVX-512 VNNI ([`GroupQ4_1`], [`GroupQ8_0`]); F32/F16
//! weights are kept as f32; any other GGML type goes through candle's `QMatMul` (correct,
//! slower).

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
    /// Q4_1 in groups of sixteen rows ([`Isa::Avx512`]).
    Q4_1x16(Vec<GroupQ4_1>),
    /// Q8_0 in groups of sixteen rows ([`Isa::Avx512`]).
    Q8_0x16(Vec<GroupQ8_0>),
    /// Q4_1 in groups of eight rows ([`Isa::Avx2`]).
    Q4_1x8(Vec<GroupQ4_1x8>),
    /// Q8_0 in groups of eight rows ([`Isa::Avx2`]).
    Q8_0x8(Vec<GroupQ8_0x8>),
    F32(Vec<f32>),
    Candle(QMatMul),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.data {
            Data::Q4_1 { .. } => "q4_1",
            Data::Q8_0(_) => "q8_0",
            Data::Q4_1x16(_) => "q4_1 x16",
            Data::Q8_0x16(_) => "q8_0 x16",
            Data::Q4_1x8(_) => "q4_1 x8",
            Data::Q8_0x8(_) => "q8_0 x8",
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
    /// Takes a 2-D tensor of the GGUF file (`rows` x `cols`, row-major), laid out for the
    /// process's kernels ([`Isa::detect`]).
    pub fn from_qtensor(name: &str, t: QTensor) -> Result<Self, KernelError> {
        Self::from_qtensor_for(name, t, Isa::detect())
    }

    /// As [`Weights::from_qtensor`], laid out for `isa`'s kernels (which the CPU must run:
    /// [`Isa::best`] says which it does; a kind it cannot run gives [`Isa::Baseline`]'s).
    pub fn from_qtensor_for(name: &str, t: QTensor, isa: Isa) -> Result<Self, KernelError> {
        let err = |msg: String| KernelError::Tensor {
            name: name.to_string(),
            msg,
        };
        let (rows, cols) = t
            .shape()
            .dims2()
            .map_err(|e| err(format!("not a matrix: {e}")))?;
        // Rows in groups of this many for `isa`'s kernels (None: the file's row layout).
        let group = isa
            .group()
            .filter(|&g| isa.runs() && rows.is_multiple_of(g));
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
                    let nb = cols / QK;
                    if group == Some(GROUP) {
                        Data::Q4_1x16(groups::<GroupQ4_1>(&v, rows, nb))
                    } else if group == Some(GROUP8) {
                        Data::Q4_1x8(groups::<GroupQ4_1x8>(&v, rows, nb))
                    } else {
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
                    }
                } else {
                    let v = blocks_from_bytes(&bytes, FileQ8_0 { d: 0, qs: [0; QK] });
                    if v.len() != blocks {
                        return Err(err(format!("{} blocks, expected {blocks}", v.len())));
                    }
                    let nb = cols / QK;
                    if group == Some(GROUP) {
                        Data::Q8_0x16(groups::<GroupQ8_0>(&v, rows, nb))
                    } else if group == Some(GROUP8) {
                        Data::Q8_0x8(groups::<GroupQ8_0x8>(&v, rows, nb))
                    } else {
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
            Data::Q4_1x16(v) => std::mem::size_of_val(v.as_slice()),
            Data::Q8_0x16(v) => std::mem::size_of_val(v.as_slice()),
            Data::Q4_1x8(v) => std::mem::size_of_val(v.as_slice()),
            Data::Q8_0x8(v) => std::mem::size_of_val(v.as_slice()),
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
            Data::Q4_1x16(v) => grouped_row(v, r, out),
            Data::Q8_0x16(v) => grouped_row(v, r, out),
            Data::Q4_1x8(v) => grouped_row(v, r, out),
            Data::Q8_0x8(v) => grouped_row(v, r, out),
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
    let quantised = |w: &Weights| {
        matches!(
            w.data,
            Data::Q4_1 { .. }
                | Data::Q8_0(_)
                | Data::Q4_1x16(_)
                | Data::Q8_0x16(_)
                | Data::Q4_1x8(_)
                | Data::Q8_0x8(_)
        )
    };
    let nb = k / QK;
    if products.iter().any(|(w, _)| quantised(w)) {
        let s = &mut *scratch;
        quantize_rows(x, &mut s.q8, &mut s.sums, &mut s.isums);
    }
    let (q8, sums, isums) = (&scratch.q8, &scratch.sums, &scratch.isums);
    for (w, out) in products.iter_mut() {
        let n = w.rows;
        assert_eq!(w.cols, k, "weights share the input width");
        assert_eq!(out.len(), m * n, "output shape");
        match &w.data {
            // A task's rows are one group (ROWS_PER_TASK == GROUP, and n is a multiple).
            Data::Q4_1x16(groups) => tiled((m, k, n), out, |wr, ai, res| {
                let (a, s) = (pick(q8, ai, nb), pick(sums, ai, nb));
                let g = wr.start / GROUP;
                x16::dot_q4_1(
                    &groups[g * nb..(g + 1) * nb],
                    &a[..ai.len()],
                    &s[..ai.len()],
                    res,
                );
            }),
            Data::Q8_0x16(groups) => tiled((m, k, n), out, |wr, ai, res| {
                let (a, s) = (pick(q8, ai, nb), pick(isums, ai, nb));
                let g = wr.start / GROUP;
                x16::dot_q8_0(
                    &groups[g * nb..(g + 1) * nb],
                    &a[..ai.len()],
                    &s[..ai.len()],
                    res,
                );
            }),
            // A task's rows are one or two groups (n is a multiple of GROUP8).
            Data::Q4_1x8(groups) => tiled((m, k, n), out, |wr, ai, res| {
                let (a, s) = (pick(q8, ai, nb), pick(sums, ai, nb));
                for (i, g) in (wr.start / GROUP8..wr.end / GROUP8).enumerate() {
                    x8::dot_q4_1(
                        &groups[g * nb..(g + 1) * nb],
                        &a[..ai.len()],
                        &s[..ai.len()],
                        res,
                        i * GROUP8,
                    );
                }
            }),
            Data::Q8_0x8(groups) => tiled((m, k, n), out, |wr, ai, res| {
                let a = pick(q8, ai, nb);
                for (i, g) in (wr.start / GROUP8..wr.end / GROUP8).enumerate() {
                    x8::dot_q8_0(
                        &groups[g * nb..(g + 1) * nb],
                        &a[..ai.len()],
                        res,
                        i * GROUP8,
                    );
                }
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
                for (&i, res) in ai.iter().zip(res.iter_mut()) {
                    for (r, res) in wr.clone().zip(res.iter_mut()) {
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
    /// The build's own, on the file's row layout: AVX2 + FMA in the default x86-64-v3
    /// build, plain Rust elsewhere.
    Baseline,
    /// AVX2 + FMA with the weights repacked in groups of eight rows: one register holds
    /// four quants of each of them, so a block's products for eight output columns are
    /// summed in the lanes of one register (no sums across lanes). Chosen at load time when
    /// the CPU has AVX2 and FMA but not AVX-512.
    Avx2,
    /// AVX-512 (F, BW) with VNNI: weights repacked in groups of sixteen rows, one
    /// `vpdpbusd` multiplying four quants of each of them. Chosen at load time when the CPU
    /// has it.
    Avx512,
}

impl Isa {
    /// The best this CPU runs (`ENRICHER_KERNELS=auto`, the default), unless
    /// `ENRICHER_KERNELS` asks for `baseline` (the build's own kernels on the row layout) or
    /// `avx2` (the eight-row groups, also on an AVX-512 CPU), to compare them; a kind the
    /// CPU cannot run gives the best it can. Decided once per process, so every product in
    /// it is computed the same way.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let wanted = std::env::var("ENRICHER_KERNELS").unwrap_or_default();
            let isa = match wanted.as_str() {
                "baseline" => Isa::Baseline,
                "avx2" if Isa::Avx2.runs() => Isa::Avx2,
                "" | "auto" | "avx2" => Isa::best(),
                other => {
                    tracing::warn!(
                        value = other,
                        "ENRICHER_KERNELS: expected `auto`, `avx2` or `baseline`; using auto"
                    );
                    Isa::best()
                }
            };
            tracing::info!(?isa, "local model kernels");
            isa
        })
    }

    /// The best kernels this CPU can run (found once; the kernels check it on every call).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
            Isa::Baseline
        })
    }

    /// Whether this CPU runs these kernels.
    pub fn runs(self) -> bool {
        match self {
            Isa::Baseline => true,
            Isa::Avx2 => Isa::best() != Isa::Baseline,
            Isa::Avx512 => Isa::best() == Isa::Avx512,
        }
    }

    /// Rows per group of this kind's weight layout (`None`: the file's row layout).
    fn group(self) -> Option<usize> {
        match self {
            Isa::Baseline => None,
            Isa::Avx2 => Some(GROUP8),
            Isa::Avx512 => Some(GROUP),
        }
    }
}

/// Weight rows per group of the AVX-512 layout (one output column per lane).
const GROUP: usize = 16;

/// One block of sixteen Q4_1 weight rows, interleaved for [`Isa::Avx512`]: bytes
/// `64 i + 4 w + t` (`i` < 4, `t` < 4) hold row `w`'s quants `4 i + t` (low nibble) and
/// `16 + 4 i + t` (high nibble), so that each 64-byte load gives four quants of every row
/// in the lane of its row; then the sixteen scales and offsets, lane by lane.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct GroupQ4_1 {
    qs: [u8; 4 * 64],
    d: [f32; GROUP],
    m: [f32; GROUP],
}

/// One block of sixteen Q8_0 weight rows for [`Isa::Avx512`]: bytes `64 j + 4 w + t` hold
/// row `w`'s quant `4 j + t` plus 128 (an unsigned byte, what `vpdpbusd` multiplies); then
/// the sixteen scales.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct GroupQ8_0 {
    qs: [u8; 8 * 64],
    d: [f32; GROUP],
}

impl Grouped for GroupQ4_1 {
    type File = FileQ4_1;
    const ROWS: usize = GROUP;

    fn pack(rows: &[FileQ4_1], nb: usize, b: usize) -> Self {
        let mut g = Self {
            qs: [0; 4 * 64],
            d: [0.0; GROUP],
            m: [0.0; GROUP],
        };
        for w in 0..GROUP {
            let x = &rows[w * nb + b];
            g.d[w] = f16::from_bits(x.d).to_f32();
            g.m[w] = f16::from_bits(x.m).to_f32();
            for i in 0..4 {
                g.qs[64 * i + 4 * w..][..4].copy_from_slice(&x.qs[4 * i..4 * i + 4]);
            }
        }
        g
    }

    fn weight(&self, w: usize, k: usize) -> f32 {
        let (i, t, high) = ((k % 16) / 4, k % 4, k >= 16);
        let byte = self.qs[64 * i + 4 * w + t];
        let q = if high { byte >> 4 } else { byte & 0x0F };
        f32::from(q) * self.d[w] + self.m[w]
    }
}

impl Grouped for GroupQ8_0 {
    type File = FileQ8_0;
    const ROWS: usize = GROUP;

    fn pack(rows: &[FileQ8_0], nb: usize, b: usize) -> Self {
        let mut g = Self {
            qs: [0; 8 * 64],
            d: [0.0; GROUP],
        };
        for w in 0..GROUP {
            let x = &rows[w * nb + b];
            g.d[w] = f16::from_bits(x.d).to_f32();
            for (k, &q) in x.qs.iter().enumerate() {
                g.qs[64 * (k / 4) + 4 * w + k % 4] = (q as u8) ^ 0x80;
            }
        }
        g
    }

    fn weight(&self, w: usize, k: usize) -> f32 {
        let q = (self.qs[64 * (k / 4) + 4 * w + k % 4] ^ 0x80) as i8;
        f32::from(q) * self.d[w]
    }
}

/// Weight rows per group of the AVX2 layout (one output column per lane).
const GROUP8: usize = 8;

/// One block of eight Q4_1 weight rows, interleaved for [`Isa::Avx2`]: bytes `32 i + 4 w +
/// t` (`i` < 4, `t` < 4) hold row `w`'s quants `4 i + t` (low nibble) and `16 + 4 i + t`
/// (high nibble), so that each 32-byte load gives four quants of every row in the lane of
/// its row; then the eight scales and offsets, lane by lane.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct GroupQ4_1x8 {
    qs: [u8; 4 * 32],
    d: [f32; GROUP8],
    m: [f32; GROUP8],
}

/// One block of eight Q8_0 weight rows for [`Isa::Avx2`]: bytes `32 j + 4 w + t` hold row
/// `w`'s quant `4 j + t`; then the eight scales.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct GroupQ8_0x8 {
    qs: [i8; 8 * 32],
    d: [f32; GROUP8],
}

impl Grouped for GroupQ4_1x8 {
    type File = FileQ4_1;
    const ROWS: usize = GROUP8;

    fn pack(rows: &[FileQ4_1], nb: usize, b: usize) -> Self {
        let mut g = Self {
            qs: [0; 4 * 32],
            d: [0.0; GROUP8],
            m: [0.0; GROUP8],
        };
        for w in 0..GROUP8 {
            let x = &rows[w * nb + b];
            g.d[w] = f16::from_bits(x.d).to_f32();
            g.m[w] = f16::from_bits(x.m).to_f32();
            for i in 0..4 {
                g.qs[32 * i + 4 * w..][..4].copy_from_slice(&x.qs[4 * i..4 * i + 4]);
            }
        }
        g
    }

    fn weight(&self, w: usize, k: usize) -> f32 {
        let (i, t, high) = ((k % 16) / 4, k % 4, k >= 16);
        let byte = self.qs[32 * i + 4 * w + t];
        let q = if high { byte >> 4 } else { byte & 0x0F };
        f32::from(q) * self.d[w] + self.m[w]
    }
}

impl Grouped for GroupQ8_0x8 {
    type File = FileQ8_0;
    const ROWS: usize = GROUP8;

    fn pack(rows: &[FileQ8_0], nb: usize, b: usize) -> Self {
        let mut g = Self {
            qs: [0; 8 * 32],
            d: [0.0; GROUP8],
        };
        for w in 0..GROUP8 {
            let x = &rows[w * nb + b];
            g.d[w] = f16::from_bits(x.d).to_f32();
            for (k, &q) in x.qs.iter().enumerate() {
                g.qs[32 * (k / 4) + 4 * w + k % 4] = q;
            }
        }
        g
    }

    fn weight(&self, w: usize, k: usize) -> f32 {
        f32::from(self.qs[32 * (k / 4) + 4 * w + k % 4]) * self.d[w]
    }
}

/// What the grouped layouts share: rows per group, packing from the file's blocks, and
/// reading one weight back (embedding lookups).
trait Grouped: Sized {
    /// The file's block type.
    type File;
    /// Weight rows per group.
    const ROWS: usize;
    /// Block `b` of one group's rows (`ROWS` rows of `nb` file blocks each).
    fn pack(rows: &[Self::File], nb: usize, b: usize) -> Self;
    /// Row `w`'s weight `k`, dequantised.
    fn weight(&self, w: usize, k: usize) -> f32;
}

/// Repacks a matrix of `rows` x `nb` file blocks into groups of `G::ROWS` rows (`rows` a
/// multiple of it): group `g`'s block `b` is at `g * nb + b`.
fn groups<G: Grouped>(v: &[G::File], rows: usize, nb: usize) -> Vec<G> {
    // Sized up front: the largest matrices are tens of MB, and a growing vector would hold
    // twice that at its peak.
    let mut out = Vec::with_capacity(rows / G::ROWS * nb);
    for rows in v.chunks_exact(G::ROWS * nb).take(rows / G::ROWS) {
        out.extend((0..nb).map(|b| G::pack(rows, nb, b)));
    }
    out
}

/// Row `r` of grouped weights `v`, dequantised into `out` (one row's length).
fn grouped_row<G: Grouped>(v: &[G], r: usize, out: &mut [f32]) {
    let nb = out.len() / QK;
    let (g, w) = (r / G::ROWS, r % G::ROWS);
    for (b, o) in v[g * nb..(g + 1) * nb].iter().zip(out.chunks_exact_mut(QK)) {
        for (k, o) in o.iter_mut().enumerate() {
            *o = b.weight(w, k);
        }
    }
}

/// Buffers a matmul reuses.
#[derive(Default)]
pub struct Scratch {
    /// The activations' blocks.
    q8: Vec<BlockQ8>,
    /// `d * sum(q)` of each block.
    sums: Vec<f32>,
    /// `sum(q)` of each block.
    isums: Vec<i32>,
}

/// Quantises one block of [`QK`] values into `qs`; returns its scale `d`, `d * sum(q)` and
/// `sum(q)`. Quants are `x / d` rounded to nearest (ties to even), in -127..=127.
fn quantize_block(xs: &[f32; QK], qs: &mut [i8; QK]) -> (f32, f32, i32) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    // SAFETY: AVX2 is enabled at compile time (cfg); the arrays are QK = 32 long.
    unsafe {
        quantize_block_avx2(xs, qs)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += i32::from(*q);
        }
        (d, d * sum as f32, sum)
    }
}

/// [`quantize_block`] eight lanes at a time (the same values).
/// Safety: AVX2.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
unsafe fn quantize_block_avx2(xs: &[f32; QK], qs: &mut [i8; QK]) -> (f32, f32, i32) {
    use std::arch::x86_64::*;
    let p = xs.as_ptr();
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
    let abs = _mm256_set1_ps(-0.0);
    let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
        _mm256_max_ps(m, _mm256_andnot_ps(abs, x))
    });
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        let r = _mm256_round_ps(
            _mm256_mul_ps(v[i], id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi)
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
    // Packing works within 128-bit halves: the bytes come out as 4-value runs of
    // q0 q1 q2 q3 (low halves), then of their high halves; one permute restores the order.
    let b = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr().cast(), b);
    (d, d * sum as f32, sum)
}

/// Quantises `x` (rows whose length is a multiple of [`QK`]) to [`BlockQ8`] blocks and
/// their sums, in parallel for large inputs (a block depends on its own 32 values only).
fn quantize_rows(x: &[f32], out: &mut Vec<BlockQ8>, sums: &mut Vec<f32>, isums: &mut Vec<i32>) {
    let n = x.len() / QK;
    out.clear();
    out.resize(n, BlockQ8::ZERO);
    sums.clear();
    sums.resize(n, 0.0);
    isums.clear();
    isums.resize(n, 0);
    let one = |(((xs, b), s), i): (((&[f32], &mut BlockQ8), &mut f32), &mut i32)| {
        let xs: &[f32; QK] = xs.try_into().expect("chunks of QK");
        (b.d, *s, *i) = quantize_block(xs, &mut b.qs);
    };
    if x.len() >= PARALLEL_WORK {
        x.par_chunks_exact(QK)
            .zip(out.par_iter_mut())
            .zip(sums.par_iter_mut())
            .zip(isums.par_iter_mut())
            .with_min_len(256)
            .for_each(one);
    } else {
        x.chunks_exact(QK)
            .zip(out.iter_mut())
            .zip(sums.iter_mut())
            .zip(isums.iter_mut())
            .for_each(one);
    }
}

/// Work (multiply-adds, or values) below which a loop stays on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Activation rows one kernel call takes.
const ACT_ROWS: usize = 4;

// A task of the AVX-512 kernels is one group of rows, of the AVX2 ones two.
const _: () = assert!(ROWS_PER_TASK == GROUP && ROWS_PER_TASK == 2 * GROUP8);

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

/// One task's results: `res[a][w]` for the current activation rows and its weight rows
/// (activation-major, so each activation row's results go to `out` in one piece).
type TaskResults = [[f32; ROWS_PER_TASK]; ACT_ROWS];

/// The shared loop: parallel over blocks of [`ROWS_PER_TASK`] weight rows (output
/// columns); a task walks the activation rows four at a time and dots each group with all
/// of its weight rows, so its weights stay in L1 and each activation group is read once
/// per task. `dot(weight rows, activation rows, res)` writes `res[a][w - first]` for each
/// (one to four) activation row index `a` and each weight row `w` of the range. Results go
/// straight to `out` (`m` x `n`), a contiguous run of columns per activation row.
fn tiled(
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    dot: impl Fn(std::ops::Range<usize>, &[usize], &mut TaskResults) + Sync,
) {
    assert_eq!(out.len(), m * n, "output shape");
    let dst = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n));
        let mut res = [[0f32; ROWS_PER_TASK]; ACT_ROWS];
        for i in (0..m).step_by(ACT_ROWS) {
            let ai: [usize; ACT_ROWS] = std::array::from_fn(|o| i + o);
            let ai = &ai[..(m - i).min(ACT_ROWS)];
            dot(r0..r1, ai, &mut res);
            for (&i, res) in ai.iter().zip(&res) {
                // SAFETY: i < m and r0 < r1 <= n, so the r1 - r0 elements from i * n + r0
                // are inside `out` (of m * n elements, asserted above); columns r0..r1
                // belong to this task alone, and `res` is a separate buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(res.as_ptr(), dst.get().add(i * n + r0), r1 - r0)
                };
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
    for (j, (w, mins)) in w.chunks_exact(nb).zip(mins.chunks_exact(nb)).enumerate() {
        for ((a, sums), res) in a.iter().zip(sums).zip(res.iter_mut()) {
            let r = &mut res[j];
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
    for (j, w) in w.chunks_exact(nb).enumerate() {
        for (a, res) in a.iter().zip(res.iter_mut()) {
            let r = &mut res[j];
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

/// The AVX2 kernels of the row layout ([`Isa::Baseline`]): each weight row of the task against `N` activation rows (1 to 4),
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
        for j in 0..w.len() / nb {
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
            for (res, acc) in res.iter_mut().zip(&acc) {
                res[j] = hsum(*acc);
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
        for j in 0..w.len() / nb {
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
            for (res, acc) in res.iter_mut().zip(&acc) {
                res[j] = hsum(*acc);
            }
        }
    }
}

/// The AVX-512 kernels ([`Isa::Avx512`]), for the CPUs that have it, chosen at load time:
/// the weights are repacked in groups of sixteen rows ([`GroupQ4_1`], [`GroupQ8_0`]) so that
/// one register holds four quants of each of the sixteen rows, and one `vpdpbusd` against
/// four activation quants broadcast to every lane does 64 multiply-adds for sixteen output
/// columns at once. A block then costs eight `vpdpbusd` and one scale step per activation
/// row for all sixteen rows, where the row-at-a-time kernels spend a conversion, a multiply
/// and an add per row and block; nothing is summed across lanes (lane `w` is output column
/// `w`). Each (weight row, activation row) pair is summed by the same instructions in the
/// same order whatever else is in the call. The integer sums are exact; each output's float
/// sum runs block by block in one lane (the block's scaled integer sum, then Q4_1's offset
/// term), so results differ from [`Isa::Baseline`]'s in the last bits (a process uses one
/// kind throughout: [`Isa::detect`]).
mod x16 {
    use super::{BlockQ8, GroupQ4_1, GroupQ8_0, Isa, TaskResults, ACT_ROWS};

    /// Checks a call: `nb` groups (one group of rows), one to [`ACT_ROWS`] activation rows
    /// of `nb` blocks with `nb` sums each, and a CPU with AVX-512 (what makes the unchecked
    /// loads and the instructions sound).
    fn check<S>(nb: usize, a: &[&[BlockQ8]], sums: &[&[S]]) {
        assert!(
            nb > 0
                && !a.is_empty()
                && a.len() <= ACT_ROWS
                && a.len() == sums.len()
                && a.iter()
                    .zip(sums)
                    .all(|(a, s)| a.len() == nb && s.len() == nb),
            "kernel shape"
        );
        assert_eq!(
            Isa::best(),
            Isa::Avx512,
            "AVX-512 kernels on a CPU without AVX-512"
        );
    }

    /// Q4_1: the [`super::GROUP`] rows of `w` (one group per block) against activation rows `a`
    /// with their blocks' `d * sum(q)` in `sums`.
    pub fn dot_q4_1(w: &[GroupQ4_1], a: &[&[BlockQ8]], sums: &[&[f32]], res: &mut TaskResults) {
        let nb = w.len();
        check(nb, a, sums);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VNNI and the shapes are checked (above).
        unsafe {
            match a.len() {
                1 => imp::dot_q4_1::<1>(w, nb, a, sums, res),
                2 => imp::dot_q4_1::<2>(w, nb, a, sums, res),
                3 => imp::dot_q4_1::<3>(w, nb, a, sums, res),
                _ => imp::dot_q4_1::<4>(w, nb, a, sums, res),
            }
        }
    }

    /// Q8_0: as [`dot_q4_1`], with each activation block's integer sum `sum(q)` in `isums`.
    pub fn dot_q8_0(w: &[GroupQ8_0], a: &[&[BlockQ8]], isums: &[&[i32]], res: &mut TaskResults) {
        let nb = w.len();
        check(nb, a, isums);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for dot_q4_1.
        unsafe {
            match a.len() {
                1 => imp::dot_q8_0::<1>(w, nb, a, isums, res),
                2 => imp::dot_q8_0::<2>(w, nb, a, isums, res),
                3 => imp::dot_q8_0::<3>(w, nb, a, isums, res),
                _ => imp::dot_q8_0::<4>(w, nb, a, isums, res),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use super::super::{BlockQ8, GroupQ4_1, GroupQ8_0, TaskResults, GROUP};
        use std::arch::x86_64::*;

        /// Each activation row's accumulator into `res`: lane `w` is output column `w`.
        #[inline(always)]
        unsafe fn store<const N: usize>(acc: &[__m512; N], res: &mut TaskResults) {
            const { assert!(GROUP == super::super::ROWS_PER_TASK) };
            for r in 0..N {
                _mm512_storeu_ps(res[r].as_mut_ptr(), acc[r]);
            }
        }

        /// Four activation quants (`a.qs[4 i..4 i + 4]`) in every lane.
        #[inline(always)]
        unsafe fn quad(a: *const BlockQ8, i: usize) -> __m512i {
            let p = (*a).qs.as_ptr().add(4 * i).cast::<i32>();
            _mm512_set1_epi32(p.read_unaligned())
        }

        /// Safety: AVX-512 F/BW/VNNI; `w` has `nb` groups; `a` and `sums` have `N` rows
        /// of `nb` blocks and values.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
        pub unsafe fn dot_q4_1<const N: usize>(
            w: &[GroupQ4_1],
            nb: usize,
            a: &[&[BlockQ8]],
            sums: &[&[f32]],
            res: &mut TaskResults,
        ) {
            let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let sums: [*const f32; N] = std::array::from_fn(|r| sums.get_unchecked(r).as_ptr());
            let mask = _mm512_set1_epi8(0x0F);
            let mut acc = [_mm512_setzero_ps(); N];
            for b in 0..nb {
                let g = w.get_unchecked(b);
                let q = g.qs.as_ptr().cast::<__m512i>();
                // Load i holds quants 4i..4i+4 (low nibbles) and 16+4i.. (high) of each row.
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for i in 0..4 {
                    let v = _mm512_load_si512(q.add(i));
                    lo[i] = _mm512_and_si512(v, mask);
                    hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                }
                let dv = _mm512_load_ps(g.d.as_ptr());
                let mv = _mm512_load_ps(g.m.as_ptr());
                for r in 0..N {
                    let y = a[r].add(b);
                    let mut s = _mm512_setzero_si512();
                    for i in 0..4 {
                        s = _mm512_dpbusd_epi32(s, lo[i], quad(y, i));
                        s = _mm512_dpbusd_epi32(s, hi[i], quad(y, 4 + i));
                    }
                    let scale = _mm512_mul_ps(dv, _mm512_set1_ps((*y).d));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
                    acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*sums[r].add(b)), acc[r]);
                }
            }
            store(&acc, res);
        }

        /// Safety: as for `dot_q4_1`, with `isums` for `sums`.
        ///
        /// `vpdpbusd` multiplies unsigned by signed bytes: the weights are stored as
        /// `q + 128` (unsigned), and each block's sum starts at `-128 * sum(q_x)`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
        pub unsafe fn dot_q8_0<const N: usize>(
            w: &[GroupQ8_0],
            nb: usize,
            a: &[&[BlockQ8]],
            isums: &[&[i32]],
            res: &mut TaskResults,
        ) {
            let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let isums: [*const i32; N] = std::array::from_fn(|r| isums.get_unchecked(r).as_ptr());
            let mut acc = [_mm512_setzero_ps(); N];
            for b in 0..nb {
                let g = w.get_unchecked(b);
                let q = g.qs.as_ptr().cast::<__m512i>();
                let wv: [__m512i; 8] = std::array::from_fn(|j| _mm512_load_si512(q.add(j)));
                let dv = _mm512_load_ps(g.d.as_ptr());
                for r in 0..N {
                    let y = a[r].add(b);
                    let mut s = _mm512_set1_epi32(-128 * *isums[r].add(b));
                    for (j, &wj) in wv.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, wj, quad(y, j));
                    }
                    let scale = _mm512_mul_ps(dv, _mm512_set1_ps((*y).d));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
                }
            }
            store(&acc, res);
        }
    }
}

/// The AVX2 kernels of [`Isa::Avx2`]: the weights repacked at load time in groups of eight
/// rows ([`GroupQ4_1x8`], [`GroupQ8_0x8`]: same size as the row layout's blocks) so that one
/// register holds four quants of each of the eight rows, against four activation quants
/// broadcast to every lane. `vpmaddubsw` then multiplies 32 pairs for eight output columns
/// at once, and a block's products stay in the lanes of their column: one widening, one
/// conversion and one scale step per block and activation row serve all eight rows, where
/// the row-at-a-time kernels spend them per row, and nothing is summed across lanes. The
/// integer sums are exact (Q4_1: eight products of a 4-bit and a 7-bit value fit an i16);
/// each output's float sum runs block by block in one lane, the same instructions whatever
/// else is in the call, so results do not depend on batching (they differ from
/// [`Isa::Baseline`]'s in the last bits; a process uses one kind throughout).
mod x8 {
    use super::{BlockQ8, GroupQ4_1x8, GroupQ8_0x8, Isa, TaskResults, ACT_ROWS, GROUP8};

    /// Checks a call: `nb` blocks of one group of rows, whose [`GROUP8`] results go to
    /// columns `col..col + GROUP8` of the task's results, one to [`ACT_ROWS`] activation
    /// rows of `nb` blocks, and a CPU with AVX2 and FMA (what makes the unchecked loads,
    /// stores and instructions sound).
    fn check(nb: usize, a: &[&[BlockQ8]], res: &TaskResults, col: usize) {
        assert!(
            nb > 0
                && !a.is_empty()
                && a.len() <= ACT_ROWS
                && a.iter().all(|a| a.len() == nb)
                && col + GROUP8 <= res[0].len(),
            "kernel shape"
        );
        assert!(
            Isa::Avx2.runs(),
            "AVX2 kernels on a CPU without AVX2 and FMA"
        );
    }

    /// Q4_1: the [`GROUP8`] rows of `w` (one group per block) against activation rows `a`
    /// with their blocks' `d * sum(q)` in `sums`, into `res[a][col..col + GROUP8]`.
    pub fn dot_q4_1(
        w: &[GroupQ4_1x8],
        a: &[&[BlockQ8]],
        sums: &[&[f32]],
        res: &mut TaskResults,
        col: usize,
    ) {
        let nb = w.len();
        check(nb, a, res, col);
        assert!(
            sums.len() == a.len() && sums.iter().all(|s| s.len() == nb),
            "kernel shape"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA and the shapes are checked (above).
        unsafe {
            match a.len() {
                1 => imp::dot_q4_1::<1>(w, nb, a, sums, res, col),
                2 => imp::dot_q4_1::<2>(w, nb, a, sums, res, col),
                3 => imp::dot_q4_1::<3>(w, nb, a, sums, res, col),
                _ => imp::dot_q4_1::<4>(w, nb, a, sums, res, col),
            }
        }
    }

    /// Q8_0: as [`dot_q4_1`] (Q8_0 has no offset term).
    pub fn dot_q8_0(w: &[GroupQ8_0x8], a: &[&[BlockQ8]], res: &mut TaskResults, col: usize) {
        let nb = w.len();
        check(nb, a, res, col);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for dot_q4_1.
        unsafe {
            match a.len() {
                1 => imp::dot_q8_0::<1>(w, nb, a, res, col),
                2 => imp::dot_q8_0::<2>(w, nb, a, res, col),
                3 => imp::dot_q8_0::<3>(w, nb, a, res, col),
                _ => imp::dot_q8_0::<4>(w, nb, a, res, col),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use super::super::{BlockQ8, GroupQ4_1x8, GroupQ8_0x8, TaskResults};
        use std::arch::x86_64::*;

        /// Each activation row's accumulator into `res[r][col..col + 8]`: lane `w` is the
        /// group's output column `w`.
        #[inline(always)]
        unsafe fn store<const N: usize>(acc: &[__m256; N], res: &mut TaskResults, col: usize) {
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(res.get_unchecked_mut(r).as_mut_ptr().add(col), *acc);
            }
        }

        /// Four activation quants (`a.qs[4 i..4 i + 4]`) in every lane.
        #[inline(always)]
        unsafe fn quad(a: *const BlockQ8, i: usize) -> __m256i {
            let p = (*a).qs.as_ptr().add(4 * i).cast::<i32>();
            _mm256_set1_epi32(p.read_unaligned())
        }

        /// Safety: AVX2 and FMA; `w` has `nb` groups; `a` and `sums` have `N` rows of `nb`
        /// blocks and values; `col + 8` is at most `res`' row length.
        ///
        /// Each lane's i16 pairs add up eight `vpmaddubsw` results (quants 0..16 times
        /// -127..=127, two per pair: at most 8 * 2 * 15 * 127 = 30,480 < 2^15), then one
        /// `vpmaddwd` widens them.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_q4_1<const N: usize>(
            w: &[GroupQ4_1x8],
            nb: usize,
            a: &[&[BlockQ8]],
            sums: &[&[f32]],
            res: &mut TaskResults,
            col: usize,
        ) {
            let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let sums: [*const f32; N] = std::array::from_fn(|r| sums.get_unchecked(r).as_ptr());
            let mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let g = w.get_unchecked(b);
                let q = g.qs.as_ptr().cast::<__m256i>();
                let mut s16 = [_mm256_setzero_si256(); N];
                // Load i holds quants 4i..4i+4 (low nibbles) and 16+4i.. (high) of each row.
                for i in 0..4 {
                    let v = _mm256_load_si256(q.add(i));
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for r in 0..N {
                        let y = a[r].add(b);
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, quad(y, i)),
                            _mm256_maddubs_epi16(hi, quad(y, 4 + i)),
                        );
                        s16[r] = _mm256_add_epi16(s16[r], p);
                    }
                }
                let dv = _mm256_load_ps(g.d.as_ptr());
                let mv = _mm256_load_ps(g.m.as_ptr());
                for r in 0..N {
                    let y = a[r].add(b);
                    let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r], ones));
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps((*y).d));
                    acc[r] = _mm256_fmadd_ps(s, scale, acc[r]);
                    acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*sums[r].add(b)), acc[r]);
                }
            }
            store(&acc, res, col);
        }

        /// Safety: as for `dot_q4_1`, without `sums`.
        ///
        /// `vpmaddubsw` multiplies unsigned by signed bytes: each weight's magnitude goes
        /// with the activation quant carrying the weight's sign (`vpsignb`). Two such
        /// products can reach 2 * 128 * 127, so each `vpmaddubsw` is widened on its own.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_q8_0<const N: usize>(
            w: &[GroupQ8_0x8],
            nb: usize,
            a: &[&[BlockQ8]],
            res: &mut TaskResults,
            col: usize,
        ) {
            let a: [*const BlockQ8; N] = std::array::from_fn(|r| a.get_unchecked(r).as_ptr());
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let g = w.get_unchecked(b);
                let q = g.qs.as_ptr().cast::<__m256i>();
                let mut s = [_mm256_setzero_si256(); N];
                for j in 0..8 {
                    let wj = _mm256_load_si256(q.add(j));
                    let mag = _mm256_sign_epi8(wj, wj);
                    for r in 0..N {
                        let y = _mm256_sign_epi8(quad(a[r].add(b), j), wj);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, y), ones);
                        s[r] = _mm256_add_epi32(s[r], p);
                    }
                }
                let dv = _mm256_load_ps(g.d.as_ptr());
                for r in 0..N {
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps((*a[r].add(b)).d));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), scale, acc[r]);
                }
            }
            store(&acc, res, col);
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
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|k| k.runs())
            .collect()
    }

    fn check(dtype: GgmlDType) {
        for isa in kinds() {
            // 48 rows: three groups of the AVX-512 layout, six of the AVX2 one; 40: five
            // AVX2 groups (the last task has one), rows the AVX-512 layout cannot group;
            // 44: rows neither can.
            for n in [48, 40, 44] {
                check_with(dtype, isa, n, 128);
                // 3 blocks a row: an odd count. (Our kernels only: candle's Q5_0 product
                // wants an even count.)
                if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
                    check_with(dtype, isa, n, 96);
                }
            }
        }
    }

    fn check_with(dtype: GgmlDType, isa: Isa, n: usize, k: usize) {
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
        let weights = Weights::from_qtensor_for("w", q, isa).unwrap();
        let group = match weights.data {
            Data::Q4_1x16(_) | Data::Q8_0x16(_) => Some(GROUP),
            Data::Q4_1x8(_) | Data::Q8_0x8(_) => Some(GROUP8),
            _ => None,
        };
        let ours = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0);
        let want = isa.group().filter(|&g| ours && n.is_multiple_of(g));
        assert_eq!(group, want, "{dtype:?} {isa:?} n={n}");
        let mut scratch = Scratch::default();
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
                    "{dtype:?} {isa:?} n={n} k={k} m={m}: {g} vs {w}"
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
        for r in [3, 37] {
            if weights.row(r, &mut row).is_none() {
                assert!(matches!(weights.data, Data::Candle(_)));
                return;
            }
            for (a, b) in row.iter().zip(&wq[r * k..(r + 1) * k]) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{dtype:?} {isa:?} row {r}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn activation_blocks_round_to_nearest_even_within_127() {
        // amax 127 makes d = 1, so the quants are the values rounded: ties go to even.
        let mut x = [0f32; QK];
        x[0] = 127.0;
        x[1..9].copy_from_slice(&[2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 2.4999, 126.6]);
        let mut q = [0i8; QK];
        let (d, dsum, sum) = quantize_block(&x, &mut q);
        assert_eq!(d, 1.0);
        assert_eq!(q[..9], [127, 2, 4, -2, -4, 0, 0, 2, 127]);
        assert_eq!(sum, q.iter().map(|&v| i32::from(v)).sum::<i32>());
        assert_eq!(dsum, sum as f32);
        // Any block: the same as the plain formula, element by element.
        for seed in 0..50 {
            let x: [f32; QK] = std::array::from_fn(|i| data(QK, seed)[i] * (seed as f32 + 0.1));
            let (d, _, sum) = quantize_block(&x, &mut q);
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(d, amax / 127.0);
            for (i, (&v, &qi)) in x.iter().zip(&q).enumerate() {
                let want = (v * (1.0 / d)).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(qi, want, "seed {seed} at {i}: {v}");
            }
            assert_eq!(sum, q.iter().map(|&v| i32::from(v)).sum::<i32>());
        }
        // All zero: d 0, quants 0.
        let (d, _, sum) = quantize_block(&[0.0; QK], &mut q);
        assert!(d == 0.0 && sum == 0 && q == [0; QK]);
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
