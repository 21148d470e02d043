//! The gated GELU of the UNet's feed-forward layers for bf16 and f32 on the CPU, in one pass:
//! `[h, g] → h · gelu(g)`, `gelu(g) = g/2 · (1 + erf(g/√2))` (diffusers' `GEGLU`, the exact GELU), in
//! f32 with a polynomial `erf`. candle runs it as three passes (a strided copy of each half, the C
//! library's `erf` on every value, a product), a tenth of a bf16 UNet step, 4 % of an f32 one.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::softmax::exp;
use crate::kernels::{contiguous_bf16, contiguous_f32, par_filled, vectorised, Element};

/// `erf(x)` with an absolute error below 1.5·10⁻⁷ in exact arithmetic, 6·10⁻⁷ in f32 (Abramowitz &
/// Stegun 7.1.26):
/// `erf(|x|) = 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^(−x²)`, `t = 1/(1 + p|x|)`, odd in `x`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp(-z * z)).copysign(x)
}

/// `h ← h · gelu(g)`, `gelu(g) = g/2 · (1 + erf(g/√2))`, value by value in f32.
#[inline(always)]
pub(crate) fn gate(h: &mut [f32], g: &[f32]) {
    for (h, &g) in h.iter_mut().zip(g) {
        *h *= 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// [`gate`] on `rows` rows of `tile`, `stride` values apart, each holding `h` in its first `half`
/// values and `g` in the next `half`: `h` becomes `h · gelu(g)`. Compiled for AVX-512 where the CPU
/// has it: the epilogue of a product fused with its gate ([`PackedWeight::geglu`](
/// crate::kernels::matmul::PackedWeight::geglu)).
pub(crate) fn gate_rows(tile: &mut [f32], rows: usize, half: usize, stride: usize) {
    vectorised(
        #[inline(always)]
        || {
            for row in tile.chunks_mut(stride).take(rows) {
                let (h, g) = row.split_at_mut(half);
                gate(h, &g[..half]);
            }
        },
    )
}

/// `out[r][i] = h · gelu(g)` with `h = hg[r][i]`, `g = hg[r][inner + i]`, for the rows of `hg`: each
/// row in f32, then stored in `T` (bf16 rounded).
#[inline(always)]
fn rows<T: Element>(hg: &[T], out: &mut [T], inner: usize) {
    let (mut h32, mut g32) = (vec![0f32; inner], vec![0f32; inner]);
    for (src, dst) in hg.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
        let (h, g) = src.split_at(inner);
        h32.iter_mut().zip(h).for_each(|(v, h)| *v = h.to_f32());
        g32.iter_mut().zip(g).for_each(|(v, g)| *v = g.to_f32());
        gate(&mut h32, &g32);
        // SAFETY: both hold a row's `inner` values.
        unsafe { T::store(&h32, dst) };
    }
}

/// `h · gelu(g)` for the rows of `hg` (`[.., 2 · inner]`), a block of rows a task, [`rows`] compiled
/// for AVX-512 where the CPU has it (sixteen values a step).
fn geglu_values<T: Element>(hg: &[T], inner: usize) -> Vec<T> {
    let block = inner * (4096 / inner).max(1);
    par_filled(hg.len() / 2, block, |i, dst| {
        let src = &hg[2 * i * block..][..2 * dst.len()];
        vectorised(
            #[inline(always)]
            || rows(src, dst, inner),
        )
    })
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let width = dims.last().copied().unwrap_or(0);
        if !width.is_multiple_of(2) {
            bail!("geglu: the last dimension ({width}) must be even");
        }
        let inner = width / 2;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(geglu_values(
                contiguous_f32(s, l, "geglu: the input")?,
                inner,
            )),
            _ => CpuStorage::BF16(geglu_values(
                contiguous_bf16(s, l, "geglu: the input")?,
                inner,
            )),
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = inner;
        Ok((out, Shape::from(shape)))
    }
}

/// `h · gelu(g)` for `hg = [h, g]` split in halves along its last dimension, bf16 or f32 on the CPU.
pub fn geglu(hg: &Tensor) -> candle_core::Result<Tensor> {
    hg.contiguous()?.apply_op1_no_bwd(&Geglu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs, max_abs_diff, test_input};
    use candle_core::DType;

    #[test]
    fn erf_matches_the_c_library() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            // The formula's 1.5·10⁻⁷ plus the f32 rounding of `1 − poly·e^(−x²)`.
            assert!((erf(x) - libm_erf(x)).abs() < 6e-7, "erf({x})");
        }
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    fn libm_erf(x: f32) -> f32 {
        // candle's own erf (the C library's algorithm), through its unary op.
        Tensor::new(&[x], &candle_core::Device::Cpu)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn matches_candle_on_awkward_rows() {
        for (rows, inner) in [(3, 5), (1000, 40), (7, 5120)] {
            let x = (test_input(&[rows, 2 * inner], 1) * 2.0)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let h = x.narrow(1, 0, inner).unwrap();
            let g = x.narrow(1, inner, inner).unwrap();
            let want = (h * g.gelu_erf().unwrap()).unwrap();
            let got = geglu(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            // One bf16 rounding apart (candle rounds gelu(g) to bf16 before the product).
            let got = got.to_dtype(DType::F32).unwrap();
            let want = want.to_dtype(DType::F32).unwrap();
            assert!(
                max_abs_diff(&got, &want) / max_abs(&want) < 8e-3,
                "{rows}×{inner}"
            );
        }
    }

    #[test]
    fn matches_candle_in_f32_within_the_erf_error() {
        for (rows, inner) in [(3, 5), (1000, 40), (7, 5120)] {
            let x = (test_input(&[rows, 2 * inner], 1) * 2.0).unwrap();
            let h = x.narrow(1, 0, inner).unwrap();
            let g = x.narrow(1, inner, inner).unwrap();
            let want = (h * g.gelu_erf().unwrap()).unwrap();
            let got = geglu(&x).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), DType::F32));
            // |h| ≤ 4 times g/2 · 6·10⁻⁷ (the polynomial erf's error in f32), |g| ≤ 4.
            let err = max_abs_diff(&got, &want);
            assert!(err < 5e-6, "{rows}×{inner}: {err}");
        }
    }

    #[test]
    fn an_odd_width_is_refused() {
        let err = geglu(&test_input(&[2, 7], 1)).unwrap_err();
        assert!(err.to_string().contains("must be even"), "{err}");
    }
}
