//! Softmax over the last dimension for f32 on the CPU, with a polynomial `exp`: in AVX2+FMA intrinsics
//! where the CPU has them (checked at run time), in portable scalar code elsewhere. At 512×512 the UNet's attention
//! takes the exponential of a billion scores a step, where the C library's scalar `expf` costs more than
//! the rest of the softmax.

use crate::kernels::contiguous_f32;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// Below this `eˣ` is taken as 0 (near where it turns subnormal).
const EXP_FLOOR: f32 = -87.0;
/// `1.5·2²³`: adding and removing it rounds to the nearest integer, and the sum's low mantissa bits hold
/// it, so `2ⁿ` is built with integer operations (no float-to-int conversion, which would not vectorise).
const ROUND: f32 = 12_582_912.0;
/// ln 2 split in a part exact in f32 and the remainder, so `x − n·ln2` loses no bits.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// The Taylor coefficients of `eʳ` after the leading 1/720, in Horner's order.
const TAYLOR: [f32; 6] = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `eˣ` with a relative error below 3·10⁻⁷ (about 2 ulp) for `x < 88`: `x = n·ln2 + r` with `|r| ≤ ln2/2`,
/// `eʳ` by its degree-6 Taylor polynomial (error below 2⁻²⁴ on that interval), times `2ⁿ` built in the
/// exponent bits; below `−87` (near where `eˣ` turns subnormal) it returns 0, so `exp(−∞) = 0`. The
/// input is clamped first so no lane ever computes a subnormal product (each costs a hundred cycles).
/// The vector versions below run the same steps on 8 and 16 lanes.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let below = x < EXP_FLOOR;
    let x = x.max(EXP_FLOOR);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = TAYLOR.iter().fold(1.0 / 720.0, |p, &c| p * r + c);
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if below {
        0.0
    } else {
        p * scale
    }
}

/// `row ← eˣ⁻ᵐ` of `x = s · row` with `m = max(floor, maxᵢ xᵢ)`, returning `(m, Σ eˣ⁻ᵐ)` (with
/// `s = 1` and `floor = −∞` the softmax is the row divided by the sum), in eight lanes the compiler
/// vectorises; a row that stays at −∞ becomes NaN (candle's softmax gives 0/0 there), its sum 1.
#[inline(always)]
fn exp_row(row: &mut [f32], s: f32, floor: f32) -> (f32, f32) {
    row.iter_mut().for_each(|v| *v *= s);
    let mut lanes = [floor; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(floor, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|v| *v = f32::NAN);
        return (max, 1.0);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (v, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *v = exp(*v - max);
            *l += *v;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    (max, sum)
}

/// The AVX2+FMA versions of [`exp`] and [`exp_row`], eight lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on eight lanes (the reduction and the polynomial with fused multiply-adds).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(super::EXP_FLOOR));
        let x = _mm256_max_ps(x, set(super::EXP_FLOOR));
        let t = _mm256_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(super::ROUND));
        let n = _mm256_sub_ps(t, set(super::ROUND));
        let r = _mm256_fnmadd_ps(n, set(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, set(super::LN2_LO), r);
        let mut p = set(1.0 / 720.0);
        for c in super::TAYLOR {
            p = _mm256_fmadd_ps(p, r, set(c));
        }
        let bits = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(super::ROUND.to_bits() as i32 - 127),
        );
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits));
        _mm256_andnot_ps(below, _mm256_mul_ps(p, scale))
    }

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// [`super::exp_row`] of an unscaled row from −∞ (`s = 1`, `floor = −∞`) with whole vectors,
    /// the last `len % 8` values one by one, returning the inverse of the sum.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_row(row: &mut [f32]) -> f32 {
        let whole = row.len() / 8 * 8;
        let (body, tail) = row.split_at_mut(whole);
        let ptr = body.as_mut_ptr();
        // SAFETY: every load and store below reads or writes eight values at `ptr + i`, `i + 8 ≤ whole`.
        unsafe {
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for i in (0..whole).step_by(8) {
                m = _mm256_max_ps(m, _mm256_loadu_ps(ptr.add(i)));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let max = lanes
                .iter()
                .chain(tail.iter())
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            if max == f32::NEG_INFINITY {
                body.iter_mut()
                    .chain(tail.iter_mut())
                    .for_each(|v| *v = f32::NAN);
                return 1.0;
            }
            let mx = _mm256_set1_ps(max);
            let mut acc = _mm256_setzero_ps();
            for i in (0..whole).step_by(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), mx));
                _mm256_storeu_ps(ptr.add(i), e);
                acc = _mm256_add_ps(acc, e);
            }
            let mut sum = sum8(acc);
            for v in tail.iter_mut() {
                *v = super::exp(*v - max);
                sum += *v;
            }
            1.0 / sum
        }
    }

    /// `row ← row · s`, eight lanes at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scale_row(row: &mut [f32], s: f32) {
        let whole = row.len() / 8 * 8;
        let (body, tail) = row.split_at_mut(whole);
        let (ptr, sv) = (body.as_mut_ptr(), _mm256_set1_ps(s));
        // SAFETY: every load and store reads or writes eight values at `ptr + i`, `i + 8 ≤ whole`.
        unsafe {
            for i in (0..whole).step_by(8) {
                _mm256_storeu_ps(ptr.add(i), _mm256_mul_ps(_mm256_loadu_ps(ptr.add(i)), sv));
            }
        }
        tail.iter_mut().for_each(|v| *v *= s);
    }
}

/// The AVX-512F version of [`avx2::exp_row`]: sixteen lanes, the tail under a mask.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on sixteen lanes, the same operations as [`super::avx2::exp8`].
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(super::EXP_FLOOR));
        let x = _mm512_max_ps(x, set(super::EXP_FLOOR));
        let t = _mm512_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(super::ROUND));
        let n = _mm512_sub_ps(t, set(super::ROUND));
        let r = _mm512_fnmadd_ps(n, set(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, set(super::LN2_LO), r);
        let mut p = set(1.0 / 720.0);
        for c in super::TAYLOR {
            p = _mm512_fmadd_ps(p, r, set(c));
        }
        let bits = _mm512_sub_epi32(
            _mm512_castps_si512(t),
            _mm512_set1_epi32(super::ROUND.to_bits() as i32 - 127),
        );
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits));
        _mm512_maskz_mul_ps(!below, p, scale)
    }

    /// [`super::exp_row`] on sixteen lanes, the tail under a mask: `row ← eˣ⁻ᵐ` of `x = s · row`
    /// (each product rounded to f32 first, as a scaled score matrix holds it) with
    /// `m = max(floor, maxᵢ xᵢ)`, returning `(m, Σ eˣ⁻ᵐ)`; a row that stays at −∞ becomes NaN, its
    /// sum 1.
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_row(row: &mut [f32], s: f32, floor: f32) -> (f32, f32) {
        let max = row_max(row, s, floor);
        if max == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = f32::NAN);
            return (max, 1.0);
        }
        let (sv, mx) = (_mm512_set1_ps(s), _mm512_set1_ps(max));
        let mut acc = _mm512_setzero_ps();
        for i in (0..row.len()).step_by(16) {
            let e = exp_at(row, i, sv, mx);
            // SAFETY: the store is masked to the lanes inside the row.
            unsafe { _mm512_mask_storeu_ps(row.as_mut_ptr().add(i), lanes(row.len(), i), e) };
            acc = _mm512_add_ps(acc, e);
        }
        (max, _mm512_reduce_add_ps(acc))
    }

    /// The lanes of the 16 values from `i` that lie inside a row of `len`.
    fn lanes(len: usize, i: usize) -> __mmask16 {
        match len - i {
            n if n >= 16 => 0xffff,
            n => (1u16 << n) - 1,
        }
    }

    /// `max(floor, maxᵢ s · rowᵢ)`.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn row_max(row: &[f32], s: f32, floor: f32) -> f32 {
        let sv = _mm512_set1_ps(s);
        let mut m = _mm512_set1_ps(floor);
        for i in (0..row.len()).step_by(16) {
            // SAFETY: the read is masked to the lanes inside the row.
            let x = unsafe { _mm512_maskz_loadu_ps(lanes(row.len(), i), row.as_ptr().add(i)) };
            m = _mm512_mask_max_ps(m, lanes(row.len(), i), m, _mm512_mul_ps(x, sv));
        }
        _mm512_reduce_max_ps(m)
    }

    /// Coefficients of `2ᶠ` on `[−½, ½]`, degree 4, near minimax (relative error 2.6·10⁻⁶).
    const EXP2: [f32; 5] = [
        0.999_999_3,
        0.693_121_8,
        0.240_247_44,
        0.055_917_86,
        0.009_570_1,
    ];

    /// `e^(s · rowᵢ − m)` of the 16 values from `i`, zero past the row, to a relative error below
    /// 3·10⁻⁶ — for probabilities rounded to bf16 next (a rounding of 2⁻⁹): `ls = s · log₂e` and
    /// `lm = m · log₂e` in every lane, `y = ls · x − lm = n + f` (`n` the nearest integer), `2ᶠ` by
    /// [`EXP2`], scaled by `2ⁿ` (`vscalefps`); `y` below −160 (a score of −∞) gives 0. Half the
    /// operations of [`exp_at`]. Returns the exponentials and `y` (0 past the row).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp_at_bf16(row: &[f32], i: usize, ls: __m512, lm: __m512) -> (__m512, __m512) {
        let mask = lanes(row.len(), i);
        // SAFETY: the read is masked to the lanes inside the row.
        let x = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i)) };
        let y = _mm512_max_ps(
            _mm512_mask_fmsub_ps(x, mask, ls, lm),
            _mm512_set1_ps(-160.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let f = _mm512_sub_ps(y, n);
        let mut p = _mm512_set1_ps(EXP2[4]);
        for c in EXP2[..4].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        (_mm512_maskz_scalef_ps(mask, p, n), y)
    }

    /// `e^(s · rowᵢ − m)` of the 16 values from `i` (`s` and `m` in every lane), zero past the row.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp_at(row: &[f32], i: usize, s: __m512, m: __m512) -> __m512 {
        let mask = lanes(row.len(), i);
        // SAFETY: the read is masked to the lanes inside the row.
        let x = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i)) };
        _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(_mm512_mul_ps(x, s), m)))
    }
}

/// One block of columns of an online softmax (Milakov & Gimelshein 2018, as FlashAttention takes a
/// block of keys): for each of `rows` rows `stride` apart, its first `n` values `r` and `x = s · r`,
/// `m' = max(maxᵢ, maxⱼ xⱼ)`, `r ← eˣ⁻ᵐ'`, `rescale[i] = e^(maxᵢ − m')` (the factor the sums and
/// outputs of the earlier blocks take), `sums[i] ← sums[i] · rescale[i] + Σ eˣ⁻ᵐ'`, `maxᵢ ← m'`. The
/// first block starts from `maxᵢ = −∞` and `sums[i] = 0`.
pub(crate) fn exp_rows_online(
    data: &mut [f32],
    (rows, n, stride): (usize, usize, usize),
    s: f32,
    (max, sums, rescale): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let rows = data.chunks_mut(stride).take(rows).map(|r| &mut r[..n]);
    for (((row, max), sum), rescale) in rows.zip(max).zip(sums).zip(rescale) {
        #[cfg(target_arch = "x86_64")]
        let (m, block) = match is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function was compiled for.
            true => unsafe { avx512::exp_row(row, s, *max) },
            false => exp_row(row, s, *max),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (m, block) = exp_row(row, s, *max);
        online_step((max, sum, rescale), (m, block));
    }
}

/// The running state of a row of an online softmax after a block whose maximum (with the earlier
/// ones) is `m` and whose `Σ eˣ⁻ᵐ` is `block`: `rescale = e^(max − m)`, `sum ← sum · rescale + block`,
/// `max ← m` ([`exp_rows_online`]).
pub(crate) fn online_step(
    (max, sum, rescale): (&mut f32, &mut f32, &mut f32),
    (m, block): (f32, f32),
) {
    *rescale = exp(*max - m);
    *sum = *sum * *rescale + block;
    *max = m;
}

/// The first `n` values `r` of each of `rows` rows `stride` apart in `data` ← `softmax(r)`: `eʳ⁻ᵐᵃˣ`
/// ([`exp_row`]), then the row times its inverse sum, with the widest instructions the CPU has.
fn softmax_rows(data: &mut [f32], (rows, n, stride): (usize, usize, usize)) {
    for row in data.chunks_mut(stride).take(rows).map(|r| &mut r[..n]) {
        let inv = 'inv: {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the feature the function was compiled for.
                break 'inv 1.0 / unsafe { avx512::exp_row(row, 1.0, f32::NEG_INFINITY) }.1;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: the CPU has the features the function was compiled for.
                break 'inv unsafe { avx2::exp_row(row) };
            }
            1.0 / exp_row(row, 1.0, f32::NEG_INFINITY).1
        };
        scale_row(row, inv);
    }
}

/// `row ← row · s`.
fn scale_row(row: &mut [f32], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { avx2::scale_row(row, s) };
    }
    row.iter_mut().for_each(|v| *v *= s);
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The softmax op, its result in `out` (f32 or bf16).
struct Softmax {
    out: DType,
}

/// Rows a block of the softmax holds: about 64 Ki values, shared among the threads.
fn block_rows(n: usize) -> usize {
    (65536 / n).max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = contiguous_f32(s, l, "softmax: the input")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = block_rows(n);
        let storage = match self.out {
            DType::F32 => {
                let out = crate::kernels::par_filled(v.len(), rows * n, |i, block| {
                    block.copy_from_slice(&v[i * rows * n..][..block.len()]);
                    softmax_rows(block, (block.len() / n, n, n))
                });
                CpuStorage::F32(out)
            }
            DType::BF16 => {
                // Each row computed in a scratch copy that stays in cache, then narrowed.
                let out = crate::kernels::par_filled(v.len(), rows * n, |i, dst| {
                    let mut row = vec![0f32; n];
                    for (dst, src) in dst.chunks_mut(n).zip(v[i * rows * n..].chunks(n)) {
                        row.copy_from_slice(src);
                        softmax_rows(&mut row, (1, n, n));
                        crate::kernels::narrow_to_bf16(&row, dst);
                    }
                });
                CpuStorage::BF16(out)
            }
            d => bail!("softmax: no {d:?} output"),
        };
        Ok((storage, l.shape().clone()))
    }
}

/// `softmax(x)` over the last dimension of an f32 CPU tensor (no backward pass: inference).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&Softmax { out: DType::F32 })
}

/// [`softmax_last_dim`] with the result rounded to bf16 in the same pass.
pub fn softmax_last_dim_bf16(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&Softmax { out: DType::BF16 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs_diff, test_input};

    #[test]
    fn exp_is_within_about_two_ulp_of_the_library() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            use std::arch::x86_64::*;
            let mut worst = 0f32;
            for k in 0..1000 {
                let xs: [f32; 8] = std::array::from_fn(|i| -100.0 + 0.0235 * (8 * k + i) as f32);
                let mut got = [0f32; 8];
                // SAFETY: the CPU has AVX2 and FMA; both arrays hold eight f32.
                unsafe {
                    _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(xs.as_ptr())))
                };
                for (g, x) in got.iter().zip(xs) {
                    let want = if x < -87.0 { 0.0 } else { x.exp() };
                    assert!(want > 0.0 || *g == 0.0, "exp8({x}) = {g}");
                    if want > 0.0 {
                        worst = worst.max((g - want).abs() / want);
                    }
                }
            }
            assert!(worst < 3e-7, "AVX2 relative error {worst}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn matches_candle_softmax_at_awkward_sizes_and_masks() {
        for (shape, scale) in [
            (vec![3usize, 7, 13], 1.0),
            (vec![2, 1000], 30.0),
            (vec![5, 1], 1.0),
        ] {
            let x = (test_input(&shape, 11) * scale).unwrap();
            let got = softmax_last_dim(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-6, "{shape:?}: {err}");
            // The portable rows, which a CPU with AVX2 never takes, give the same.
            let n = *shape.last().unwrap();
            let mut rows: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            rows.chunks_mut(n).for_each(|row| {
                let inv = 1.0 / exp_row(row, 1.0, f32::NEG_INFINITY).1;
                row.iter_mut().for_each(|v| *v *= inv);
            });
            let portable = Tensor::from_vec(rows, shape.as_slice(), x.device()).unwrap();
            let err = max_abs_diff(&portable, &want);
            assert!(err < 1e-6, "portable {shape:?}: {err}");
            // The bf16 result is the f32 one rounded (to nearest even) once.
            let narrowed = softmax_last_dim_bf16(&x).unwrap();
            assert_eq!(narrowed.dtype(), DType::BF16);
            let rounded = got.to_dtype(DType::BF16).unwrap();
            let err = max_abs_diff(
                &narrowed.to_dtype(DType::F32).unwrap(),
                &rounded.to_dtype(DType::F32).unwrap(),
            );
            // (AVX-512 BF16's conversion flushes subnormal values, below 1.2·10⁻³⁸, to zero.)
            assert!(err <= f32::MIN_POSITIVE, "bf16 {shape:?}: {err}");
        }
        // A causal mask's −∞ gives exact zeros.
        let x = Tensor::new(
            &[[0.5f32, f32::NEG_INFINITY, 2.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y: Vec<f32> = softmax_last_dim(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y[1], 0.0);
        assert!((y[0] + y[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_exponential_rows_agree_on_every_instruction_set() {
        // Rows off the 8- and 16-lane edges, one fully masked.
        for n in [1usize, 7, 16, 17, 33, 1000] {
            let x = (test_input(&[3, n], 12) * 20.0).unwrap();
            let mut rows: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            rows[2 * n..]
                .iter_mut()
                .for_each(|v| *v = f32::NEG_INFINITY);
            let mut want = rows.clone();
            let want_inv: Vec<f32> = want
                .chunks_mut(n)
                .map(|r| 1.0 / exp_row(r, 1.0, f32::NEG_INFINITY).1)
                .collect();
            let mut variants: Vec<fn(&mut [f32]) -> f32> = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if avx2() {
                    // SAFETY: checked just above.
                    variants.push(|r| unsafe { avx2::exp_row(r) });
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: checked just above.
                    variants
                        .push(|r| 1.0 / unsafe { avx512::exp_row(r, 1.0, f32::NEG_INFINITY) }.1);
                }
            }
            // Scaled rows from a finite running maximum (the online softmax's blocks).
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                for floor in [f32::NEG_INFINITY, 3.0] {
                    let (mut scalar, mut wide) = (rows[..n].to_vec(), rows[..n].to_vec());
                    let (m, sum) = exp_row(&mut scalar, 0.7, floor);
                    // SAFETY: checked just above.
                    let (wm, wsum) = unsafe { avx512::exp_row(&mut wide, 0.7, floor) };
                    assert_eq!(m, wm, "n {n} floor {floor}");
                    assert!((sum - wsum).abs() <= 1e-6 * sum, "n {n}: {sum} vs {wsum}");
                    for (g, w) in wide.iter().zip(&scalar) {
                        assert!((g - w).abs() <= 1e-6, "n {n} floor {floor}");
                    }
                }
            }
            for exp_row in variants {
                let mut got = rows.clone();
                let inv: Vec<f32> = got.chunks_mut(n).map(exp_row).collect();
                for (i, (g, w)) in inv.iter().zip(&want_inv).enumerate() {
                    assert!((g - w).abs() <= 1e-6 * w.abs(), "n {n} row {i}: {g} vs {w}");
                }
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 || (g.is_nan() && w.is_nan()), "n {n}");
                }
            }
        }
    }
}
