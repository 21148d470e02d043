//! Scaled dot-product attention, computed a head and a block of queries at a time so that the score
//! matrix is never held whole: at 512×512 the UNet's first self-attention has 8 heads × 4096 × 4096
//! scores (512 MiB in f32). On the CPU kernels of [`matmul`] the attention is fused, as FlashAttention:
//! each task takes a block of a head's queries through both products and an online softmax, a block
//! of keys at a time, its scores in cache; the head's keys and values are packed once for all of its
//! blocks.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::aligned::Aligned;
use crate::kernels::matmul::{self, PackedLhs, PackedRhs, Source};
use crate::kernels::{assume_init, softmax, uninit, Element, SharedOut};

/// Scores held at once, at most (elements): 2 MiB of f32, a core's share of the L2/L3 cache.
const BLOCK_SCORES: usize = 1 << 19;
/// The same bound for the products of [`matmul`], which pack the keys and values at every call: 16 MiB
/// of f32 scores, so a head's keys are packed a few times, not once per 128 queries.
const BLOCK_SCORES_KERNEL: usize = 1 << 22;

/// What the queries of [`scaled_dot_product_attention`] may not attend to.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// Query `i` attends to keys `0..=i` only (a causal text encoder's; torch's `is_causal`).
    Causal,
    /// Added to the scores: f32, 0 or −∞, broadcast over `[N, Lq, Lk]`.
    Additive(&'a Tensor),
}

/// `softmax(q kᵀ · scale + mask) v` per batch-head, with `q: [N, Lq, d]`, `k: [N, Lk, d]`,
/// `v: [N, Lk, dv]` and a [`Mask`] → `[N, Lq, dv]` in `v`'s dtype. The scores and the softmax are f32
/// whatever the dtype; with `upcast` the product `q kᵀ` is computed in f32 too (diffusers'
/// `upcast_attention`).
///
/// Rows of the result are independent. Without a mask or with a causal one, on the CPU kernels, the
/// attention is [`Fused`]. Elsewhere (a causal mask then made a tensor `[Lq, Lk]`), when the `N·Lq·Lk`
/// scores exceed [`BLOCK_SCORES`], each head is taken alone (a mask must then be `[Lq, Lk]` or smaller)
/// and its queries in blocks of `BLOCK_SCORES / Lk` rows — the same numbers with a bounded score
/// buffer, and matrix products tall enough to run at full speed.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<Mask>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    let (n, lq, d) = q.dims3()?;
    let (_, lk, dv) = v.dims3()?;
    let one_head = |t: &Tensor| t.unsqueeze(1);
    if let Some(o) = fused(
        &one_head(q)?,
        &one_head(k)?,
        &one_head(v)?,
        scale,
        mask,
        upcast,
    )? {
        return Ok(o);
    }
    crate::flops::add(crate::flops::matmul(n * lq, d, lk) + crate::flops::matmul(n * lq, lk, dv));
    let (q, k) = if upcast && q.dtype() != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    let kernel = kernels_run(&[&q, &k, v]);
    let causal_mask;
    let mask = match mask {
        Some(Mask::Causal) => {
            causal_mask = causal_scores(lq, lk, q.device())?;
            Some(&causal_mask)
        }
        Some(Mask::Additive(m)) => Some(m),
        None => None,
    };
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

/// Multi-head attention on heads side by side, as attention's projections write them: `q: [B, Lq,
/// H·d]`, `k: [B, Lk, H·d]`, `v: [B, Lk, H·dv]`, head `h` in columns `h·d .. (h + 1)·d` → `[B, Lq,
/// H·dv]`, head `h`'s `softmax(q_h k_hᵀ · scale + mask) v_h` in its columns `h·dv ..` (diffusers'
/// `Attention`: `head_to_batch_dim`, the attention per batch-head, `batch_to_head_dim`). Where the
/// fused kernel runs, it reads and writes the heads where they lie; elsewhere they are split out
/// into `[B·H, L, d]`, taken through [`scaled_dot_product_attention`] and merged back (four copies
/// on one thread, while the others wait: 3 % of a bf16 UNet step).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<Mask>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    let ((b, lq, qw), (_, lk, kw), (_, _, vw)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    if heads == 0 || qw % heads != 0 || kw != qw || vw % heads != 0 {
        bail!(
            "attention: {heads} heads do not split q {:?}, k {:?} and v {:?} evenly",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (d, dv) = (qw / heads, vw / heads);
    // `[B, H, L, w]` views of the heads.
    let split = |t: &Tensor, w: usize| t.reshape((b, t.dim(1)?, heads, w))?.transpose(1, 2);
    let (q, k, v) = (split(q, d)?, split(k, d)?, split(v, dv)?);
    if let Some(o) = fused(&q, &k, &v, scale, mask, upcast)? {
        return Ok(o);
    }
    let flat = |t: Tensor, l: usize, w: usize| t.contiguous()?.reshape((b * heads, l, w));
    let (q, k, v) = (flat(q, lq, d)?, flat(k, lk, d)?, flat(v, lk, dv)?);
    scaled_dot_product_attention(&q, &k, &v, scale, mask, upcast)?
        .reshape((b, heads, lq, dv))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, lq, heads * dv))
}

/// Whether both products run on the CPU kernels: `operands` share a dtype they run (after an upcast,
/// q and k are f32 and v is not), outside autograd (the kernels have no backward pass).
fn kernels_run(operands: &[&Tensor]) -> bool {
    let dtype = operands[0].dtype();
    operands
        .iter()
        .all(|t| matmul::available(t) && t.dtype() == dtype && !t.track_op())
}

/// [`Fused`] on `[B, H, L, w]` views of the heads → `[B, Lq, H·dv]`, or `None` where it does not run:
/// an additive mask, operands the kernels do not take, or q and k to be upcast.
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<Mask>,
    upcast: bool,
) -> candle_core::Result<Option<Tensor>> {
    let upcast = upcast && q.dtype() != DType::F32;
    if upcast || matches!(mask, Some(Mask::Additive(_))) || !kernels_run(&[q, k, v]) {
        return Ok(None);
    }
    let ((b, h, lq, d), (_, _, lk, dv)) = (q.dims4()?, v.dims4()?);
    crate::flops::add(
        crate::flops::matmul(b * h * lq, d, lk) + crate::flops::matmul(b * h * lq, lk, dv),
    );
    let op = Fused {
        scale: scale as f32,
        causal: matches!(mask, Some(Mask::Causal)),
    };
    q.apply_op3_no_bwd(k, v, &op).map(Some)
}

/// [`Mask::Causal`] as an additive mask `[lq, lk]` (f32): 0 where key `j ≤` query `i`, −∞ past it.
fn causal_scores(
    lq: usize,
    lk: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (lq, lk), device)
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

/// `softmax(q kᵀ · scale) v` per batch and head for `q: [B, H, Lq, d]`, `k: [B, H, Lk, d]`, `v: [B, H,
/// Lk, dv]` of one dtype (bf16 or f32, rows contiguous, any other strides: views of heads side by
/// side) → `[B, Lq, H·dv]`, heads side by side, on the CPU kernels of [`matmul`], the way
/// FlashAttention computes it (Dao et al. 2022): per head, the keys and values packed once in blocks of
/// [`KEY_BLOCK`]; per block of queries (a task, a multiple of [`matmul::row_step`] rows), for each
/// block of keys the scores `S = α · Q Kⱼᵀ` (f32), the online softmax's `Pⱼ = e^(S − m)` with the
/// running row maxima `m` and sums `l` ([`softmax::exp_rows_online`]), `Pⱼ` rounded to the operands'
/// dtype and packed, and `O ← O · e^(m_old − m) + Pⱼ Vⱼ`; at the end `O / l`. Every buffer a task
/// touches stays in a core's L2, whatever the number of keys.
struct Fused {
    scale: f32,
    /// [`Mask::Causal`]: the scores of keys past each query set to −∞, blocks of keys past every
    /// query of a block skipped.
    causal: bool,
}

/// Keys a block of [`Fused`] takes at once: 128 queries' scores over them are 256 KiB of f32, and
/// the block's keys and values packed 64 KiB each at a head width of 40.
const KEY_BLOCK: usize = 512;

/// A block of scores: `(rows, keys, row stride)`.
type Rows = (usize, usize, usize);

/// The online softmax's running maxima, sums and rescaling factors of a block's rows.
type Online<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// A `[B, H, L, d]` operand of [`Fused`] as values: the slice from its offset, its number of heads
/// and the strides of its batches, heads and rows (its last dimension contiguous), or an error
/// naming the operand.
struct Heads<'a, S> {
    values: &'a [S],
    heads: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl<'a, S> Heads<'a, S> {
    fn of(values: &'a [S], l: &Layout, what: &str) -> candle_core::Result<Self> {
        match (l.dims(), l.stride()) {
            ([_, heads, _, _], [batch, head, row, 1]) => Ok(Heads {
                values: &values[l.start_offset()..],
                heads: *heads,
                batch: *batch,
                head: *head,
                row: *row,
            }),
            (dims, _) => {
                bail!("attention: {what} {dims:?} must be [B, H, L, d] with contiguous rows")
            }
        }
    }

    /// The values of head `bh` (of all the batches' heads) from its row `row` on.
    fn at(&self, bh: usize, row: usize) -> &'a [S] {
        &self.values
            [(bh / self.heads) * self.batch + (bh % self.heads) * self.head + row * self.row..]
    }
}

/// One worker's buffers of [`Fused`], reused task after task: a block's scores, the outputs and
/// a block's product `Pⱼ Vⱼ`, and per query the running maximum, sum and rescaling factor. The
/// products' outputs start on a cache line: a tile row stored 16 bytes past one touched two.
#[derive(Default)]
struct Scratch {
    scores: Aligned<f32>,
    probabilities: Aligned<u32>,
    out: Aligned<f32>,
    product: Aligned<f32>,
    max: Vec<f32>,
    sums: Vec<f32>,
    rescale: Vec<f32>,
}

impl Fused {
    /// The attention with `probabilities` taking a block of scores (`(rows, keys, stride)` of f32,
    /// to be scaled by `α`) through the online softmax ([`softmax::exp_rows_online`] on the running
    /// maxima, sums and rescaling factors) to the left operand of `P V` in the operands' dtype.
    fn run<S: Source + Element>(
        &self,
        (q, q_l): (&[S], &Layout),
        (k, k_l): (&[S], &Layout),
        (v, v_l): (&[S], &Layout),
        probabilities: Probabilities,
    ) -> candle_core::Result<(Vec<S>, Shape)> {
        let (q, k, v) = (
            Heads::of(q, q_l, "q")?,
            Heads::of(k, k_l, "k")?,
            Heads::of(v, v_l, "v")?,
        );
        let (b, h, lq, d) = q_l.shape().dims4()?;
        let (bk, hk, lk, dk) = k_l.shape().dims4()?;
        let (bv, hv, lv, dv) = v_l.shape().dims4()?;
        if (bk, hk, dk) != (b, h, d) || (bv, hv, lv) != (b, h, lk) {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit",
                q_l.dims(),
                k_l.dims(),
                v_l.dims()
            );
        }
        if lk == 0 {
            bail!("attention: k {:?} has no keys to attend to", k_l.dims());
        }
        let no_kernel =
            || candle_core::Error::Msg(format!("attention: no kernel for {:?}", S::DTYPE));
        let step = matmul::row_step(S::DTYPE).ok_or_else(no_kernel)?;
        // Blocks of queries: a multiple of the kernel's rows, about 128 of them.
        let rows = 128usize.div_ceil(step) * step;
        // The outputs' rows as the kernels write them: whole panels of 32 columns.
        let ldo = dv.div_ceil(32) * 32;
        let key_blocks = |bh: usize| {
            (0..lk)
                .step_by(KEY_BLOCK)
                .map(|j0| {
                    let len = KEY_BLOCK.min(lk - j0);
                    let kt = PackedRhs::new(k.at(bh, j0), (1, k.row), d, len);
                    let vp = PackedRhs::new(v.at(bh, j0), (v.row, 1), len, dv);
                    Some((len, kt?, vp?))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(no_kernel)
        };
        let packed: Vec<Vec<(usize, PackedRhs, PackedRhs)>> = (0..b * h)
            .into_par_iter()
            .map(key_blocks)
            .collect::<candle_core::Result<_>>()?;
        // `[B, Lq, H, dv]`: query `i` of head `bh` at row `(bh / H) · Lq + i`, columns `(bh % H) · dv ..`.
        // Not zeroed first: the tasks write every row of every head.
        let mut out = uninit::<S>(b * lq * h * dv);
        // SAFETY: `S` is f32 or bf16; every element is written (below) before any is read.
        let shared = unsafe { SharedOut::uninit(&mut out) };
        (0..b * h)
            .into_par_iter()
            .zip(&packed)
            .try_for_each(|(bh, blocks)| {
                (0..lq.div_ceil(rows)).into_par_iter().try_for_each_init(
                    Scratch::default,
                    |w, block| {
                        let (i0, m) = (block * rows, rows.min(lq - block * rows));
                        let qa = PackedLhs::new(q.at(bh, i0), q.row, m, d).ok_or_else(no_kernel)?;
                        let padded = m.div_ceil(step) * step;
                        w.max.clear();
                        w.max.resize(m, f32::NEG_INFINITY);
                        w.sums.clear();
                        w.sums.resize(m, 0.0);
                        w.rescale.resize(m, 0.0);
                        w.out.resize(padded * ldo);
                        w.product.resize(padded * ldo);
                        for (j, (len, kt, vp)) in blocks.iter().enumerate() {
                            let j0 = j * KEY_BLOCK;
                            if self.causal && j0 >= i0 + m {
                                break;
                            }
                            // Rows a line more than whole panels apart: 2 KiB apart (512 keys), the
                            // tile stores' 16 rows fell in two sets of the L1 cache (8 × 4096 × 4096
                            // bf16 attention: 55 → 48 ms).
                            let ldc = len.div_ceil(32) * 32 + 16;
                            w.scores.resize(padded * ldc);
                            qa.multiply_raw(kt, &mut w.scores, ldc);
                            if self.causal {
                                for (r, row) in w.scores.chunks_mut(ldc).take(m).enumerate() {
                                    // Keys j0 + c past query i0 + r.
                                    let first = (i0 + r + 1).saturating_sub(j0).min(*len);
                                    row[first..*len].fill(f32::NEG_INFINITY);
                                }
                            }
                            let state = (&mut w.max[..], &mut w.sums[..], &mut w.rescale[..]);
                            let pa = probabilities(
                                &mut w.scores,
                                &mut w.probabilities,
                                (m, *len, ldc),
                                self.scale,
                                state,
                            )
                            .ok_or_else(no_kernel)?;
                            if j == 0 {
                                pa.multiply_raw(vp, &mut w.out, ldo);
                                continue;
                            }
                            pa.multiply_raw(vp, &mut w.product, ldo);
                            let rows = w.out.chunks_mut(ldo).zip(w.product.chunks(ldo));
                            for ((o, p), &c) in rows.zip(&w.rescale) {
                                for (o, &p) in o[..dv].iter_mut().zip(&p[..dv]) {
                                    *o = *o * c + p;
                                }
                            }
                        }
                        let first = ((bh / h) * lq + i0) * h + bh % h;
                        for (r, (o, &l)) in w.out.chunks_mut(ldo).zip(&w.sums).enumerate() {
                            let o = &mut o[..dv];
                            o.iter_mut().for_each(|v| *v /= l);
                            // SAFETY: this task alone writes its head's columns of its queries' rows;
                            // both slices hold a row's `dv` values.
                            unsafe { S::store(o, shared.range((first + r * h) * dv, dv)) };
                        }
                        Ok::<(), candle_core::Error>(())
                    },
                )
            })?;
        // SAFETY: every element was written (above).
        Ok((unsafe { assume_init(out) }, Shape::from((b, lq, h * dv))))
    }
}

/// How [`Fused`] takes a block of scores to the probabilities it multiplies by the values; `None`
/// where no kernel runs them.
type Probabilities = for<'s, 'o> fn(
    &'s mut [f32],
    &'s mut Aligned<u32>,
    Rows,
    f32,
    Online<'o>,
) -> Option<PackedLhs<'s>>;

/// The online softmax's probabilities, unnormalised (the outputs are divided by the sums), rounded to
/// bf16 and packed; on AMX rounded and packed as they are computed ([`PackedLhs::exp_bf16`]).
fn probabilities_bf16<'s>(
    s: &'s mut [f32],
    slots: &'s mut Aligned<u32>,
    rows: Rows,
    scale: f32,
    (max, sums, rescale): Online,
) -> Option<PackedLhs<'s>> {
    let Some((p, blocks)) = PackedLhs::exp_bf16(s, rows, scale, max, slots) else {
        softmax::exp_rows_online(s, rows, scale, (max, sums, rescale));
        return PackedLhs::rounded_bf16(s, rows);
    };
    let state = max.iter_mut().zip(sums.iter_mut()).zip(rescale.iter_mut());
    for (((max, sum), rescale), block) in state.zip(blocks) {
        softmax::online_step((max, sum, rescale), block);
    }
    Some(p)
}

/// The online softmax's probabilities in f32, unnormalised, in place of the scores (the AVX-512F
/// kernel reads them there).
fn probabilities_f32<'s>(
    s: &'s mut [f32],
    _: &'s mut Aligned<u32>,
    (m, keys, ldc): Rows,
    scale: f32,
    state: Online,
) -> Option<PackedLhs<'s>> {
    softmax::exp_rows_online(s, (m, keys, ldc), scale, state);
    PackedLhs::new(s, ldc, m, keys)
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "attention-cpu"
    }

    fn cpu_fwd(
        &self,
        q_s: &CpuStorage,
        q_l: &Layout,
        k_s: &CpuStorage,
        k_l: &Layout,
        v_s: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (q_s, k_s, v_s) {
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let (out, shape) = self.run((q, q_l), (k, k_l), (v, v_l), probabilities_bf16)?;
                Ok((CpuStorage::BF16(out), shape))
            }
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (out, shape) = self.run((q, q_l), (k, k_l), (v, v_l), probabilities_f32)?;
                Ok((CpuStorage::F32(out), shape))
            }
            _ => bail!(
                "attention: q, k and v must all be bf16 or all f32, not {:?}, {:?} and {:?}",
                q_s.dtype(),
                k_s.dtype(),
                v_s.dtype()
            ),
        }
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
        let got = scaled_dot_product_attention(&q, &k, &v, 0.5, Some(Mask::Additive(&mask)), false)
            .unwrap();
        let want = reference(&q, &k, &v, 0.5, Some(&mask));
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // The first query sees only the first value.
        let first = got.narrow(1, 0, 1).unwrap();
        assert!(max_abs_diff(&first, &v.narrow(1, 0, 1).unwrap()) < 1e-6);
    }

    #[test]
    fn fused_attention_matches_the_formula_and_the_unfused_kernels() {
        // Odd head widths, key counts off every block edge (1,300 keys: three blocks of the online
        // softmax, the last one short), query blocks with a short last one, and strided views (a
        // transposed batch of heads) as the operands. The keys of the later blocks score higher, so
        // the running maxima and the outputs are rescaled.
        for dtype in [DType::BF16, DType::F32] {
            if !matmul::available(&test_input(&[1], 0).to_dtype(dtype).unwrap()) {
                continue;
            }
            for (n, lq, lk, d, dv) in [
                (2, 300, 77, 40, 40),
                (3, 129, 1000, 13, 7),
                (1, 5, 33, 64, 130),
                (2, 70, 1300, 40, 40),
            ] {
                let f = |shape: &[usize], seed| test_input(shape, seed).to_dtype(dtype).unwrap();
                let q = f(&[lq, n, d], 7).transpose(0, 1).unwrap();
                let rising = Tensor::arange(0f32, lk as f32, &Device::Cpu)
                    .unwrap()
                    .affine(2.0 / lk as f64, 0.0)
                    .unwrap()
                    .reshape((1, lk, 1))
                    .unwrap();
                let k = (test_input(&[n, lk, d], 8).broadcast_add(&rising))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let v = f(&[n, lk, dv], 9);
                let scale = 1.0 / (d as f64).sqrt();
                let got = scaled_dot_product_attention(&q, &k, &v, scale, None, false).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[n, lq, dv][..], dtype));
                let got = got.to_dtype(DType::F32).unwrap();
                let unfused = attend(
                    &q.contiguous().unwrap(),
                    &k.t().unwrap(),
                    &v,
                    scale,
                    None,
                    true,
                )
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
                let want = reference(
                    &q.to_dtype(DType::F32).unwrap(),
                    &k.to_dtype(DType::F32).unwrap(),
                    &v.to_dtype(DType::F32).unwrap(),
                    scale,
                    None,
                );
                // bf16: the probabilities and the outputs rounded to 8 bits, in another order
                // than the unfused kernels' (unnormalised, then divided).
                let bound = if dtype == DType::BF16 { 1e-2 } else { 5e-6 };
                for (what, err) in [
                    ("formula", max_abs_diff(&got, &want)),
                    ("unfused", max_abs_diff(&got, &unfused)),
                ] {
                    assert!(
                        err < bound,
                        "{dtype:?} {n}×{lq}×{lk} against the {what}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_causal_mask_cuts_and_skips_blocks_of_keys() {
        // 1,100 queries and keys: three blocks of keys, the later ones cut inside (the block holding
        // each query's own key) or skipped whole (past every query of a block); f16 has no kernel
        // and takes the mask as a tensor.
        let (n, l, d) = (2, 1100, 16);
        let mask = causal_scores(l, l, &Device::Cpu).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let f = |seed| test_input(&[n, l, d], seed).to_dtype(dtype).unwrap();
            let (q, k, v) = (f(4), f(5), f(6));
            let got =
                scaled_dot_product_attention(&q, &k, &v, 0.25, Some(Mask::Causal), false).unwrap();
            let want = reference(&f32(&q), &f32(&k), &f32(&v), 0.25, Some(&mask));
            let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let err = max_abs_diff(&f32(&got), &want);
            assert!(err < bound, "{dtype:?}: {err}");
            // The first query sees only the first value.
            let first = f32(&got.narrow(1, 0, 1).unwrap());
            assert!(max_abs_diff(&first, &f32(&v.narrow(1, 0, 1).unwrap())) < bound);
        }
    }

    #[test]
    fn heads_side_by_side_get_each_heads_attention_in_their_columns() {
        // Two batches of three heads, 40 wide for q and k and 24 for v; 70 queries over 130 keys
        // (a short second block of queries), with and without the causal mask, in f32 and bf16
        // (the fused kernel where the CPU runs it, split heads elsewhere).
        let (b, h, lq, lk, d, dv) = (2, 3, 70, 130, 40, 24);
        let causal: Vec<f32> = (0..lq * lk)
            .map(|i| match i % lk > i / lk {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
            .collect();
        let causal = Tensor::from_vec(causal, (lq, lk), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let input = |dims: &[usize], seed| test_input(dims, seed).to_dtype(dtype).unwrap();
            let (q, k, v) = (
                input(&[b, lq, h * d], 11),
                input(&[b, lk, h * d], 12),
                input(&[b, lk, h * dv], 13),
            );
            for (mask, reference_mask) in [(None, None), (Some(Mask::Causal), Some(&causal))] {
                let got = multi_head_attention(&q, &k, &v, h, 0.2, mask, false).unwrap();
                assert_eq!(got.dims(), &[b, lq, h * dv]);
                let got = got.to_dtype(DType::F32).unwrap();
                let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                for (bi, hi) in (0..b).flat_map(|bi| (0..h).map(move |hi| (bi, hi))) {
                    let head = |t: &Tensor, w: usize| {
                        let t = t.get(bi).unwrap().narrow(1, hi * w, w).unwrap();
                        t.to_dtype(DType::F32).unwrap().contiguous().unwrap()
                    };
                    let want = reference(
                        &head(&q, d),
                        &head(&k, d),
                        &head(&v, dv),
                        0.2,
                        reference_mask,
                    );
                    let err = max_abs_diff(&head(&got, dv), &want);
                    assert!(
                        err < bound,
                        "{dtype:?} {mask:?} batch {bi} head {hi}: {err}"
                    );
                }
            }
        }
        let x = test_input(&[1, 4, 120], 14);
        let err = multi_head_attention(&x, &x, &x, 7, 1.0, None, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("7 heads do not split q [1, 4, 120]"),
            "{err}"
        );
    }

    #[test]
    fn fused_attention_refuses_bad_operands_by_name() {
        let q = test_input(&[1, 1, 4, 8], 1);
        let op = Fused {
            scale: 1.0,
            causal: false,
        };
        for (k, want) in [
            (test_input(&[1, 1, 0, 8], 2), "no keys"),
            (
                test_input(&[1, 1, 4, 8], 2).to_dtype(DType::BF16).unwrap(),
                "all be bf16 or all f32",
            ),
            (
                test_input(&[1, 4, 8], 2),
                "k [1, 4, 8] must be [B, H, L, d]",
            ),
            (test_input(&[1, 2, 4, 8], 2), "do not fit"),
        ] {
            let err = q.apply_op3_no_bwd(&k, &k, &op).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }
}
