//! Unfold (im2col) and its adjoint fold (col2im), PyTorch's `F.unfold`/`F.fold`, as candle custom ops
//! with a backward pass: the training path's convolutions are one matrix product over these patches.

use crate::kernels::contiguous_f32;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The patch geometry of a square `k×k` kernel with stride `s` and zero padding `p` over an `h×w` image.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    k: usize,
    s: usize,
    p: usize,
    h: usize,
    w: usize,
}

impl Geometry {
    /// Output size `(⌊(h + 2p − k)/s⌋ + 1, ⌊(w + 2p − k)/s⌋ + 1)`.
    fn out(&self) -> (usize, usize) {
        let Geometry { k, s, p, h, w } = *self;
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// Calls `f(tap, l, pixel, len)` for every run of patch entries that read inside the image (padding
    /// reads are zeros and skipped): tap `t = u·k + v`, output positions `l .. l + len` of that tap
    /// (`l = i·wo + j`) read pixels `pixel, pixel + s, …` (`pixel = y·w + x`, `y = s·i + u − p`,
    /// `x = s·j + v − p`).
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (ho, wo) = self.out();
        let Geometry { k, s, p, h, w } = *self;
        for u in 0..k {
            for v in 0..k {
                // Valid j: 0 ≤ s·j + v − p < w.
                let j0 = p.saturating_sub(v).div_ceil(s);
                let j1 = ((w + p).saturating_sub(v)).div_ceil(s).min(wo);
                if j0 >= j1 {
                    continue;
                }
                for i in 0..ho {
                    let y = (s * i + u).wrapping_sub(p);
                    if y < h {
                        f(u * k + v, i * wo + j0, y * w + s * j0 + v - p, j1 - j0);
                    }
                }
            }
        }
    }
}

/// `[B, C, H, W]` → `[C·k·k, B·L]`, `cols[(c·k + u)·k + v, b·L + i·wo + j] = x̃[b, c, s·i + u, s·j + v]`
/// (`L = ho·wo`): the right operand of `W[O, C·k·k] · cols`.
struct Unfold(Geometry);

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "unfold: the input")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let g = self.0;
        let (ho, wo) = g.out();
        let (kk, l) = (g.k * g.k, ho * wo);
        let mut out = vec![0f32; c * kk * b * l];
        out.par_chunks_mut(kk * b * l)
            .enumerate()
            .for_each(|(ci, rows)| {
                for bi in 0..b {
                    let plane = &x[(bi * c + ci) * h * w..][..h * w];
                    g.for_each_run(|tap, li, xi, len| {
                        let dst = &mut rows[tap * b * l + bi * l + li..][..len];
                        for (t, d) in dst.iter_mut().enumerate() {
                            *d = plane[xi + t * g.s];
                        }
                    });
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((c * kk, b * l))))
    }

    /// The adjoint: patch gradients summed back onto the pixels they were read from (fold).
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let batch = arg.dim(0)?;
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&Fold { g: self.0, batch })?,
        ))
    }
}

/// `[C·k·k, B·L]` → `[B, C, H, W]`, `x[b, c, y, x] = Σ` of the patch entries that read pixel `(y, x)`.
struct Fold {
    g: Geometry,
    batch: usize,
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, "fold: the input")?;
        let (ckk, _) = layout.shape().dims2()?;
        let (g, b) = (self.g, self.batch);
        let (ho, wo) = g.out();
        let (kk, l) = (g.k * g.k, ho * wo);
        let c = ckk / kk;
        let mut out = vec![0f32; b * c * g.h * g.w];
        out.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane_index, plane)| {
                let (bi, ci) = (plane_index / c, plane_index % c);
                let rows = &cols[ci * kk * b * l..][..kk * b * l];
                g.for_each_run(|tap, li, xi, len| {
                    let src = &rows[tap * b * l + bi * l + li..][..len];
                    for (t, v) in src.iter().enumerate() {
                        plane[xi + t * g.s] += v;
                    }
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.h, g.w))))
    }
}

/// The patches of `x: [B, C, H, W]` (f32, CPU) for a `k×k` kernel, stride `s`, zero padding `p`, as
/// `[C·k·k, B·ho·wo]` (PyTorch's `F.unfold` order, batches side by side), differentiable.
pub fn unfold(x: &Tensor, k: usize, s: usize, p: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h + 2 * p < k || w + 2 * p < k || s == 0 {
        bail!("unfold: input {h}×{w} with padding {p} is smaller than the {k}×{k} kernel (stride {s})");
    }
    x.contiguous()?
        .apply_op1(Unfold(Geometry { k, s, p, h, w }))
}
