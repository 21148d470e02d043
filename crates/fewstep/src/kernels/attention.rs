//! Scaled dot-product attention, computed a head and a block of queries at a time so that the score
//! matrix is never held whole: at 512×512 the UNet's first self-attention has 8 heads × 4096 × 4096
//! scores (512 MiB in f32); a block of them stays in cache.

use candle_core::{DType, Tensor};

use crate::kernels::matmul;

/// Scores held at once, at most (elements): 2 MiB of f32, a core's share of the L2/L3 cache.
const BLOCK_SCORES: usize = 1 << 19;
/// The same bound for the products of [`matmul`], which pack the keys and values at every call: 16 MiB
/// of f32 scores, so a head's keys are packed a few times, not once per 128 queries.
const BLOCK_SCORES_KERNEL: usize = 1 << 22;

/// `softmax(q kᵀ · scale + mask) v` per batch-head, with `q: [N, Lq, d]`, `k: [N, Lk, d]`,
/// `v: [N, Lk, dv]`, an additive `mask` broadcast over `[N, Lq, Lk]` (f32: 0 or −∞) → `[N, Lq, dv]` in
/// `v`'s dtype. The scores and the softmax are f32 whatever the dtype; with `upcast` the product `q kᵀ`
/// is computed in f32 too (diffusers' `upcast_attention`).
///
/// Rows of the result are independent: when the `N·Lq·Lk` scores exceed [`BLOCK_SCORES`], each head is
/// taken alone (a mask must then be `[Lq, Lk]` or smaller) and its queries in blocks of
/// `BLOCK_SCORES / Lk` rows — the same numbers with a bounded score buffer, and matrix products tall
/// enough to run at full speed.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    let (n, lq, d) = q.dims3()?;
    let (_, lk, dv) = v.dims3()?;
    crate::flops::add(crate::flops::matmul(n * lq, d, lk) + crate::flops::matmul(n * lq, lk, dv));
    let (q, k) = if upcast && q.dtype() != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    // Both products on the CPU kernels where q, k and v share a dtype they run (after an upcast,
    // q and k are f32 and v is not), outside autograd (the kernels have no backward pass).
    let kernel = [&q, &k, v]
        .into_iter()
        .all(|t| matmul::available(t) && t.dtype() == q.dtype() && !t.track_op());
    let block = match kernel {
        true => BLOCK_SCORES_KERNEL,
        false => BLOCK_SCORES,
    };
    if n * lq * lk <= block || mask.is_some_and(|m| m.rank() > 2) {
        return attend(&q, &k.t()?, v, scale, mask, kernel);
    }
    let rows = (block / lk).clamp(16, lq);
    let heads = (0..n)
        .map(|h| {
            let (q, kt, v) = (q.get(h)?, k.get(h)?.t()?, v.get(h)?);
            let blocks = (0..lq)
                .step_by(rows)
                .map(|start| {
                    let len = rows.min(lq - start);
                    let m = mask
                        .map(|m| match m.rank() {
                            2 if m.dim(0)? == lq => m.narrow(0, start, len),
                            _ => Ok(m.clone()),
                        })
                        .transpose()?;
                    attend(
                        &q.narrow(0, start, len)?,
                        &kt,
                        &v,
                        scale,
                        m.as_ref(),
                        kernel,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&blocks, 0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&heads, 0)
}

/// `softmax(q · kt · scale + mask) v` on whole matrices (`kt` the transposed keys), scores in f32;
/// with `kernel` both products on [`matmul`].
fn attend(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    kernel: bool,
) -> candle_core::Result<Tensor> {
    let scores = match kernel {
        true => matmul::matmul(q, kt, scale, DType::F32)?,
        false => (q * scale)?.matmul(kt)?.to_dtype(DType::F32)?,
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    match (kernel, v.dtype()) {
        (true, DType::BF16) => {
            let probs = crate::kernels::softmax::softmax_last_dim_bf16(&scores)?;
            matmul::matmul(&probs, v, 1.0, DType::BF16)
        }
        (true, _) => {
            let probs = crate::models::nn::softmax_last_dim(&scores)?;
            matmul::matmul(&probs, v, 1.0, DType::F32)
        }
        (false, _) => crate::models::nn::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .matmul(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs_diff, test_input};
    use candle_core::{Device, D};

    /// The plain formula on whole matrices, with candle's ops.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Tensor {
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = match mask {
            Some(m) => s.broadcast_add(m).unwrap(),
            None => s,
        };
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn blocked_attention_matches_the_formula_at_awkward_sizes() {
        // 3 heads × 1000 queries × 700 keys: 249 rows a block, the last block shorter.
        for (n, lq, lk, d, dv) in [(3, 1000, 700, 13, 7), (2, 5, 77, 8, 8), (1, 333, 1, 3, 5)] {
            let (q, k, v) = (
                test_input(&[n, lq, d], 1),
                test_input(&[n, lk, d], 2),
                test_input(&[n, lk, dv], 3),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = scaled_dot_product_attention(&q, &k, &v, scale, None, false).unwrap();
            assert_eq!(got.dims(), &[n, lq, dv]);
            let want = reference(&q, &k, &v, scale, None);
            assert!(max_abs_diff(&got, &want) < 1e-5, "{n}×{lq}×{lk}");
        }
    }

    #[test]
    fn a_causal_mask_is_applied_per_block() {
        let (n, l, d) = (2, 1000, 4);
        let mask: Vec<f32> = (0..l * l)
            .map(|i| {
                if i % l > i / l {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (l, l), &Device::Cpu).unwrap();
        let (q, k, v) = (
            test_input(&[n, l, d], 4),
            test_input(&[n, l, d], 5),
            test_input(&[n, l, d], 6),
        );
        let got = scaled_dot_product_attention(&q, &k, &v, 0.5, Some(&mask), false).unwrap();
        let want = reference(&q, &k, &v, 0.5, Some(&mask));
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // The first query sees only the first value.
        let first = got.narrow(1, 0, 1).unwrap();
        assert!(max_abs_diff(&first, &v.narrow(1, 0, 1).unwrap()) < 1e-6);
    }
}
