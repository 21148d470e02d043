//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), a CPU kernel for inference in f32.
//!
//! Each 2×2 block of output pixels of each output channel is
//! `Y = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A`, with `d_c` the 4×4 input patch of channel `c` around the
//! block and `g_{o,c}` the 3×3 kernel: 16 multiplications per block and channel pair where the direct
//! convolution needs 36, so the matrix products that dominate do 2.25× fewer operations. The sum over
//! channels is, for each of the 16 positions `ξ` of the transformed tile, one matrix product
//! `M_ξ = U_ξ · V_ξ` with `U_ξ = (G g Gᵀ)_ξ : [O, C]` and `V_ξ = (Bᵀ d B)_ξ : [C, tiles]`.
//!
//! The tiles are taken in chunks that each thread transforms, multiplies and transforms back on its
//! own, so `V` and `M` stay in cache and no im2col matrix is ever materialised.
//!
//! With `Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]]`, `G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]]`,
//! `Aᵀ = [[1,1,1,0],[0,1,−1,−1]]`.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements of `V` a chunk holds at most (16 × channels × tiles): 4 MiB of f32.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// `U = G g Gᵀ` for every output and input channel: `[16, O, C]` from `g: [O, C, 3, 3]`.
fn transform_weights(g: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    for oc in 0..o * c {
        let k = &g[9 * oc..9 * oc + 9];
        // t = G g: 4×3.
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (a, b, cc) = (k[j], k[3 + j], k[6 + j]);
            t[0][j] = a;
            t[1][j] = 0.5 * (a + b + cc);
            t[2][j] = 0.5 * (a - b + cc);
            t[3][j] = cc;
        }
        // U = t Gᵀ: 4×4.
        for (i, row) in t.iter().enumerate() {
            let (a, b, cc) = (row[0], row[1], row[2]);
            let v = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
            for (j, x) in v.into_iter().enumerate() {
                u[(4 * i + j) * o * c + oc] = x;
            }
        }
    }
    u
}

/// `V_ξ[c, t] = (Bᵀ d B)_ξ` for the tiles `first..first + n` of one image `x: [C, H, W]`, into
/// `v: [16, C, n]`. Tile `t` covers output rows `2·(t / tw)..+2`, columns `2·(t % tw)..+2`; its input
/// patch starts one pixel up and left (the padding), zeros outside the image.
#[allow(clippy::too_many_arguments)]
fn transform_input(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    tw: usize,
    first: usize,
    n: usize,
    v: &mut [f32],
) {
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for i in 0..n {
            let t = first + i;
            let (y0, x0) = (2 * (t / tw) as isize - 1, 2 * (t % tw) as isize - 1);
            let mut d = [[0f32; 4]; 4];
            for (r, row) in d.iter_mut().enumerate() {
                let y = y0 + r as isize;
                if y < 0 || y >= h as isize {
                    continue;
                }
                let line = &plane[y as usize * w..(y as usize + 1) * w];
                for (q, val) in row.iter_mut().enumerate() {
                    let xx = x0 + q as isize;
                    if xx >= 0 && xx < w as isize {
                        *val = line[xx as usize];
                    }
                }
            }
            // s = Bᵀ d (rows), then s B (columns).
            let mut s = [[0f32; 4]; 4];
            for q in 0..4 {
                s[0][q] = d[0][q] - d[2][q];
                s[1][q] = d[1][q] + d[2][q];
                s[2][q] = d[2][q] - d[1][q];
                s[3][q] = d[1][q] - d[3][q];
            }
            for (r, row) in s.iter().enumerate() {
                let e = [
                    row[0] - row[2],
                    row[1] + row[2],
                    row[2] - row[1],
                    row[1] - row[3],
                ];
                for (q, val) in e.into_iter().enumerate() {
                    v[((4 * r + q) * c + ch) * n + i] = val;
                }
            }
        }
    }
}

/// `y[o, 2ty+i, 2tx+j] = (Aᵀ M A)[i, j] + bias[o]` for the tiles `first..first + n`, from
/// `m: [16, O, n]`, cropped at the image's edge.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    bias: &[f32],
    o: usize,
    h: usize,
    w: usize,
    tw: usize,
    first: usize,
    n: usize,
    y: &mut [f32],
) {
    for oc in 0..o {
        for i in 0..n {
            let at = |xi: usize| m[(xi * o + oc) * n + i];
            // s = Aᵀ M: 2×4.
            let s: [[f32; 4]; 2] = [
                std::array::from_fn(|q| at(q) + at(4 + q) + at(8 + q)),
                std::array::from_fn(|q| at(4 + q) - at(8 + q) - at(12 + q)),
            ];
            let t = first + i;
            let (oy, ox) = (2 * (t / tw), 2 * (t % tw));
            for (r, row) in s.iter().enumerate() {
                if oy + r >= h {
                    break;
                }
                let out = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
                for (q, val) in out.into_iter().enumerate() {
                    if ox + q < w {
                        y[(oc * h + oy + r) * w + ox + q] = val + bias[oc];
                    }
                }
            }
        }
    }
}

/// `dst[O, n] = a[O, C] · b[C, n]`, row-major, on the calling thread.
fn matmul(dst: &mut [f32], a: &[f32], b: &[f32], o: usize, c: usize, n: usize) {
    // SAFETY: the three slices hold O·n, O·C and C·n elements, row-major with the strides given.
    unsafe {
        gemm::gemm(
            o,
            n,
            c,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            c as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

struct Winograd;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("winograd conv: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("winograd conv: {what} must be contiguous"),
    }
}

impl CustomOp3 for Winograd {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g, bias) = (
            contiguous(xs, xl, "input")?,
            contiguous(gs, gl, "weight")?,
            contiguous(bs, bl, "bias")?,
        );
        let (b, c, h, w) = xl.shape().dims4()?;
        let (o, gc, kh, kw) = gl.shape().dims4()?;
        if gc != c || kh != 3 || kw != 3 || bias.len() != o {
            bail!(
                "winograd conv: input {:?}, weight {:?}, bias {}",
                xl.shape(),
                gl.shape(),
                bias.len()
            );
        }
        let u = transform_weights(g, o, c);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        let threads = rayon::current_num_threads().max(1);
        let chunk = (CHUNK_ELEMENTS / (16 * c))
            .max(16)
            .min(tiles.div_ceil(threads));
        let mut y = vec![0f32; b * o * h * w];
        for (img, out) in y.chunks_mut(o * h * w).enumerate() {
            let x = &x[img * c * h * w..(img + 1) * c * h * w];
            // Each chunk writes its own 2×2 blocks: disjoint pixels of `out`.
            let out = SharedOut(out.as_mut_ptr(), out.len());
            (0..tiles.div_ceil(chunk)).into_par_iter().for_each(|k| {
                let first = k * chunk;
                let n = chunk.min(tiles - first);
                let mut v = vec![0f32; 16 * c * n];
                let mut m = vec![0f32; 16 * o * n];
                transform_input(x, c, h, w, tw, first, n, &mut v);
                for xi in 0..16 {
                    matmul(
                        &mut m[xi * o * n..(xi + 1) * o * n],
                        &u[xi * o * c..(xi + 1) * o * c],
                        &v[xi * c * n..(xi + 1) * c * n],
                        o,
                        c,
                        n,
                    );
                }
                // SAFETY: see `SharedOut`.
                let out = unsafe { out.slice() };
                transform_output(&m, bias, o, h, w, tw, first, n, out);
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((b, o, h, w))))
    }
}

/// The output image shared by the threads of one convolution. Each chunk of tiles writes only the
/// pixels of its own 2×2 blocks, so the writes never overlap.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// Callers write disjoint elements only.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

/// `y = conv3x3(x, weight, stride 1, padding 1) + bias` for `x: [B, C, H, W]` f32 on the CPU, `weight:
/// [O, C, 3, 3]`, `bias: [O]` → `[B, O, H, W]`, by Winograd's F(2×2, 3×3).
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &Winograd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_input;

    #[test]
    fn matches_candle_conv_at_awkward_sizes() {
        // Odd sizes (cropped edge tiles), one channel, a batch of two, a 1-pixel image.
        for (b, c, o, h, w) in [
            (2, 5, 7, 9, 13),
            (1, 1, 3, 4, 4),
            (1, 33, 17, 31, 2),
            (1, 2, 2, 1, 1),
        ] {
            let x = test_input(&[b, c, h, w], 1);
            let g = test_input(&[o, c, 3, 3], 2);
            let bias = test_input(&[o], 3);
            let got = conv3x3(&x, &g, &bias).unwrap();
            let want = x
                .conv2d(&g, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let err: f32 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-4, "{b}×{c}→{o} {h}×{w}: {err}");
        }
    }
}
