//! CLIP's activation for bf16 on the CPU, in one pass: `quick_gelu(x) = x · σ(1.702 x)` =
//! `x / (1 + e^(−1.702 x))` (transformers' `QuickGELUActivation`), in f32 with the polynomial `exp`
//! of [`softmax`](crate::kernels::softmax). candle runs it as three passes over bf16 tensors (a
//! scaling, a sigmoid, a product), a quarter of a bf16 text encoding.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::bf16;

use crate::kernels::softmax::exp;
use crate::kernels::{contiguous_bf16, par_filled, vectorised};

/// `out[i] = quick_gelu(x[i])`, in f32 then rounded to bf16, a block of values at a time.
#[inline(always)]
fn values(x: &[bf16], out: &mut [bf16]) {
    let mut block = [0f32; 256];
    for (src, dst) in x.chunks(block.len()).zip(out.chunks_mut(block.len())) {
        let block = &mut block[..src.len()];
        for (v, x) in block.iter_mut().zip(src) {
            let x = x.to_f32();
            // Past e⁸⁰ the quotient is 0 in f32 anyway; the clamp keeps `exp` inside its range.
            *v = x / (1.0 + exp((-1.702 * x).min(80.0)));
        }
        crate::kernels::narrow_to_bf16(block, dst);
    }
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_bf16(s, l, "quick_gelu: the input")?;
        // Compiled for AVX-512 where the CPU has it: sixteen values a step.
        let out = par_filled(x.len(), 16384, |i, dst| {
            let src = &x[i * 16384..][..dst.len()];
            vectorised(
                #[inline(always)]
                || values(src, dst),
            )
        });
        Ok((CpuStorage::BF16(out), l.shape().clone()))
    }
}

/// `x · σ(1.702 x)` of a bf16 tensor on the CPU.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QuickGelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_input;
    use candle_core::DType;

    #[test]
    fn matches_the_formula_in_f32_within_a_rounding() {
        // Off the 256-value blocks and the 16-lane steps; values out to ±100 (σ saturating, e^170
        // beyond f32 on the negative side).
        for n in [1usize, 17, 1000, 40_000] {
            let x = (test_input(&[n], 3) * 50.0)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let got = quick_gelu(&x).unwrap();
            assert_eq!((got.dims(), got.dtype()), (x.dims(), DType::BF16));
            let xf = x.to_dtype(DType::F32).unwrap();
            let want = (&xf * candle_nn::ops::sigmoid(&(&xf * 1.702).unwrap()).unwrap()).unwrap();
            // One bf16 rounding: half an ulp of 8 bits, relative.
            let got = got.to_dtype(DType::F32).unwrap();
            let err = ((&got - &want).unwrap().abs().unwrap()
                / (want.abs().unwrap() + 1e-3).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert!(err < 4e-3, "{n}: relative error {err}");
        }
    }

    #[test]
    fn refuses_another_dtype() {
        let err = test_input(&[4], 1)
            .apply_op1_no_bwd(&QuickGelu)
            .unwrap_err();
        assert!(err.to_string().contains("quick_gelu"), "{err}");
    }
}
