//! Softmax over the last dimension for f32 on the CPU, with a polynomial `exp` the compiler vectorises
//! (compiled for AVX2+FMA where the CPU has them, checked at run time): at 512×512 the UNet's attention
//! takes the exponential of a billion scores a step, where the C library's scalar `expf` costs more than
//! the rest of the softmax.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `eˣ` with a relative error below 3·10⁻⁷ (about 2 ulp) for `x < 88.7`: `x = n·ln2 + r` with `|r| ≤ ln2/2`,
/// `eʳ` by its degree-6 Taylor polynomial (error below 2⁻²⁴ on that interval), times `2ⁿ` built in the
/// exponent bits; below `−87.3` (where `eˣ` is subnormal) it returns 0, so `exp(−∞) = 0`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.3);
    // Round to nearest by adding and removing 1.5·2²³ (no call to the library's `floorf`).
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln2 split in a part exact in f32 and the remainder, so `x − n·ln2` loses no bits.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x <= -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// `row ← softmax(row)`: `eˣ⁻ᵐᵃˣ / Σ eˣ⁻ᵐᵃˣ`.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 8];
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
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        // Every score masked: candle's softmax gives NaN (0/0); keep that.
        row.iter_mut().for_each(|v| *v = f32::NAN);
        return;
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
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(data: &mut [f32], n: usize) {
    // A plain loop, so that `softmax_row` is inlined here and compiled with these features.
    for row in data.chunks_mut(n) {
        softmax_row(row);
    }
}

/// Softmax of each `n`-long row, with the widest instructions the CPU has.
fn softmax_rows(data: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { softmax_rows_avx2(data, n) };
    }
    data.chunks_mut(n).for_each(softmax_row);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            bail!("softmax: only f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("softmax: input must be contiguous")
        };
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = v[a..b].to_vec();
        // Blocks of whole rows, about 64 Ki values each, shared among the threads.
        let rows = (65536 / n).max(1);
        out.par_chunks_mut(rows * n)
            .for_each(|block| softmax_rows(block, n));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `softmax(x)` over the last dimension of an f32 CPU tensor (no backward pass: inference).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_input;

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
            let err: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-6, "{shape:?}: {err}");
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
}
