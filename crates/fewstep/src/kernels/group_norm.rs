//! GroupNorm in one pass over each group (candle's is a chain of broadcasts, each a full-size tensor),
//! with a hand-derived backward pass (whose candle counterpart, strided reductions over the batch and
//! pixel axes, is the slowest CPU path of a training step), and fused with the SiLU that follows it in
//! every ResNet block for inference.

use crate::kernels::softmax::exp;
use crate::kernels::{contiguous_bf16, contiguous_f32, narrow_to_bf16, par_filled, vectorised};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `y = (x − μ_g) / √(σ²_g + ε) · γ_c + β_c` over `[B, C, …]`, with `μ_g`, `σ²_g` the mean and (biased)
/// variance of each group of `C/G` channels of each sample.
/// With `silu`, `y ← y·σ(y)` in the same pass (no backward pass).
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The shape `(B, C, HW)` of a `[B, C, …]` tensor.
fn bchw(shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 3 {
        bail!("group_norm: input rank must be at least 3 (got {d:?})");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// `Σ f(x)` over a slice, in eight f32 lanes (which the compiler vectorises) summed in f64 per block of
/// 4096 values, so long groups lose no precision.
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f64 {
    x.chunks(4096)
        .map(|block| {
            let mut lanes = [0f32; 8];
            let mut it = block.chunks_exact(8);
            for c in &mut it {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l += f(v);
                }
            }
            let tail: f32 = it.remainder().iter().map(|&v| f(v)).sum();
            lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
        })
        .sum()
}

/// Mean and `1/√(σ² + ε)` of one group's values (the variance about the mean, two passes).
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (sum_by(x, |v| v) / n) as f32;
    let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps).sqrt()) as f32)
}

impl GroupNormOp {
    /// `y` of the group `bg` (sample `bg / G`, group `bg % G`), `x` its `C/G` channels of `hw` values.
    fn normalize_group(
        &self,
        x: &[f32],
        y: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        bg: usize,
        hw: usize,
    ) {
        let (mean, rstd) = moments(x, self.eps);
        let c0 = (bg % self.groups) * (x.len() / hw);
        vectorised(
            #[inline(always)]
            || {
                for (ci, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                    let (g, b) = (gamma[c0 + ci] * rstd, beta[c0 + ci]);
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - mean) * g + b;
                    }
                    if self.silu {
                        // σ(y) by the polynomial `exp` (the C library's was a call a value); past e⁸⁰
                        // the quotient is 0 in f32 anyway, and the clamp keeps `exp` inside its range.
                        for y in y.iter_mut() {
                            *y /= 1.0 + exp((-*y).min(80.0));
                        }
                    }
                }
            },
        )
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gamma, beta) = (
            contiguous_f32(ws, wl, "group_norm: the weight")?,
            contiguous_f32(bs, bl, "group_norm: the bias")?,
        );
        let (_, c, hw) = bchw(xl.shape())?;
        let cg = c / self.groups;
        let storage = match xs {
            CpuStorage::BF16(_) => {
                let x = contiguous_bf16(xs, xl, "group_norm: the input")?;
                let y = par_filled(x.len(), cg * hw, |bg, y| {
                    let x: Vec<f32> = x[bg * cg * hw..][..y.len()]
                        .iter()
                        .map(|v| v.to_f32())
                        .collect();
                    let mut out = vec![0f32; x.len()];
                    self.normalize_group(&x, &mut out, gamma, beta, bg, hw);
                    narrow_to_bf16(&out, y);
                });
                CpuStorage::BF16(y)
            }
            _ => {
                let x = contiguous_f32(xs, xl, "group_norm: the input")?;
                let y = par_filled(x.len(), cg * hw, |bg, y| {
                    let x = &x[bg * cg * hw..][..y.len()];
                    self.normalize_group(x, y, gamma, beta, bg, hw)
                });
                CpuStorage::F32(y)
            }
        };
        Ok((storage, xl.shape().clone()))
    }

    /// With `x̂ = (x − μ)·r`, `r = 1/√(σ² + ε)`, and `dx̂ = dy·γ`:
    /// `dβ_c = Σ_{b,p} dy`, `dγ_c = Σ_{b,p} dy·x̂`, `dx = r·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂))`.
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.silu {
            bail!("group_norm_silu: inference only, no backward pass");
        }
        let (_, c, hw) = bchw(x.shape())?;
        let cg = c / self.groups;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let dyv = dy.flatten_all()?.to_vec1::<f32>()?;
        let gv = gamma.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xv.len()];
        // Per (sample, group): dx, and the per-channel partial sums of dy and dy·x̂.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(cg * hw)
            .zip(xv.par_chunks(cg * hw).zip(dyv.par_chunks(cg * hw)))
            .enumerate()
            .map(|(bg, (dx, (x, dy)))| {
                let (mean, rstd) = moments(x, self.eps);
                let c0 = (bg % self.groups) * cg;
                let n = (cg * hw) as f64;
                let (mut s1, mut s2) = (0f64, 0f64);
                let (mut dbeta, mut dgamma) = (vec![0f32; cg], vec![0f32; cg]);
                for ci in 0..cg {
                    let g = gv[c0 + ci];
                    let (mut db, mut dg) = (0f64, 0f64);
                    for p in ci * hw..(ci + 1) * hw {
                        let xh = ((x[p] - mean) * rstd) as f64;
                        let d = dy[p] as f64;
                        db += d;
                        dg += d * xh;
                        s1 += d * g as f64;
                        s2 += d * g as f64 * xh;
                    }
                    dbeta[ci] = db as f32;
                    dgamma[ci] = dg as f32;
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for ci in 0..cg {
                    let g = gv[c0 + ci] as f64;
                    for p in ci * hw..(ci + 1) * hw {
                        let xh = ((x[p] - mean) * rstd) as f64;
                        dx[p] = (rstd as f64 * (dy[p] as f64 * g - m1 - xh * m2)) as f32;
                    }
                }
                (dbeta, dgamma)
            })
            .collect();
        let (mut dbeta, mut dgamma) = (vec![0f32; c], vec![0f32; c]);
        for (bg, (db, dg)) in partial.iter().enumerate() {
            let c0 = (bg % self.groups) * cg;
            for ci in 0..cg {
                dbeta[c0 + ci] += db[ci];
                dgamma[c0 + ci] += dg[ci];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, c, dev)?),
            Some(Tensor::from_vec(dbeta, c, dev)?),
        ))
    }
}

/// Checks the shapes of a GroupNorm's operands.
fn check(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize) -> candle_core::Result<()> {
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 || weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "group_norm: {c} channels, {groups} groups, weight {:?}, bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    Ok(())
}

/// The operands made contiguous and the op, after the shapes are checked.
fn prepare(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor, GroupNormOp)> {
    check(x, weight, bias, groups)?;
    let op = GroupNormOp { groups, eps, silu };
    Ok((
        x.contiguous()?,
        weight.contiguous()?,
        bias.contiguous()?,
        op,
    ))
}

/// GroupNorm of `x: [B, C, …]` (f32 or bf16, CPU; the statistics in f32) with `groups` groups, affine
/// f32 `weight`/`bias: [C]`, differentiable in all three (in f32).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (x, w, b, op) = prepare(x, weight, bias, groups, eps, false)?;
    x.apply_op3(&w, &b, op)
}

/// `silu(group_norm(x))` in one pass (f32 or bf16, CPU, inference: no backward pass).
pub fn group_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (x, w, b, op) = prepare(x, weight, bias, groups, eps, true)?;
    x.apply_op3_no_bwd(&w, &b, &op)
}
