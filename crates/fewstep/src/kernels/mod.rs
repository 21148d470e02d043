//! CPU kernels as candle custom ops, for the paths where candle's own CPU implementation is the
//! bottleneck. Other devices keep candle's ops; each kernel is tested against the plain candle op.

pub mod add;
mod aligned;
pub mod attention;
pub mod geglu;
pub mod group_norm;
pub mod matmul;
pub mod quick_gelu;
pub mod relu;
pub mod softmax;
pub mod transpose;
pub mod unfold;
pub mod winograd;

use candle_core::{bail, CpuStorage, Layout};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A value type of the kernels' inputs and outputs, computed in f32: f32 as is, bf16 widened
/// exactly and rounded to nearest even when stored.
pub(crate) trait Element: Copy + Send + Sync + Default {
    /// The value in f32.
    fn to_f32(self) -> f32;

    /// `dst[i] = src[i]` in this type.
    ///
    /// # Safety
    /// The slices have one length.
    unsafe fn store(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    unsafe fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    unsafe fn store(src: &[f32], dst: &mut [Self]) {
        narrow_to_bf16(src, dst)
    }
}

/// The values of a contiguous operand of a custom op, or an error naming it (`what`, e.g.
/// "group_norm: the input") and what was expected.
fn contiguous<'a, T>(
    values: Option<&'a [T]>,
    l: &Layout,
    what: &str,
    dtype: &str,
) -> candle_core::Result<&'a [T]> {
    let Some(v) = values else {
        bail!("{what} must be {dtype}")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what} must be contiguous"),
    }
}

/// The values of a contiguous f32 operand (see [`contiguous`]).
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let values = match s {
        CpuStorage::F32(v) => Some(v.as_slice()),
        _ => None,
    };
    contiguous(values, l, what, "f32")
}

/// The values of a contiguous bf16 operand (see [`contiguous`]).
pub(crate) fn contiguous_bf16<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [half::bf16]> {
    let values = match s {
        CpuStorage::BF16(v) => Some(v.as_slice()),
        _ => None,
    };
    contiguous(values, l, what, "bf16")
}

/// An output shared by the threads of a kernel, each writing elements no other thread writes: the
/// tiles of a product, the rows of one head's block of queries, a Winograd tile's pixels.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(*mut T, usize);
// SAFETY: the threads write disjoint elements (each user's contract, `range`).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The elements of `out`, to be shared.
    pub(crate) fn new(out: &mut [T]) -> Self {
        SharedOut(out.as_mut_ptr(), out.len())
    }

    /// The elements of an output not written yet (from [`uninit`]), to be shared by the threads
    /// that write all of them.
    ///
    /// # Safety
    /// `T` has no invalid values and no drop (f32, bf16), and every element is written before any
    /// is read.
    pub(crate) unsafe fn uninit(out: &mut [MaybeUninit<T>]) -> Self {
        SharedOut(out.as_mut_ptr() as *mut T, out.len())
    }

    /// Elements `start .. start + len` (panics past the end).
    ///
    /// # Safety
    /// No other thread reads or writes them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start + len <= self.1,
            "SharedOut: {start} + {len} past {}",
            self.1
        );
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// All the elements.
    ///
    /// # Safety
    /// The threads holding them write disjoint elements and read none another writes.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn all(&self) -> &mut [T] {
        self.range(0, self.1)
    }
}

/// `len` values made on all threads a chunk at a time: chunk `i` (values `i · chunk ..`) is zeroed
/// and handed to `f(i, chunk)` by the task that fills it, so that no thread zeroes the whole output
/// first (outputs zeroed by `vec!` and the packing of `A` zeroed on the calling thread, while the
/// others waited, were a third of the time a bf16 UNet step spent on one thread).
pub(crate) fn par_filled<T: Copy + Default + Send + Sync>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = uninit(len);
    fill_chunks(&mut out, chunk, f);
    // SAFETY: every value was written (`fill_chunks`).
    unsafe { assume_init(out) }
}

/// `len` values not yet written: an output whose tasks write every element, not zeroed first.
pub(crate) fn uninit<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialisation.
    unsafe { out.set_len(len) };
    out
}

/// The values of `out`, every one written.
///
/// # Safety
/// Every element of `out` was written.
pub(crate) unsafe fn assume_init<T>(out: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut out = std::mem::ManuallyDrop::new(out);
    // `MaybeUninit<T>` has `T`'s layout; the caller vouches for the values.
    Vec::from_raw_parts(out.as_mut_ptr() as *mut T, out.len(), out.capacity())
}

/// Every value of `out` written, a chunk a task: zeroed (`T::default()`), then `f(i, chunk)`.
pub(crate) fn fill_chunks<T: Copy + Default + Send + Sync>(
    out: &mut [MaybeUninit<T>],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    out.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, values)| {
            for v in values.iter_mut() {
                v.write(T::default());
            }
            // SAFETY: every value was just written; `MaybeUninit<T>` has `T`'s layout.
            f(i, unsafe {
                &mut *(values as *mut [MaybeUninit<T>] as *mut [T])
            })
        });
}

/// `f` compiled for AVX-512 where the CPU has it, so that its loops over f32 values take sixteen lanes
/// a step; as it is elsewhere. `f` must be an `#[inline(always)]` closure: a closure is a function of
/// its own, compiled for the baseline instruction set unless inlined here (measured: without the
/// attribute the Winograd transforms ran in SSE registers).
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: checked just above.
        return unsafe { avx512(f) };
    }
    f()
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even as `half::bf16::from_f32`: sixteen values at a
/// time by `vcvtneps2bf16` where the CPU has AVX-512 BF16 (which flushes subnormal values to zero),
/// `half`'s conversion elsewhere.
pub(crate) fn narrow_to_bf16(src: &[f32], dst: &mut [half::bf16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: checked just above.
        return unsafe { narrow_avx512(src, dst) };
    }
    for (s, d) in src.iter().zip(dst) {
        *d = half::bf16::from_f32(*s);
    }
}

/// [`narrow_to_bf16`] by AVX-512 BF16.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn narrow_avx512(src: &[f32], dst: &mut [half::bf16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for (s, d) in src[..whole].chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
        _mm256_storeu_si256(
            d.as_mut_ptr() as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
    }
    for (s, d) in src[whole..n].iter().zip(&mut dst[whole..n]) {
        *d = half::bf16::from_f32(*s);
    }
}

/// Uniform values in [-2, 2) from a linear congruential generator, reproducible per seed: the random
/// inputs of the kernels' tests.
#[cfg(test)]
pub(crate) fn test_input(shape: &[usize], seed: u64) -> candle_core::Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape: the error measure of the kernels'
/// tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The largest absolute value of a tensor.
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}
