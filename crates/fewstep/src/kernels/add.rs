//! The residual and bias additions of the UNet for bf16 on the CPU: `y = a + b` in f32, rounded once,
//! with `b` of `a`'s shape or one value per leading index (the timestep embedding added to every
//! pixel of a channel). candle's bf16 addition widens and narrows each vector through calls that are
//! not inlined, a tenth of a bf16 UNet step.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use half::bf16;

use crate::kernels::{contiguous_bf16, par_filled};

/// Values a task adds: blocks of 64 Ki.
const BLOCK: usize = 1 << 16;

struct Add;

/// `out[i] = a[i] + b(i)` in f32, rounded to bf16 a block at a time.
#[inline(always)]
fn add_into(out: &mut [bf16], a: &[bf16], b: impl Fn(usize) -> f32) {
    let mut sum = [0f32; BLOCK / 16];
    for (block, (o, a)) in out
        .chunks_mut(sum.len())
        .zip(a.chunks(sum.len()))
        .enumerate()
    {
        let s = &mut sum[..o.len()];
        for (i, (s, a)) in s.iter_mut().zip(a).enumerate() {
            *s = a.to_f32() + b(block * BLOCK / 16 + i);
        }
        crate::kernels::narrow_to_bf16(s, o);
    }
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add-bf16"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        a_l: &Layout,
        b_s: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (
            contiguous_bf16(a_s, a_l, "add: the left operand")?,
            contiguous_bf16(b_s, b_l, "add: the right operand")?,
        );
        let out = if b.len() == a.len() {
            par_filled(a.len(), BLOCK, |i, o| {
                let (a, b) = (&a[i * BLOCK..], &b[i * BLOCK..]);
                add_into(o, a, |j| b[j].to_f32())
            })
        } else if !b.is_empty() && a.len() % b.len() == 0 {
            // One value of `b` for each run of `a.len() / b.len()` values.
            let run = a.len() / b.len();
            par_filled(a.len(), run, |i, o| {
                let b = b[i].to_f32();
                add_into(o, &a[i * run..], |_| b)
            })
        } else {
            bail!("add: shapes {:?} and {:?}", a_l.dims(), b_l.dims());
        };
        Ok((CpuStorage::BF16(out), a_l.shape().clone()))
    }
}

/// `a + b` for bf16 CPU tensors, `b` of `a`'s shape or of its leading dims with ones after (`[B, C]`
/// or `[B, C, 1, 1]` against `[B, C, H, W]`); other operands go through candle's broadcasting add.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fast = a.dtype() == candle_core::DType::BF16
        && b.dtype() == a.dtype()
        && a.device().is_cpu()
        && !a.track_op()
        && !b.track_op()
        && leading(a.dims(), b.dims());
    match (fast, a.dims() == b.dims()) {
        (true, _) => a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add),
        (false, true) => a + b,
        (false, false) => a.broadcast_add(b),
    }
}

/// Whether `b`'s shape is `a`'s first dims followed by ones (or nothing): each value of `b` then
/// meets one contiguous run of `a`.
fn leading(a: &[usize], b: &[usize]) -> bool {
    let kept = b.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    b.len() <= a.len() && b[..kept] == a[..kept]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs_diff, test_input};
    use candle_core::DType;

    fn bf16(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16).unwrap()
    }

    #[test]
    fn matches_candle_for_residuals_and_channel_biases() {
        let a = bf16(&test_input(&[2, 5, 70_001], 1));
        for b in [
            bf16(&test_input(&[2, 5, 70_001], 2)),
            bf16(&test_input(&[2, 5, 1], 3)),
            bf16(&test_input(&[2, 5], 4)),
        ] {
            let got = add(&a, &b).unwrap();
            let want = match b.rank() {
                2 => a.broadcast_add(&b.unsqueeze(2).unwrap()).unwrap(),
                _ => a.broadcast_add(&b).unwrap(),
            };
            assert_eq!(got.dims(), a.dims());
            let err = max_abs_diff(
                &got.to_dtype(DType::F32).unwrap(),
                &want.to_dtype(DType::F32).unwrap(),
            );
            assert_eq!(err, 0.0, "{:?}", b.dims());
        }
    }

    #[test]
    fn other_shapes_broadcast_as_candle_does() {
        let a = bf16(&test_input(&[3, 4], 5));
        let b = bf16(&test_input(&[4], 6));
        assert!(!leading(a.dims(), b.dims()));
        let got = add(&a, &b).unwrap();
        assert_eq!(max_abs_diff(&got, &a.broadcast_add(&b).unwrap()), 0.0);
    }
}
