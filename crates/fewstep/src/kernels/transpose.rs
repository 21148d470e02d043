//! The last two dimensions of a tensor swapped, on all threads, a cache-sized block at a time: an
//! image's `[B, C, H·W]` to the tokens `[B, H·W, C]` a transformer takes, and back. candle copies a
//! transposed view one element at a time on one thread (the transformers' two transposes were more
//! than a quarter of the time a bf16 UNet step spent on one thread while the others waited).

use crate::kernels::{assume_init, uninit};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows and columns of a block: 64 × 64 f32 values are 16 KiB read and 16 KiB written, in L1.
const BLOCK: usize = 64;

/// `y[.., j, i] = x[.., i, j]` for `x: [.., R, C]` (at least two dimensions) → contiguous `[.., C, R]`;
/// on the CPU by [`Transpose`] outside autograd (it has no backward pass), elsewhere by candle.
pub fn transpose_last2(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.rank() < 2 {
        bail!("transpose: {:?} has no last two dimensions", x.dims());
    }
    match x.device().is_cpu() && !x.track_op() {
        true => x.contiguous()?.apply_op1_no_bwd(&Transpose),
        false => x.transpose(D::Minus2, D::Minus1)?.contiguous(),
    }
}

/// [`transpose_last2`] on the CPU: tasks of [`BLOCK`] output rows, each copying `BLOCK × BLOCK`
/// blocks (read along the input's rows, written along the output's).
struct Transpose;

impl Transpose {
    fn run<T: Copy + Send + Sync>(x: &[T], (r, c): (usize, usize)) -> Vec<T> {
        // Not zeroed first: the tasks write every element.
        let mut y = uninit::<T>(x.len());
        if r > 0 && c > 0 {
            y.par_chunks_mut(r * c)
                .zip(x.par_chunks(r * c))
                .for_each(|(y, x)| {
                    y.par_chunks_mut(BLOCK * r)
                        .enumerate()
                        .for_each(|(block, out)| {
                            let (j0, rows) = (block * BLOCK, out.len() / r);
                            for i0 in (0..r).step_by(BLOCK) {
                                for j in 0..rows {
                                    let out = &mut out[j * r + i0..][..BLOCK.min(r - i0)];
                                    for (i, o) in out.iter_mut().enumerate() {
                                        o.write(x[(i0 + i) * c + j0 + j]);
                                    }
                                }
                            }
                        })
                });
        }
        // SAFETY: every element was written (above).
        unsafe { assume_init(y) }
    }
}

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("transpose: the input must be contiguous")
        };
        let dims = l.dims();
        let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut out = dims.to_vec();
        out.swap(dims.len() - 2, dims.len() - 1);
        let rc = (r, c);
        let storage = match s {
            CpuStorage::BF16(v) => CpuStorage::BF16(Self::run(&v[start..end], rc)),
            CpuStorage::F16(v) => CpuStorage::F16(Self::run(&v[start..end], rc)),
            CpuStorage::F32(v) => CpuStorage::F32(Self::run(&v[start..end], rc)),
            CpuStorage::F64(v) => CpuStorage::F64(Self::run(&v[start..end], rc)),
            CpuStorage::U32(v) => CpuStorage::U32(Self::run(&v[start..end], rc)),
            s => bail!("transpose: no kernel for {:?}", s.dtype()),
        };
        Ok((storage, Shape::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_input;
    use candle_core::DType;

    #[test]
    fn transposes_match_candles_at_awkward_sizes() {
        // Blocks cut at both edges, a single row or column, batches, bf16 and f32.
        for dims in [
            vec![1, 320, 4096],
            vec![2, 3, 130, 67],
            vec![65, 1],
            vec![1, 64],
            vec![3, 0, 5],
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let x = test_input(&dims, 3).to_dtype(dtype).unwrap();
                let got = transpose_last2(&x).unwrap();
                let want = x
                    .transpose(D::Minus2, D::Minus1)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                let values = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>().unwrap()
                };
                assert_eq!(values(&got), values(&want), "{dims:?} {dtype:?}");
            }
        }
        // A transposed view is taken as its values.
        let x = test_input(&[5, 7], 4);
        let view = x.t().unwrap();
        let got = transpose_last2(&view).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        let err = transpose_last2(&test_input(&[4], 1)).unwrap_err();
        assert!(err.to_string().contains("no last two dimensions"), "{err}");
    }
}
