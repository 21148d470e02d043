//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), a CPU kernel for inference in f32.
//!
//! Each 4×4 block of output pixels of each output channel is
//! `Y = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A`, with `d_c` the 6×6 input patch of channel `c` around the
//! block and `g_{o,c}` the 3×3 kernel: 36 multiplications per block and channel pair where the direct
//! convolution needs 144, so the matrix products that dominate do 4× fewer operations. The sum over
//! channels is, for each of the 36 positions `ξ` of the transformed tile, one matrix product
//! `M_ξ = U_ξ · V_ξ` with `U_ξ = (G g Gᵀ)_ξ : [O, C]` and `V_ξ = (Bᵀ d B)_ξ : [C, tiles]`.
//!
//! The tiles are taken in chunks that each thread transforms, multiplies and transforms back on its
//! own, so `V` and `M` stay in cache and no im2col matrix is ever materialised. The transforms use the
//! interpolation points 0, ±1, ±2 (Lavin & Gray's matrices below); in f32 the result is within a few
//! 10⁻⁶ of the direct convolution's, relative to the output's magnitude.

use crate::kernels::matmul::PackedLhs;
use crate::kernels::{assume_init, contiguous_f32, uninit, vectorised, SharedOut};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Output pixels a tile side.
const M: usize = 4;
/// Input pixels a tile side, `M + 3 − 1`.
const A: usize = M + 2;
/// Positions of a transformed tile.
const XI: usize = A * A;

const BT: [[f32; A]; A] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const G: [[f32; 3]; A] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const AT: [[f32; A]; M] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// Elements of `V` a chunk holds at most (36 × channels × tiles): 4 MiB of f32.
const CHUNK_ELEMENTS: usize = 1 << 20;
/// Tiles a thread takes as one chunk whatever their size: 128, a 64×64 image's share of two threads.
const SHARED_TILES: usize = 128;

/// Tiles (or channels) a transform takes at once, one in each lane of an AVX-512 register.
const LANES: usize = 16;

/// One value of each of [`LANES`] tiles.
type Lanes = [f32; LANES];

/// `P · X · Qᵀ` for small matrices given by rows, `P: [R, K]`, `X: [K, K2]`, `Q: [S, K2]` → `[R, S]`,
/// in each lane: the transforms of [`LANES`] tiles at once, as vector operations.
#[inline(always)]
fn sandwich<const R: usize, const K: usize, const K2: usize, const S: usize>(
    p: &[[f32; K]; R],
    x: &[[Lanes; K2]; K],
    q: &[[f32; K2]; S],
) -> [[Lanes; S]; R] {
    let mut px = [[[0f32; LANES]; K2]; R];
    for (pxi, pi) in px.iter_mut().zip(p) {
        for (xk, &pik) in x.iter().zip(pi) {
            for (acc, xkj) in pxi.iter_mut().zip(xk) {
                acc.iter_mut().zip(xkj).for_each(|(a, &v)| *a += pik * v);
            }
        }
    }
    let mut out = [[[0f32; LANES]; S]; R];
    for (oi, pxi) in out.iter_mut().zip(&px) {
        for (acc, qj) in oi.iter_mut().zip(q) {
            for (pxik, &qjk) in pxi.iter().zip(qj) {
                acc.iter_mut().zip(pxik).for_each(|(a, &v)| *a += v * qjk);
            }
        }
    }
    out
}

/// `U = G g Gᵀ` for every output and input channel: `[36, O, C]` from `g: [O, C, 3, 3]`, the input
/// channels [`LANES`] at a time.
fn transform_weights(g: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; XI * o * c];
    // Each output channel's `[36, C]` values, written to its rows of the 36 planes.
    let rows = SharedOut::new(&mut u);
    (0..o).into_par_iter().for_each(|oi| {
        vectorised(
            #[inline(always)]
            || {
                for c0 in (0..c).step_by(LANES) {
                    let lanes = LANES.min(c - c0);
                    let mut kernel = [[[0f32; LANES]; 3]; 3];
                    for (l, k) in g[9 * (oi * c + c0)..][..9 * lanes]
                        .chunks_exact(9)
                        .enumerate()
                    {
                        for (i, row) in kernel.iter_mut().enumerate() {
                            for (j, v) in row.iter_mut().enumerate() {
                                v[l] = k[3 * i + j];
                            }
                        }
                    }
                    let t = sandwich(&G, &kernel, &G);
                    // SAFETY: output channel `oi` writes only its own rows of `u` (see `SharedOut`).
                    let u = unsafe { rows.all() };
                    for (xi, v) in t.iter().flatten().enumerate() {
                        u[(xi * o + oi) * c + c0..][..lanes].copy_from_slice(&v[..lanes]);
                    }
                }
            },
        )
    });
    u
}

/// `V_ξ[c, t] = (Bᵀ d B)_ξ` for the tiles `first..first + n` of one image `x: [C, H, W]`, into
/// `v: [36, C, n]`. Tile `t` covers output rows `4·(t / tw)..+4`, columns `4·(t % tw)..+4`; its 6×6
/// input patch starts one pixel up and left (the padding), zeros outside the image. [`LANES`] tiles
/// at a time.
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
    vectorised(
        #[inline(always)]
        || {
            for ch in 0..c {
                let plane = &x[ch * h * w..(ch + 1) * h * w];
                for i0 in (0..n).step_by(LANES) {
                    let lanes = LANES.min(n - i0);
                    let mut d = [[[0f32; LANES]; A]; A];
                    for l in 0..lanes {
                        let t = first + i0 + l;
                        let (y0, x0) = ((M * (t / tw)) as isize - 1, (M * (t % tw)) as isize - 1);
                        for (r, row) in d.iter_mut().enumerate() {
                            let y = y0 + r as isize;
                            if y < 0 || y >= h as isize {
                                continue;
                            }
                            let line = &plane[y as usize * w..(y as usize + 1) * w];
                            for (q, val) in row.iter_mut().enumerate() {
                                let xx = x0 + q as isize;
                                if xx >= 0 && xx < w as isize {
                                    val[l] = line[xx as usize];
                                }
                            }
                        }
                    }
                    let e = sandwich(&BT, &d, &BT);
                    for (xi, val) in e.iter().flatten().enumerate() {
                        v[(xi * c + ch) * n + i0..][..lanes].copy_from_slice(&val[..lanes]);
                    }
                }
            }
        },
    )
}

/// `y[o, 4ty+i, 4tx+j] = (Aᵀ M A)[i, j] + bias[o]` for the tiles `first..first + n`, from
/// `m: [36, O, n]`, cropped at the image's edge; [`LANES`] tiles at a time.
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
    vectorised(
        #[inline(always)]
        || {
            for oc in 0..o {
                for i0 in (0..n).step_by(LANES) {
                    let lanes = LANES.min(n - i0);
                    let mut mm = [[[0f32; LANES]; A]; A];
                    for (xi, val) in mm.iter_mut().flatten().enumerate() {
                        val[..lanes].copy_from_slice(&m[(xi * o + oc) * n + i0..][..lanes]);
                    }
                    let out = sandwich(&AT, &mm, &AT);
                    for l in 0..lanes {
                        let t = first + i0 + l;
                        let (oy, ox) = (M * (t / tw), M * (t % tw));
                        for (r, row) in out.iter().enumerate().take(h.saturating_sub(oy)) {
                            for (q, val) in row.iter().enumerate().take(w.saturating_sub(ox)) {
                                y[(oc * h + oy + r) * w + ox + q] = val[l] + bias[oc];
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `dst[O, n] = a[O, C] · b[C, n]`, row-major, on the calling thread, by `gemm` (CPUs without
/// AVX-512F).
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

/// A 3×3 convolution's weights transformed once for every call, `U = G g Gᵀ` (`[36, O, C]`), and its
/// bias. At 32×32 a call spent as long transforming a `[640, 640, 3, 3]` weight as multiplying: 4× the
/// weight's values, each from a 3×3 kernel.
pub struct WinogradWeights {
    u: Vec<f32>,
    bias: Vec<f32>,
    o: usize,
    c: usize,
}

impl std::fmt::Debug for WinogradWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WinogradWeights({} → {})", self.c, self.o)
    }
}

impl WinogradWeights {
    /// `weight: [O, C, 3, 3]` and `bias: [O]` (any float dtype, on the CPU) transformed in f32, or an
    /// error naming the shape that does not fit.
    pub fn new(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let (o, c, kh, kw) = weight.dims4()?;
        if kh != 3 || kw != 3 || bias.dims() != [o] {
            bail!(
                "winograd conv: weight {:?} and bias {:?} must be [O, C, 3, 3] and [O]",
                weight.dims(),
                bias.dims()
            );
        }
        let g = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            u: transform_weights(&g, o, c),
            bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            o,
            c,
        })
    }

    /// `y = conv3x3(x) + bias` (stride 1, padding 1) for `x: [B, C, H, W]` f32 on the CPU →
    /// `[B, O, H, W]`, by Winograd's F(4×4, 3×3).
    pub fn conv(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Winograd(self))
    }
}

struct Winograd<'a>(&'a WinogradWeights);

impl CustomOp1 for Winograd<'_> {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let WinogradWeights { u, bias, o, c } = self.0;
        let (o, c) = (*o, *c);
        let x = contiguous_f32(xs, xl, "winograd conv: the input")?;
        let (b, xc, h, w) = xl.shape().dims4()?;
        if xc != c {
            bail!(
                "winograd conv: input {:?} for a weight of {c} input channels",
                xl.shape()
            );
        }
        // The AVX-512F product reads the 36 `U_ξ` where they lie.
        let packed: Option<Vec<PackedLhs>> = (0..XI)
            .map(|xi| PackedLhs::new(&u[xi * o * c..(xi + 1) * o * c], c, o, c))
            .collect();
        let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
        let tiles = th * tw;
        let threads = rayon::current_num_threads().max(1);
        // A thread's share of few tiles in one chunk: each chunk reads all of `U` (36 · O · C values)
        // for its tiles, and at 32×32 with 1,280 channels cache-sized chunks of 22 tiles each
        // streamed 118 MB of `U` for 3 MFLOP a chunk (1280 → 640: 59 → 31 ms).
        let share = tiles.div_ceil(threads);
        let chunk = match share <= SHARED_TILES {
            true => share,
            false => (CHUNK_ELEMENTS / (XI * c)).clamp(16, share),
        };
        // Not zeroed first: the tiles cover every pixel of every output channel.
        let mut y = uninit::<f32>(b * o * h * w);
        for (img, out) in y.chunks_mut(o * h * w).enumerate() {
            let x = &x[img * c * h * w..(img + 1) * c * h * w];
            // Each chunk writes its own 4×4 blocks: disjoint pixels of `out`.
            // SAFETY: every pixel is written (the tiles cover the image) before any is read.
            let out = unsafe { SharedOut::uninit(out) };
            (0..tiles.div_ceil(chunk)).into_par_iter().for_each(|k| {
                let first = k * chunk;
                let n = chunk.min(tiles - first);
                let mut v = vec![0f32; XI * c * n];
                let mut m = vec![0f32; XI * o * n];
                transform_input(x, c, h, w, tw, first, n, &mut v);
                for xi in 0..XI {
                    let (m, v) = (
                        &mut m[xi * o * n..(xi + 1) * o * n],
                        &v[xi * c * n..(xi + 1) * c * n],
                    );
                    match &packed {
                        Some(p) => p[xi].multiply(v, n, m),
                        None => matmul(m, &u[xi * o * c..(xi + 1) * o * c], v, o, c, n),
                    }
                }
                // SAFETY: see `SharedOut`.
                let out = unsafe { out.all() };
                transform_output(&m, bias, o, h, w, tw, first, n, out);
            });
        }
        // SAFETY: every element was written (above).
        Ok((
            CpuStorage::F32(unsafe { assume_init(y) }),
            Shape::from((b, o, h, w)),
        ))
    }
}

/// `y = conv3x3(x, weight, stride 1, padding 1) + bias` for `x: [B, C, H, W]` f32 on the CPU, `weight:
/// [O, C, 3, 3]`, `bias: [O]` → `[B, O, H, W]`, by Winograd's F(4×4, 3×3), the weights transformed
/// for this call alone ([`WinogradWeights`] keeps them).
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    WinogradWeights::new(weight, bias)?.conv(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs, max_abs_diff, test_input};

    #[test]
    fn matches_candle_conv_at_awkward_sizes() {
        // Sizes that are not multiples of 4 (cropped edge tiles), one channel, a batch of two, a 1-pixel
        // image, and the UNet's 320 channels.
        for (b, c, o, h, w) in [
            (2, 5, 7, 9, 13),
            (1, 1, 3, 4, 4),
            (1, 33, 17, 31, 2),
            (1, 2, 2, 1, 1),
            (1, 320, 24, 19, 21),
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
            let (scale, err) = (max_abs(&want), max_abs_diff(&got, &want));
            // Relative to the output's magnitude: f32 rounding of sums over 9·C terms, amplified by the
            // transforms' coefficients (up to 8).
            assert!(err / scale < 3e-5, "{b}×{c}→{o} {h}×{w}: {err} of {scale}");
        }
    }

    #[test]
    fn a_bad_weight_or_input_is_refused_by_name() {
        let (g, bias) = (test_input(&[4, 3, 3, 3], 1), test_input(&[4], 2));
        let err = WinogradWeights::new(&test_input(&[4, 3, 5, 5], 1), &bias).unwrap_err();
        assert!(err.to_string().contains("[O, C, 3, 3]"), "{err}");
        let weights = WinogradWeights::new(&g, &bias).unwrap();
        let err = weights.conv(&test_input(&[1, 5, 8, 8], 3)).unwrap_err();
        assert!(err.to_string().contains("3 input channels"), "{err}");
    }
}
