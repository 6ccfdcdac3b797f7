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

/// Q4_1 repacked at load time with f32 scales (the same values: f16 widens exactly), so
/// the kernels broadcast them straight from memory instead of converting each one.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    d: f32,
    m: f32,
    qs: [u8; QK / 2],
}

/// Q8_0 repacked with an f32 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    d: f32,
    qs: [i8; QK],
}

/// An activation block: `value = d * q`; `s = d * sum(q)` (for Q4_1's offset term).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

impl BlockQ8 {
    const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
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
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    F32(Vec<f32>),
    Candle(QMatMul),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.data {
            Data::Q4_1(_) => "q4_1",
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
                    Data::Q4_1(
                        v.iter()
                            .map(|b| BlockQ4_1 {
                                d: f16(b.d),
                                m: f16(b.m),
                                qs: b.qs,
                            })
                            .collect(),
                    )
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
            Data::Q4_1(v) => std::mem::size_of_val(v.as_slice()),
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
            Data::Q4_1(v) => {
                for (b, o) in v[r * c / QK..(r + 1) * c / QK]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let (d, m) = (b.d, b.m);
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
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "activation shape");
        assert_eq!(out.len(), m * n, "output shape");
        match &self.data {
            Data::Q4_1(w) => {
                quantize_rows(x, k, &mut scratch.q8);
                tiled(w, &scratch.q8, m, k, n, out, &mut scratch.t, dot_q4_1);
            }
            Data::Q8_0(w) => {
                quantize_rows(x, k, &mut scratch.q8);
                tiled(w, &scratch.q8, m, k, n, out, &mut scratch.t, dot_q8_0);
            }
            Data::F32(w) => {
                tiled(w, x, m, k, n, out, &mut scratch.t, dot_f32);
            }
            Data::Candle(q) => {
                use candle_core::Module;
                let t = candle_core::Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?;
                let y = q.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        Ok(())
    }
}

/// Buffers a matmul reuses.
#[derive(Default)]
pub struct Scratch {
    q8: Vec<BlockQ8>,
    t: Vec<f32>,
}

/// Quantises each row of `x` (rows of `k` values) to [`BlockQ8`].
fn quantize_rows(x: &[f32], k: usize, out: &mut Vec<BlockQ8>) {
    out.clear();
    out.resize(x.len() / QK, BlockQ8::ZERO);
    debug_assert_eq!(k % QK, 0);
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += i32::from(*q);
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// The shared loop: parallel over blocks of weight rows; each weight row is dotted with
/// every activation row (`dot` takes one weight row and up to four activation rows).
#[allow(clippy::too_many_arguments)]
fn tiled<W: Sync, A: Sync>(
    w: &[W],
    a: &[A],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    t: &mut Vec<f32>,
    dot: fn(&[W], &[&[A]], &mut [f32]),
) {
    let wr = w.len() / n; // units of W per weight row
    let ar = a.len() / m; // units of A per activation row
    debug_assert_eq!(wr * n, w.len());
    // Results land transposed (n x m: each task writes whole rows of `t`), then are copied.
    t.clear();
    t.resize(n * m, 0.0);
    let body = |(ci, chunk): (usize, &mut [f32])| {
        for (j, dst) in chunk.chunks_exact_mut(m).enumerate() {
            let r = ci * ROWS_PER_TASK + j;
            let wrow = &w[r * wr..(r + 1) * wr];
            debug_assert!(k > 0);
            let mut i = 0;
            while i < m {
                let take = (m - i).min(4);
                let rows: [&[A]; 4] =
                    std::array::from_fn(|o| &a[(i + o.min(take - 1)) * ar..][..ar]);
                dot(wrow, &rows[..take], &mut dst[i..i + take]);
                i += take;
            }
        }
    };
    if n * m * k >= 1 << 16 {
        t.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(body);
    } else {
        t.chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(body);
    }
    for (r, col) in t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + r] = v;
        }
    }
}

fn dot_f32(w: &[f32], a: &[&[f32]], res: &mut [f32]) {
    for (r, a) in res.iter_mut().zip(a) {
        *r = dot_f32_1(w, a);
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

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_q4_1(w: &[BlockQ4_1], a: &[&[BlockQ8]], res: &mut [f32]) {
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every activation row
    // has as many blocks as the weight row (checked); loads are unaligned loads inside them.
    assert!(a.iter().all(|r| r.len() == w.len()) && res.len() == a.len());
    unsafe {
        match a.len() {
            1 => avx2::dot_q4_1::<1>(w, a, res),
            2 => avx2::dot_q4_1::<2>(w, a, res),
            3 => avx2::dot_q4_1::<3>(w, a, res),
            _ => avx2::dot_q4_1::<4>(w, a, res),
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dot_q4_1(w: &[BlockQ4_1], a: &[&[BlockQ8]], res: &mut [f32]) {
    for (r, a) in res.iter_mut().zip(a) {
        let mut sum = 0f32;
        for (x, y) in w.iter().zip(a) {
            let mut s = 0i32;
            for j in 0..QK / 2 {
                s += i32::from(x.qs[j] & 0x0F) * i32::from(y.qs[j])
                    + i32::from(x.qs[j] >> 4) * i32::from(y.qs[j + QK / 2]);
            }
            sum += s as f32 * (x.d * y.d) + x.m * y.s;
        }
        *r = sum;
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_q8_0(w: &[BlockQ8_0], a: &[&[BlockQ8]], res: &mut [f32]) {
    // SAFETY: as for dot_q4_1.
    assert!(a.iter().all(|r| r.len() == w.len()) && res.len() == a.len());
    unsafe {
        match a.len() {
            1 => avx2::dot_q8_0::<1>(w, a, res),
            2 => avx2::dot_q8_0::<2>(w, a, res),
            3 => avx2::dot_q8_0::<3>(w, a, res),
            _ => avx2::dot_q8_0::<4>(w, a, res),
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dot_q8_0(w: &[BlockQ8_0], a: &[&[BlockQ8]], res: &mut [f32]) {
    for (r, a) in res.iter_mut().zip(a) {
        let mut sum = 0f32;
        for (x, y) in w.iter().zip(a) {
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

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{BlockQ4_1, BlockQ8, BlockQ8_0};
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

    pub unsafe fn dot_q4_1<const N: usize>(w: &[BlockQ4_1], a: &[&[BlockQ8]], res: &mut [f32]) {
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut summs = [0f32; N];
        for (b, x) in w.iter().enumerate() {
            let dx = _mm256_broadcast_ss(&x.d);
            let mx = x.m;
            let qs = _mm_loadu_si128(x.qs.as_ptr().cast());
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let bx = _mm256_set_m128i(hi, lo);
            for r in 0..N {
                let y = a[r].get_unchecked(b);
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let p = mul_sum_us8(bx, by);
                let scale = _mm256_mul_ps(dx, _mm256_broadcast_ss(&y.d));
                acc[r] = _mm256_fmadd_ps(scale, p, acc[r]);
                summs[r] += mx * y.s;
            }
        }
        for r in 0..N {
            res[r] = hsum(acc[r]) + summs[r];
        }
    }

    pub unsafe fn dot_q8_0<const N: usize>(w: &[BlockQ8_0], a: &[&[BlockQ8]], res: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, x) in w.iter().enumerate() {
            let dx = _mm256_broadcast_ss(&x.d);
            let bx = _mm256_loadu_si256(x.qs.as_ptr().cast());
            let ax = _mm256_sign_epi8(bx, bx);
            for r in 0..N {
                let y = a[r].get_unchecked(b);
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let sy = _mm256_sign_epi8(by, bx);
                let p = mul_sum_us8(ax, sy);
                let scale = _mm256_mul_ps(dx, _mm256_broadcast_ss(&y.d));
                acc[r] = _mm256_fmadd_ps(scale, p, acc[r]);
            }
        }
        for r in 0..N {
            res[r] = hsum(acc[r]);
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

    fn check(dtype: GgmlDType) {
        let (k, n) = (128, 40);
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
        let mut scratch = Scratch::default();
        let mut single = Vec::new();
        for m in [1usize, 3, 4, 7, 9] {
            let x = data(m * k, 11);
            let want = reference(&wq, &x, m, k, n);
            let mut got = vec![0f32; m * n];
            weights.matmul(&x, m, &mut got, &mut scratch).unwrap();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 0.02 * scale, "{dtype:?} m={m}: {g} vs {w}");
            }
            // Row 0 is the same whatever rides along with it.
            if m == 1 {
                single = got[..n].to_vec();
            } else {
                assert_eq!(&got[..n], &single[..], "{dtype:?} m={m}: row 0 changed");
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
