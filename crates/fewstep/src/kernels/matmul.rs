//! The CPU matrix product for bf16 and f32, the way oneDNN multiplies for PyTorch:
//! - bf16, products exact and sums in f32: AMX (`tdpbf16ps`: a 16×16 f32 tile accumulates the
//!   products of a 16×32 bf16 tile of `A` with a 32×16 tile of `B` stored as bf16 pairs), on Intel
//!   Xeons since Sapphire Rapids; else AVX-512 BF16 (`vdpbf16ps`, `_mm512_dpbf16_ps`: each of 16 f32
//!   lanes accumulates `a₂ᵢb₂ᵢ + a₂ᵢ₊₁b₂ᵢ₊₁`), on Cooper Lake and AMD Zen 4 and later;
//! - f32: AVX-512F fused multiply-adds (`vfmadd231ps` with a broadcast `A` value), on any AVX-512 CPU.
//!
//! `C = α · A · B + bias` for `A: [M, K]` and `B: [K, N]`, with `B` read through strides (a
//! weight `Wᵀ` is `W` read by columns) or gathered from an image as the patches of a convolution
//! (implicit im2col: the patch matrix is never materialised, only a block of it at a time).
//! The blocking is BLIS's: `B` packed into panels of [`NR`] columns of 32-bit slots along `K` (a bf16
//! pair or one f32), `A` into rows of slots; a task owns a block of `MC × NC` results, so a panel of
//! `B` stays in cache while the rows of `A` pass over it.
//!
//! [`available`] is the run-time check (bf16 or f32 tensors on the CPU of an x86-64 machine with one
//! of the instruction sets for that dtype; AMX also needs the Linux kernel's permission, asked once);
//! callers keep candle's own ops as the portable path.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::kernels::aligned::Aligned;
use crate::kernels::geglu;
use crate::kernels::{assume_init, uninit, Element, SharedOut};

/// Rows of the AVX-512 register tile: 12 × 2 accumulators, two panel vectors and a broadcast in 32
/// registers.
const MR: usize = 12;
/// Columns of a register tile: two vectors of 16 f32 lanes, or two AMX tiles of 16 columns.
const NR: usize = 32;
/// Slots of `K` an AVX-512 register tile sums before its `B` panel (`KC · NR · 4` bytes, 32 KiB, in
/// a 48 KiB L1 beside the 12 KiB of `A`) is changed: 4096³ bf16 570 GFLOP/s against 538 at 128 on
/// Zen 5, f32 even.
const KC: usize = 256;
/// Rows of an AMX tile.
const AMX_TILE_ROWS: usize = 16;
/// Rows of an AMX step: two tiles.
const AMX_ROWS: usize = 2 * AMX_TILE_ROWS;
/// Pairs of `K` one AMX tile holds: 16 rows of 64 bytes.
const AMX_PAIRS: usize = 16;
/// How far (log₂ of the factor) a block's scores may exceed an online softmax's running maximum
/// before [`PackedLhs::exp_bf16`] takes their own maximum instead.
const LAZY_MAX: f32 = 16.0;
/// Rows of `C` a task's tile holds (a multiple of [`MR`] and of [`AMX_ROWS`]).
const MC: usize = 96;
/// Columns of `C` a task's tile holds (a multiple of [`NR`]).
const NC: usize = 128;

/// The instructions a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// bf16 on AMX tiles.
    Amx,
    /// bf16 on AVX-512 BF16 dot products.
    Avx512Bf16,
    /// f32 on AVX-512F fused multiply-adds.
    Avx512F,
}

impl Isa {
    /// Whether this CPU (and, for AMX, the operating system) runs it.
    fn supported(self) -> bool {
        static AMX: OnceLock<bool> = OnceLock::new();
        match self {
            Isa::Amx => *AMX.get_or_init(amx_enabled),
            Isa::Avx512Bf16 => avx512_bf16(),
            Isa::Avx512F => avx512f(),
        }
    }

    /// The dtype of the operands it multiplies.
    fn dtype(self) -> DType {
        match self {
            Isa::Amx | Isa::Avx512Bf16 => DType::BF16,
            Isa::Avx512F => DType::F32,
        }
    }

    /// The fastest supported one for operands of `dtype`.
    fn best(dtype: DType) -> Option<Isa> {
        [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512F]
            .into_iter()
            .find(|i| i.dtype() == dtype && i.supported())
    }

    /// The rows of `C` one step of its kernel writes: the padding of a packed `A`.
    fn row_step(self) -> usize {
        match self {
            Isa::Amx => AMX_ROWS,
            Isa::Avx512Bf16 | Isa::Avx512F => MR,
        }
    }

    /// 32-bit slots of `K` the packed operands hold: a bf16 pair or one f32 each; AMX reads whole
    /// tiles of [`AMX_PAIRS`] pairs.
    fn slots(self, k: usize) -> usize {
        match self {
            Isa::Amx => k.div_ceil(2 * AMX_PAIRS) * AMX_PAIRS,
            Isa::Avx512Bf16 => k.div_ceil(2),
            Isa::Avx512F => k,
        }
    }
}

/// Whether [`matmul`], [`linear`] and [`conv2d`] run for this tensor: bf16 on the CPU of an x86-64
/// machine that has AMX or AVX-512 BF16, or f32 on one that has AVX-512F.
pub fn available(t: &Tensor) -> bool {
    t.device().is_cpu() && Isa::best(t.dtype()).is_some()
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512f() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16() -> bool {
    avx512f() && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16() -> bool {
    false
}

/// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), with the tile data state granted to
/// this process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_enabled() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    let cpu = edx >> 24 & 1 == 1 && edx >> 22 & 1 == 1;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave state.
    cpu && unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_enabled() -> bool {
    false
}

/// What is added to `α · A · B`: nothing, `bias[n]` to every row, or `bias[m]` to every column.
#[derive(Clone, Debug)]
enum Bias {
    None,
    Columns(Vec<f32>),
    Rows(Vec<f32>),
}

impl Bias {
    /// An optional bias tensor as f32 values, added along `along` ([`Bias::Columns`] or
    /// [`Bias::Rows`]).
    fn of(bias: Option<&Tensor>, along: fn(Vec<f32>) -> Bias) -> candle_core::Result<Bias> {
        Ok(match bias {
            Some(b) => along(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            None => Bias::None,
        })
    }
}

/// Where `B[k][n]` is read.
#[derive(Clone, Copy, Debug)]
enum Rhs {
    /// A matrix (a batch of them) through the tensor's strides.
    Matrix,
    /// The patches of a square `k×k` convolution with stride `s` and zero padding `p` over the
    /// `[C, H, W]` images of a batch: `B[(c, u, v)][(i, j)] = x[c][s·i + u − p][s·j + v − p]`, or
    /// `B[(u, v, c)][(i, j)]` where the channels go in pairs ([`channel_pairs`]).
    Patches { k: usize, s: usize, p: usize },
}

/// An operand's element as packed: [`Source::PER_SLOT`] consecutive values of `K` share one 32-bit
/// slot (a bf16 pair, the first value in the low half, or one f32) — which is how they lie in
/// memory on a little-endian machine.
pub(crate) trait Source: Copy + Send + Sync {
    const PER_SLOT: usize;
    /// The dtype of these values.
    const DTYPE: DType;
    /// The value's bits in the low end of a slot.
    fn bits(self) -> u32;

    /// Slot `p` of consecutive values of `K`: a whole slot read as it lies in memory, a lone last
    /// bf16 paired with zero.
    #[inline(always)]
    fn slot_at(values: &[Self], p: usize) -> u32 {
        const { assert!(std::mem::size_of::<Self>() * Self::PER_SLOT == 4) };
        let i = p * Self::PER_SLOT;
        match i + Self::PER_SLOT <= values.len() {
            // SAFETY: the PER_SLOT values from `i` are in `values` and are 4 bytes (asserted).
            true => unsafe { (values.as_ptr().add(i) as *const u32).read_unaligned() },
            false => values[i].bits(),
        }
    }

    /// The values as slots where a slot is one value (f32), to be read in place.
    fn as_slots(_values: &[Self]) -> Option<&[u32]> {
        None
    }

    /// The slots of consecutive values of `K` ([`Source::slot_at`]).
    fn slots(values: &[Self]) -> impl Iterator<Item = u32> + '_ {
        (0..values.len().div_ceil(Self::PER_SLOT)).map(|p| Self::slot_at(values, p))
    }

    /// `dst[p] =` slot `p` of `values` for the slots `values` fills ([`Source::slots`]): the bytes
    /// copied as they lie where `values` fills `dst` exactly.
    #[inline(always)]
    fn copy_slots(values: &[Self], dst: &mut [u32]) {
        if values.len() == dst.len() * Self::PER_SLOT {
            // SAFETY: both hold `4 · dst.len()` bytes (a slot is PER_SLOT values) and are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr() as *const u8,
                    dst.as_mut_ptr() as *mut u8,
                    4 * dst.len(),
                )
            };
            return;
        }
        for (d, slot) in dst.iter_mut().zip(Self::slots(values)) {
            *d = slot;
        }
    }
}

impl Source for bf16 {
    const PER_SLOT: usize = 2;
    const DTYPE: DType = DType::BF16;
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Source for f32 {
    const PER_SLOT: usize = 1;
    const DTYPE: DType = DType::F32;
    fn bits(self) -> u32 {
        self.to_bits()
    }

    fn as_slots(values: &[f32]) -> Option<&[u32]> {
        // SAFETY: f32 and u32 have one size and alignment, and every bit pattern is a u32.
        Some(unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u32, values.len()) })
    }
}

/// The operands of one product, from the offsets of the two storages.
#[derive(Clone, Copy)]
struct Operands<'a, S> {
    a: &'a [S],
    /// Row stride of `A` (its columns are contiguous).
    a_row: usize,
    b: &'a [S],
    /// `B`'s strides along `k` and `n` (for [`Rhs::Matrix`]).
    b_k: usize,
    b_n: usize,
    m: usize,
    k: usize,
    n: usize,
}

impl<'a, S> Operands<'a, S> {
    /// A left operand alone, `A[i][j] = a[i · a_row + j]`.
    fn lhs(a: &'a [S], a_row: usize, m: usize, k: usize) -> Self {
        Operands {
            a,
            a_row,
            b: a,
            b_k: 0,
            b_n: 0,
            m,
            k,
            n: 0,
        }
    }
}

/// An image seen as the patch matrix of a convolution.
#[derive(Clone, Copy)]
struct PatchGeometry {
    k: usize,
    s: usize,
    p: usize,
    c: usize,
    h: usize,
    w: usize,
    wo: usize,
    /// `K` ordered `(u, v, c)`, the image's channels interleaved in pairs ([`channel_pairs`]).
    pairs: bool,
}

/// Whether a convolution of `c` channels on `isa` orders `K` as `(u, v, c)` (its weight `[O, k, k,
/// C]`) and reads its image as bf16 channel pairs interleaved once per call
/// ([`interleave_channels`]): then a slot of the patches is one 32-bit value of that image and a
/// panel's slot one copy of a run, where the `(c, u, v)` order pairs two taps of one channel, read
/// from two places and interleaved at every slot of every panel (a 320-channel 3×3 convolution
/// packed its patches a quarter of its time).
fn channel_pairs(isa: Isa, c: usize) -> bool {
    isa.dtype() == DType::BF16 && c.is_multiple_of(2)
}

/// An operand of [`Product::run`] packed before the call (a [`PackedWeight`]): its values are not
/// read.
#[derive(Clone, Copy)]
enum Prepacked<'a> {
    No,
    Lhs(&'a [u32]),
    Rhs(&'a [u32]),
}

struct Product {
    isa: Isa,
    alpha: f32,
    bias: Bias,
    out: DType,
    rhs: Rhs,
    /// `C`'s columns come in blocks of [`NC`], each `h` in its first half and the `g` of the same
    /// features in its second ([`PackedWeight::geglu`]): the product writes `h · gelu(g)`, `N / 2`
    /// columns.
    gated: bool,
}

impl Product {
    /// The columns of the output for `N` columns of `C`: half where the product is `gated`.
    fn out_columns(&self, n: usize) -> usize {
        match self.gated {
            true => n / 2,
            false => n,
        }
    }

    /// `C` for `batch` products into `out` (`batch · M · N` elements, row-major), operand `i` of the
    /// batch found at `a_batch · i` and `b_batch · i` elements past the operands' offsets.
    fn run<S: Source, T: Element>(
        &self,
        ops: Operands<S>,
        batch: usize,
        (a_batch, b_batch): (usize, usize),
        patches: Option<PatchGeometry>,
        packed: Prepacked,
    ) -> Vec<T> {
        let Operands { m, n, k, .. } = ops;
        let n_out = self.out_columns(n);
        // Not zeroed first: the tasks' tiles cover every element of every product.
        let mut out = uninit::<T>(batch * m * n_out);
        let kp = self.isa.slots(k);
        let n_blocks = n.div_ceil(NC);
        let m_blocks = m.div_ceil(MC);
        let threads = rayon::current_num_threads().max(1);
        // Enough tasks for the threads to share evenly. A matrix `B` is packed once for all of them;
        // the patches of an image (`k²` times its size) a block at a time, by the task that uses it,
        // where each block has one task.
        let m_chunks = (4 * threads).div_ceil(n_blocks).clamp(1, m_blocks);
        for i in 0..batch {
            let ops = Operands {
                a: &ops.a[a_batch * i..],
                b: &ops.b[b_batch * i..],
                ..ops
            };
            let own_a;
            let packed_a = match (packed, self.isa, S::as_slots(ops.a)) {
                (Prepacked::Lhs(a), ..) => Lhs::Packed(a),
                (_, Isa::Avx512F, Some(a)) => Lhs::Rows {
                    a,
                    row: ops.a_row,
                    m,
                },
                _ => {
                    own_a = pack_a(self.isa, &ops);
                    Lhs::Packed(&own_a)
                }
            };
            let pairs = match patches {
                Some(g) if g.pairs => interleave_channels(ops.b, g),
                _ => Vec::new(),
            };
            let block_b = |nb: usize| {
                let (n0, cols) = (nb * NC, NC.min(n - nb * NC));
                match patches {
                    Some(g) if g.pairs => pack_patch_pairs(&pairs, g, n0, cols, kp),
                    Some(g) => pack_patches(&ops, g, n0, cols, kp),
                    None => pack_b(&ops, n0, cols, kp),
                }
            };
            // Packed once for all tasks unless each block of patches has a task of its own.
            let shared_b: Vec<Aligned<u32>> = match (patches, packed) {
                (_, Prepacked::Rhs(_)) => Vec::new(),
                (Some(_), _) if m_chunks == 1 => Vec::new(),
                _ => (0..n_blocks).into_par_iter().map(block_b).collect(),
            };
            // SAFETY: `T` is f32 or bf16; the tiles write every element before any is read.
            let dst = unsafe { SharedOut::uninit(&mut out[i * m * n_out..(i + 1) * m * n_out]) };
            (0..n_blocks * m_chunks).into_par_iter().for_each(|task| {
                let (nb, chunk) = (task / m_chunks, task % m_chunks);
                let n0 = nb * NC;
                let cols = NC.min(n - n0);
                let own_b;
                let packed_b = match (packed, shared_b.get(nb)) {
                    (Prepacked::Rhs(b), _) => &b[n0 / NR * kp * NR..],
                    (_, Some(b)) => b,
                    (_, None) => {
                        own_b = block_b(nb);
                        &own_b
                    }
                };
                // Chunks of ⌊m_blocks / m_chunks⌋ or one more block, none empty: 14 blocks in 8
                // chunks of 2 left one empty and gave one thread 8 blocks, the other 6.
                let (first, end) = (
                    chunk * m_blocks / m_chunks,
                    (chunk + 1) * m_blocks / m_chunks,
                );
                with_tile(|tile| {
                    for mb in first..end {
                        let m0 = mb * MC;
                        let rows = MC.min(m - m0);
                        let shape = TileShape {
                            m0,
                            rows,
                            cols,
                            kp,
                            ldc: NC,
                        };
                        // SAFETY: `cpu_fwd` checked that the CPU runs `isa`; the operands were
                        // packed for it, with `kp` slots and rows padded to its row blocks.
                        unsafe { multiply_tile(self.isa, packed_a, packed_b, shape, tile) };
                        // SAFETY: the tile (rows m0.., columns n0..) is this task's alone.
                        unsafe { self.write_tile(tile, dst, m0, rows, n0, cols, n_out) };
                    }
                });
            });
        }
        // SAFETY: every element was written (above).
        unsafe { assume_init(out) }
    }

    /// `C[m0 + r][n0 + c] = α · tile[r][c] + bias` for the tile's valid rows and columns (the
    /// tile's values are scaled in place first); where the product is `gated`, the first half of
    /// the columns times the GELU of the second ([`geglu::gate_rows`]) at `C[m0 + r][n0 / 2 + c]`.
    ///
    /// # Safety
    /// `dst` holds `M · n` elements and no other task writes this tile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn write_tile<T: Element>(
        &self,
        tile: &mut [f32],
        dst: SharedOut<T>,
        m0: usize,
        rows: usize,
        n0: usize,
        cols: usize,
        n: usize,
    ) {
        for r in 0..rows {
            let src = &mut tile[r * NC..r * NC + cols];
            match &self.bias {
                Bias::None if self.alpha == 1.0 => {}
                Bias::None => src.iter_mut().for_each(|v| *v *= self.alpha),
                Bias::Columns(b) => {
                    for (v, &b) in src.iter_mut().zip(&b[n0..n0 + cols]) {
                        *v = self.alpha * *v + b;
                    }
                }
                Bias::Rows(b) => {
                    let b = b[m0 + r];
                    src.iter_mut().for_each(|v| *v = self.alpha * *v + b);
                }
            }
        }
        let (n0, cols) = match self.gated {
            true => {
                geglu::gate_rows(tile, rows, cols / 2, NC);
                (n0 / 2, cols / 2)
            }
            false => (n0, cols),
        };
        for r in 0..rows {
            T::store(&tile[r * NC..][..cols], dst.range((m0 + r) * n + n0, cols));
        }
    }
}

/// `f` with this thread's `MC × NC` f32 tile: one buffer a thread, allocated once, not a zeroed
/// one a task (the kernels overwrite a tile before reading it). `f` must not run other tasks of the
/// pool, which could want the tile too.
fn with_tile<R>(f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static TILE: std::cell::RefCell<Aligned<f32>> = std::cell::RefCell::new(Aligned::zeroed(MC * NC));
    }
    TILE.with_borrow_mut(|tile| f(tile))
}

/// `A` as a kernel reads it.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    /// Packed for the product's instructions (`pack_a_tiles`, `pack_a_panels`), its rows padded to
    /// the kernel's row step.
    Packed(&'a [u32]),
    /// f32 rows where they lie, for the AVX-512F kernel (its register tile broadcasts one value of
    /// `A` at a time, from anywhere): `m` rows `row` slots apart. Packing them took an eighth of an
    /// f32 UNet step, a scalar gather of twelve rows.
    Rows { a: &'a [u32], row: usize, m: usize },
}

/// The product of one tile on `isa`: `tile = A[m0 .. m0 + rows] · B[:, panels]` ([`TileShape`]).
///
/// # Safety
/// The CPU runs `isa`; `b` and a packed `a` were packed for it with `shape.kp` slots, a packed `a`'s
/// rows padded to its row blocks; `a` in rows only for [`Isa::Avx512F`], with `kp` slots a row.
unsafe fn multiply_tile(isa: Isa, a: Lhs, b: &[u32], shape: TileShape, tile: &mut [f32]) {
    use avx512::{DOT_BF16, FMA_F32};
    match (isa, a) {
        (Isa::Amx, Lhs::Packed(a)) => amx::multiply_tile(a, b, shape, tile),
        (Isa::Avx512Bf16, Lhs::Packed(_)) => avx512::multiply_tile(DOT_BF16, a, b, shape, tile),
        (Isa::Avx512F, _) => avx512::multiply_tile(FMA_F32, a, b, shape, tile),
        (Isa::Amx | Isa::Avx512Bf16, Lhs::Rows { .. }) => {
            unreachable!("bf16 rows of A are packed in pairs")
        }
    }
}

/// A left operand `A: [M, K]` made ready once for many products on the calling thread: the 36
/// products `U_ξ · V_ξ` of a Winograd convolution share their `U_ξ` across all tiles; attention
/// multiplies a block of queries by every key. bf16 packed; f32 read in place ([`Lhs::Rows`]).
pub(crate) struct PackedLhs<'a> {
    isa: Isa,
    slots: LhsSlots<'a>,
    m: usize,
    k: usize,
}

/// The values of a [`PackedLhs`].
enum LhsSlots<'a> {
    Packed(Aligned<u32>),
    /// Packed into a caller's buffer.
    Lent(&'a [u32]),
    /// f32 rows `row` slots apart.
    Rows {
        a: &'a [u32],
        row: usize,
    },
}

/// A right operand `B: [K, N]` packed once, all its columns: attention's keys and values, which
/// every block of queries multiplies.
pub(crate) struct PackedRhs {
    isa: Isa,
    slots: Aligned<u32>,
    k: usize,
    n: usize,
}

/// The rows of `A` one register or AMX step produces for values of `dtype` (a block of queries is
/// best a multiple of it), or `None` where no kernel runs them.
pub(crate) fn row_step(dtype: DType) -> Option<usize> {
    Isa::best(dtype).map(Isa::row_step)
}

impl<'a> PackedLhs<'a> {
    /// `A[i][j] = a[i · a_row + j]` for the fastest kernel for its dtype, or `None` where the CPU
    /// runs none.
    pub(crate) fn new<S: Source>(a: &'a [S], a_row: usize, m: usize, k: usize) -> Option<Self> {
        Isa::best(S::DTYPE).map(|isa| Self::pack(isa, a, a_row, m, k))
    }

    /// `A[i][j] = bf16(values[i · a_row + j])` (rounded to nearest even) packed for the fastest bf16
    /// kernel, or `None` where the CPU runs none: a softmax's probabilities rounded, then packed.
    pub(crate) fn rounded_bf16(
        values: &[f32],
        (m, k, a_row): (usize, usize, usize),
    ) -> Option<Self> {
        assert!(
            m == 0 || values.len() >= (m - 1) * a_row + k,
            "PackedLhs: operand sizes"
        );
        let isa = Isa::best(DType::BF16)?;
        let mut rounded = vec![bf16::ZERO; m * k];
        for (dst, src) in rounded.chunks_mut(k).zip(values.chunks(a_row)) {
            crate::kernels::narrow_to_bf16(&src[..k], dst);
        }
        let ops = Operands::lhs(&rounded, k, m, k);
        let slots = LhsSlots::Packed(pack_a(isa, &ops));
        Some(PackedLhs { isa, slots, m, k })
    }

    /// A block of an online softmax's probabilities computed, rounded and packed for AMX in one
    /// pass into `slots` (a buffer reused block after block), or `None` where the CPU has no AMX:
    /// `A[i][j] = bf16(e^(s · values[i · a_row + j] − mᵢ))` and per row `(mᵢ, Σⱼ e^(…))` (the sum of
    /// the f32 values; [`softmax::online_step`](crate::kernels::softmax::online_step) takes both).
    /// `mᵢ` is the running maximum `max[i]` kept as it is while the block's scores exceed it by less
    /// than [`LAZY_MAX`] (in log₂ units: probabilities below 2¹⁶, far from f32's range), which saves
    /// a pass over the scores for their maximum (FlashAttention-4's lazy rescaling); otherwise, and
    /// in a row's first block (`max[i] = −∞`), `mᵢ = max(max[i], maxⱼ s · values[i · a_row + j])` as
    /// in `exp_rows_online`. The exponentials to a relative 3·10⁻⁶ before their rounding to bf16
    /// (`exp_at_bf16`).
    pub(crate) fn exp_bf16(
        values: &[f32],
        (m, k, a_row): (usize, usize, usize),
        s: f32,
        max: &[f32],
        slots: &'a mut Aligned<u32>,
    ) -> Option<(Self, Vec<(f32, f32)>)> {
        assert!(
            m == 0 || values.len() >= (m - 1) * a_row + k && max.len() >= m,
            "PackedLhs: operand sizes"
        );
        let isa = Isa::Amx;
        if !isa.supported() {
            return None;
        }
        slots.resize(m.div_ceil(AMX_ROWS) * AMX_ROWS * isa.slots(k));
        // SAFETY: AMX implies AVX-512F and AVX-512 BF16 (Sapphire Rapids and later); the sizes hold.
        let rows = unsafe { amx::pack_exp(values, (m, k, a_row), s, max, slots) };
        let slots = LhsSlots::Lent(slots);
        Some((PackedLhs { isa, slots, m, k }, rows))
    }

    fn pack<S: Source>(isa: Isa, a: &'a [S], a_row: usize, m: usize, k: usize) -> Self {
        assert!(
            m == 0 || a.len() >= (m - 1) * a_row + k,
            "PackedLhs: operand sizes"
        );
        let slots = match (isa, S::as_slots(a)) {
            (Isa::Avx512F, Some(a)) => LhsSlots::Rows { a, row: a_row },
            _ => LhsSlots::Packed(pack_a(isa, &Operands::lhs(a, a_row, m, k))),
        };
        PackedLhs { isa, slots, m, k }
    }

    /// `A` as the kernels read it.
    fn lhs(&self) -> Lhs<'_> {
        match &self.slots {
            LhsSlots::Packed(slots) => Lhs::Packed(slots),
            LhsSlots::Lent(slots) => Lhs::Packed(slots),
            &LhsSlots::Rows { a, row } => Lhs::Rows { a, row, m: self.m },
        }
    }

    /// `dst[M, N] = A · b` for the row-major f32 `b: [K, n]`, on the calling thread, `B` packed a
    /// block of [`NC`] columns at a time.
    pub(crate) fn multiply(&self, b: &[f32], n: usize, dst: &mut [f32]) {
        let k = self.k;
        assert!(
            self.isa == Isa::Avx512F && b.len() >= k * n && dst.len() >= self.m * n,
            "PackedLhs: operand sizes"
        );
        let ops = Operands {
            a: b,
            a_row: 0,
            b,
            b_k: n,
            b_n: 1,
            m: self.m,
            k,
            n,
        };
        let product = Product {
            isa: self.isa,
            alpha: 1.0,
            bias: Bias::None,
            out: DType::F32,
            rhs: Rhs::Matrix,
            gated: false,
        };
        let out = SharedOut::new(dst);
        with_tile(|tile| {
            for n0 in (0..n).step_by(NC) {
                let cols = NC.min(n - n0);
                let packed_b = pack_b(&ops, n0, cols, k);
                for m0 in (0..self.m).step_by(MC) {
                    let shape = TileShape {
                        m0,
                        rows: MC.min(self.m - m0),
                        cols,
                        kp: k,
                        ldc: NC,
                    };
                    // SAFETY: `f32` checked AVX-512F; both operands were packed for it with `k`
                    // slots; the tile lies inside `dst` (asserted), which this call alone writes.
                    unsafe {
                        multiply_tile(self.isa, self.lhs(), &packed_b, shape, tile);
                        product.write_tile(tile, out, m0, shape.rows, n0, cols, n);
                    }
                }
            }
        })
    }

    /// `A · B` written by the kernels straight into `dst`, rows `ldc` apart, with the products of the
    /// padding: rows up to a multiple of [`row_step`], columns up to a multiple of 32 (`ldc` at least
    /// that; the AVX-512 kernels leave the last 16 unwritten where `N mod 32` is 1 to 16). No copy
    /// through a tile; the caller reads the `M × N` values it wants.
    pub(crate) fn multiply_raw(&self, b: &PackedRhs, dst: &mut [f32], ldc: usize) {
        let step = self.isa.row_step();
        assert!(
            self.isa == b.isa
                && self.k == b.k
                && ldc >= b.n.div_ceil(NR) * NR
                && dst.len() >= self.m.div_ceil(step) * step * ldc,
            "PackedLhs: a raw product of {}×{} and {}×{} into {} values, rows {ldc} apart",
            self.m,
            self.k,
            b.k,
            b.n,
            dst.len()
        );
        let kp = self.isa.slots(self.k);
        // AMX takes the whole product in one call (one tile configuration), its rows in groups
        // that each meet every panel; the register tiles in blocks of MC × NC.
        let (mc, nc) = match self.isa {
            Isa::Amx => (self.m.max(1), b.n.max(1)),
            _ => (MC, NC),
        };
        for n0 in (0..b.n).step_by(nc) {
            let panels = &b.slots[n0 / NR * kp * NR..];
            for m0 in (0..self.m).step_by(mc) {
                let shape = TileShape {
                    m0,
                    rows: mc.min(self.m - m0),
                    cols: nc.min(b.n - n0),
                    kp,
                    ldc,
                };
                // SAFETY: `isa` was supported when the operands were packed for it with these
                // slots; the tile's padded rows and columns lie inside `dst` (asserted).
                unsafe {
                    multiply_tile(
                        self.isa,
                        self.lhs(),
                        panels,
                        shape,
                        &mut dst[m0 * ldc + n0..],
                    )
                };
            }
        }
    }
}

impl PackedRhs {
    /// `B[i][j] = b[i · b_k + j · b_n]` (`K × N`) packed for the fastest kernel for its dtype, or
    /// `None` where the CPU runs none.
    pub(crate) fn new<S: Source>(
        b: &[S],
        (b_k, b_n): (usize, usize),
        k: usize,
        n: usize,
    ) -> Option<PackedRhs> {
        Isa::best(S::DTYPE).map(|isa| Self::pack(isa, b, (b_k, b_n), k, n))
    }

    fn pack<S: Source>(isa: Isa, b: &[S], (b_k, b_n): (usize, usize), k: usize, n: usize) -> Self {
        let ops = Operands {
            a: b,
            a_row: 0,
            b,
            b_k,
            b_n,
            m: 0,
            k,
            n,
        };
        PackedRhs {
            isa,
            slots: pack_b(&ops, 0, n, isa.slots(k)),
            k,
            n,
        }
    }
}

/// `A` packed for `isa`'s kernel: AMX tiles or AVX-512 panels.
fn pack_a<S: Source>(isa: Isa, ops: &Operands<S>) -> Aligned<u32> {
    match isa {
        Isa::Amx => pack_a_tiles(ops, isa.slots(ops.k)),
        Isa::Avx512Bf16 | Isa::Avx512F => pack_a_panels(ops, isa.slots(ops.k)),
    }
}

/// `A` as panels of [`MR`] rows for the AVX-512 kernels: `[group][slot][row]` u32 slots, slot `p` of
/// row `r` holding `A[r][p·PER_SLOT ..]` ([`Source::slots`]), zero past `M` and `K`.
fn pack_a_panels<S: Source>(ops: &Operands<S>, kp: usize) -> Aligned<u32> {
    Aligned::par_filled(ops.m.div_ceil(MR) * kp * MR, kp * MR, |g, panel| {
        let rows: Vec<&[S]> = (0..MR.min(ops.m - g * MR))
            .map(|r| &ops.a[(g * MR + r) * ops.a_row..][..ops.k])
            .collect();
        // Slot by slot across the rows: the panel is written in order.
        let slots = panel.chunks_exact_mut(MR).take(ops.k.div_ceil(S::PER_SLOT));
        for (p, out) in slots.enumerate() {
            for (o, row) in out.iter_mut().zip(&rows) {
                *o = S::slot_at(row, p);
            }
        }
    })
}

/// `A` as AMX tiles: `[block of 16 rows][step of 16 slots][row][slot]` u32 slots, each tile 1 KiB
/// contiguous (rows of a plain row-major `A` lie a power of two apart and evict each other from the
/// cache), zero past `K` and in the rows that pad `M` to a multiple of [`AMX_ROWS`]. Each task
/// writes every slot of its block once (no zeroing first), in AVX-512 registers where the CPU has
/// them (a step's 64 bytes one move).
fn pack_a_tiles<S: Source>(ops: &Operands<S>, kp: usize) -> Aligned<u32> {
    let tile = AMX_TILE_ROWS * AMX_PAIRS;
    let len = ops.m.div_ceil(AMX_ROWS) * AMX_ROWS * kp;
    let fill = |block: usize, dst: &mut [u32]| {
        let rows = AMX_TILE_ROWS.min(ops.m.saturating_sub(block * AMX_TILE_ROWS));
        for r in 0..AMX_TILE_ROWS {
            let row = match r < rows {
                true => &ops.a[(block * AMX_TILE_ROWS + r) * ops.a_row..][..ops.k],
                false => &[],
            };
            let mut steps = row.chunks(S::PER_SLOT * AMX_PAIRS);
            for step in 0..kp / AMX_PAIRS {
                let out = &mut dst[step * tile + r * AMX_PAIRS..][..AMX_PAIRS];
                // The step's values (none past `K` or `M`), then zeros.
                let src = steps.next().unwrap_or(&[]);
                let (head, tail) = out.split_at_mut(src.len().div_ceil(S::PER_SLOT));
                S::copy_slots(src, head);
                tail.fill(0);
            }
        }
    };
    // SAFETY: `fill` writes every slot of its block: each of the 16 rows' `kp` slots, a step of
    // AMX_PAIRS at a time (its values copied, the rest zero).
    unsafe {
        Aligned::par_written(len, AMX_TILE_ROWS * kp, |block, dst| {
            crate::kernels::vectorised(
                #[inline(always)]
                || fill(block, dst),
            )
        })
    }
}

/// Columns `n0 .. n0 + cols` of `B` as panels of [`NR`] columns: `[panel][slot][column]` u32 slots,
/// slot `p` of column `c` holding `B[p·PER_SLOT ..][c]`, zero past `K` and `N`.
fn pack_b<S: Source>(ops: &Operands<S>, n0: usize, cols: usize, kp: usize) -> Aligned<u32> {
    let panels = cols.div_ceil(NR);
    let mut packed = Aligned::zeroed(panels * kp * NR);
    let shift = 32 / S::PER_SLOT;
    for (panel, dst) in packed.chunks_mut(kp * NR).enumerate() {
        let c0 = n0 + panel * NR;
        let width = NR.min(n0 + cols - c0);
        if ops.b_k == 1 {
            // Contiguous along `k` (a transposed weight): one column's slots at a time.
            for c in 0..width {
                let column = &ops.b[(c0 + c) * ops.b_n..][..ops.k];
                for (p, slot) in S::slots(column).enumerate() {
                    dst[p * NR + c] = slot;
                }
            }
        } else {
            for kk in 0..ops.k {
                let row = &ops.b[kk * ops.b_k + c0 * ops.b_n..];
                let out = &mut dst[(kk / S::PER_SLOT) * NR..][..width];
                let shift = shift * (kk % S::PER_SLOT);
                match ops.b_n {
                    // Contiguous rows (Winograd's `V`, attention's values): a vector loop.
                    1 => out
                        .iter_mut()
                        .zip(row)
                        .for_each(|(o, x)| *o |= x.bits() << shift),
                    b_n => {
                        for (c, o) in out.iter_mut().enumerate() {
                            *o |= row[c * b_n].bits() << shift;
                        }
                    }
                }
            }
        }
    }
    packed
}

/// A run of a panel of patches along one output row: (first column in the panel, output row `i`,
/// first output column `j`, length).
type Run = (usize, usize, usize, usize);

/// What tap `(u, v)` of a [`Run`] reads, the same in every channel: the first value's offset in the
/// plane and the run's columns `t0 .. t1` inside the image (the rest read padding: zero); `None`
/// where the whole run reads padding.
type Span = Option<(usize, usize, usize)>;

/// The panels of [`NR`] columns of the patch matrix's columns `n0 .. n0 + cols`, `kp` slots each,
/// zeroed, then each filled by `fill(panel, runs, spans)` with the [`Run`]s of the panel (the output
/// rows it meets) and the [`Span`] of each tap of each run, `k²` a run.
fn patch_panels(
    g: PatchGeometry,
    (n0, cols, kp): (usize, usize, usize),
    mut fill: impl FnMut(&mut [u32], &[Run], &[Span]),
) -> Aligned<u32> {
    let mut packed = Aligned::zeroed(cols.div_ceil(NR) * kp * NR);
    let mut runs = Vec::with_capacity(4);
    let mut spans = Vec::with_capacity(4 * g.k * g.k);
    for (panel, dst) in packed.chunks_mut(kp * NR).enumerate() {
        let c0 = n0 + panel * NR;
        let width = NR.min(n0 + cols - c0);
        runs.clear();
        let mut c = 0;
        while c < width {
            let (i, j) = ((c0 + c) / g.wo, (c0 + c) % g.wo);
            let len = (g.wo - j).min(width - c);
            runs.push((c, i, j, len));
            c += len;
        }
        spans.clear();
        for &(_, i, j, len) in &runs {
            spans.extend((0..g.k * g.k).map(|tap| {
                let (u, v) = (tap / g.k, tap % g.k);
                // Input row y = s·i + u − p; input column x = s·(j + t) + v − p for t < len.
                let y = (g.s * i + u).checked_sub(g.p).filter(|&y| y < g.h)?;
                let x0 = g.s * j + v;
                // ⌈a / s⌉, without a division for the common stride 1.
                let ceil = |a: usize| if g.s == 1 { a } else { a.div_ceil(g.s) };
                let t0 = ceil(g.p.saturating_sub(x0));
                let t1 = ceil((g.w + g.p).saturating_sub(x0)).min(len);
                let offset = y * g.w + (x0 + g.s * t0).checked_sub(g.p)?;
                (t0 < t1).then_some((offset, t0, t1))
            }));
        }
        fill(dst, &runs, &spans);
    }
    packed
}

/// The image `[C, H, W]` (bf16, `C` even) as `[C/2, H, W]` pairs of channels: slot `(c, y, x)` holds
/// channel `2c`'s value in its low half, `2c + 1`'s in its high half — the slots of the patches
/// in `(u, v, c)` order ([`channel_pairs`]). On all threads.
fn interleave_channels<S: Source>(image: &[S], g: PatchGeometry) -> Vec<u32> {
    let plane = g.h * g.w;
    crate::kernels::par_filled(g.c / 2 * plane, plane, |cp, out| {
        let (lo, hi) = (&image[2 * cp * plane..], &image[(2 * cp + 1) * plane..]);
        for ((o, l), h) in out.iter_mut().zip(lo).zip(hi) {
            *o = l.bits() | h.bits() << 16;
        }
    })
}

/// As [`pack_patches`], for `K` in `(u, v, c)` order over the channel pairs of `pairs`
/// ([`interleave_channels`]): slot `(u, v, c/2)` of a column is one value of `pairs`, a run of a
/// panel one copy (stride 1) or a strided gather.
fn pack_patch_pairs(
    pairs: &[u32],
    g: PatchGeometry,
    n0: usize,
    cols: usize,
    kp: usize,
) -> Aligned<u32> {
    let (plane, planes) = (g.h * g.w, g.c / 2);
    patch_panels(g, (n0, cols, kp), |dst, runs, spans| {
        for (&(c, ..), spans) in runs.iter().zip(spans.chunks(g.k * g.k)) {
            for (tap, span) in spans.iter().enumerate() {
                let Some((offset, t0, t1)) = *span else {
                    continue;
                };
                for cp in 0..planes {
                    let out = &mut dst[(tap * planes + cp) * NR + c..][t0..t1];
                    let row = &pairs[cp * plane + offset..];
                    match g.s {
                        1 => out.copy_from_slice(&row[..t1 - t0]),
                        s => {
                            for (o, t) in out.iter_mut().zip(0..) {
                                *o = row[s * t];
                            }
                        }
                    }
                }
            }
        }
    })
}

/// As [`pack_b`], for the patch matrix of a convolution over the image `ops.b` (`[C, H, W]`, `K` in
/// `(c, u, v)` order): the columns of a panel fall into runs along output rows, and each run of a
/// tap `(u, v)` reads one input row with stride `s`.
fn pack_patches<S: Source>(
    ops: &Operands<S>,
    g: PatchGeometry,
    n0: usize,
    cols: usize,
    kp: usize,
) -> Aligned<u32> {
    let plane = g.h * g.w;
    // k = (channel, u, v) in order: the first value of the channel's plane and the tap `u·k + v`.
    let taps: Vec<(usize, usize)> = (0..ops.k / (g.k * g.k))
        .flat_map(|ch| (0..g.k * g.k).map(move |tap| (ch * plane, tap)))
        .collect();
    patch_panels(g, (n0, cols, kp), |dst, runs, spans| {
        for (slot, taps) in taps.chunks(S::PER_SLOT).enumerate() {
            let out = &mut dst[slot * NR..][..NR];
            for (&(c, ..), spans) in runs.iter().zip(spans.chunks(g.k * g.k)) {
                let reads = taps.iter().map(|&(plane0, tap)| {
                    let (offset, t0, t1) = spans[tap]?;
                    Some((&ops.b[plane0 + offset..], t0, t1))
                });
                let reads: [_; 2] = {
                    let mut r = reads;
                    [r.next().flatten(), r.next().flatten()]
                };
                match reads {
                    // A bf16 pair whose columns overlap, stride 1 (a 3×3 convolution): each slot
                    // written once, the overlap (all but the image's edges) in one pass.
                    [Some((lo, a0, a1)), Some((hi, b0, b1))]
                        if g.s == 1 && a0.max(b0) < a1.min(b1) =>
                    {
                        let (m0, m1) = (a0.max(b0), a1.min(b1));
                        let out = &mut out[c..];
                        let both = out[m0..m1]
                            .iter_mut()
                            .zip(&lo[m0 - a0..])
                            .zip(&hi[m0 - b0..]);
                        for ((o, l), h) in both {
                            *o = l.bits() | h.bits() << 16;
                        }
                        for t in (a0..m0).chain(m1..a1) {
                            out[t] = lo[t - a0].bits();
                        }
                        for t in (b0..m0).chain(m1..b1) {
                            out[t] = hi[t - b0].bits() << 16;
                        }
                    }
                    reads => {
                        for (half, read) in reads.into_iter().enumerate() {
                            let Some((row, t0, t1)) = read else { continue };
                            let shift = 32 / S::PER_SLOT * half;
                            let out = &mut out[c + t0..c + t1];
                            match g.s {
                                1 => out
                                    .iter_mut()
                                    .zip(row)
                                    .for_each(|(o, x)| *o |= x.bits() << shift),
                                s => {
                                    for (o, t) in out.iter_mut().zip(0..) {
                                        *o |= row[s * t].bits() << shift;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Where a task's tile of `C` lies: rows `m0 .. m0 + rows`, `cols` columns, over `kp` pairs of `K`,
/// written `ldc` values a row apart.
#[derive(Clone, Copy)]
struct TileShape {
    m0: usize,
    rows: usize,
    cols: usize,
    kp: usize,
    ldc: usize,
}

/// The AVX-512 kernels: a register tile of [`MR`] × [`NR`] f32 sums over packed slots.
mod avx512 {
    use super::{Lhs, TileShape, KC, MR, NR};

    /// Slots ahead of use that [`Rows::prefetch`] asks for: four cache lines.
    const PREFETCH: usize = 64;

    /// Where a register tile reads its [`MR`] rows of `A`: slot `p` of row `r` at [`Rows::at`].
    pub(super) trait Rows: Copy {
        /// The address of slot `p` of row `r`.
        ///
        /// # Safety
        /// The slot lies in the operand the rows were made from.
        unsafe fn at(self, p: usize, r: usize) -> *const u32;

        /// Asks for the cache lines of slot `p` of every row ahead of use (a hint: nothing where
        /// the rows are one packed stream, which the hardware prefetches by itself).
        #[inline(always)]
        fn prefetch(self, _p: usize) {}
    }

    /// Rows packed by `pack_a_panels`: slot `p` of row `r` at `p · MR + r`.
    #[derive(Clone, Copy)]
    pub(super) struct Panel(*const u32);

    impl Rows for Panel {
        #[inline(always)]
        unsafe fn at(self, p: usize, r: usize) -> *const u32 {
            self.0.add(p * MR + r)
        }
    }

    /// f32 rows read where they lie, each from its own first slot.
    #[derive(Clone, Copy)]
    pub(super) struct InPlace([*const u32; MR]);

    impl Rows for InPlace {
        #[inline(always)]
        unsafe fn at(self, p: usize, r: usize) -> *const u32 {
            self.0[r].add(p)
        }

        /// Twelve rows are twelve streams from memory (a weight of 8×8 convolutions read once:
        /// 59 MB at 6 GB/s where a core reads 14), more than the hardware keeps ahead of.
        #[inline(always)]
        fn prefetch(self, p: usize) {
            #[cfg(target_arch = "x86_64")]
            for row in self.0 {
                // SAFETY: a prefetch is a hint and never faults, whatever the address.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        row.wrapping_add(p) as *const i8,
                    )
                };
            }
        }
    }

    /// A register tile: `c[r][0..16·H] (+)= Σₚ a[p][r] · b[p][0..16·H]` over `kc` slots of a panel
    /// (`b`, [`NR`] slots a row), `c` with row stride `ldc`, added to its contents when
    /// `accumulate`; `H` is 2 (the whole panel) or 1 (its first 16 columns).
    ///
    /// # Safety
    /// The CPU runs the kernel's instructions; `a` holds `kc` slots of each of its [`MR`] rows, `b`
    /// `kc · NR` slots, `c` at least `(MR − 1) · ldc + 16·H` values.
    pub(super) type Kernel<A> = unsafe fn(A, &[u32], &mut [f32], usize, usize, bool);

    /// A register tile's [`Kernel`]s: for packed rows and rows in place, over the first 16 columns
    /// of a panel and over all [`NR`].
    pub(super) struct Kernels {
        packed: [Kernel<Panel>; 2],
        in_place: [Kernel<InPlace>; 2],
    }

    /// The kernels of [`dot_bf16`].
    pub(super) const DOT_BF16: Kernels = Kernels {
        packed: [dot_bf16::<Panel, 1>, dot_bf16::<Panel, 2>],
        in_place: [dot_bf16::<InPlace, 1>, dot_bf16::<InPlace, 2>],
    };

    /// The kernels of [`fma_f32`].
    pub(super) const FMA_F32: Kernels = Kernels {
        packed: [fma_f32::<Panel, 1>, fma_f32::<Panel, 2>],
        in_place: [fma_f32::<InPlace, 1>, fma_f32::<InPlace, 2>],
    };

    /// `tile = A[m0 .. m0 + rows] · B[:, panels]` over all of `K`, `tile` f32 with rows `t.ldc` apart
    /// (rows past `rows`, up to a multiple of [`MR`], and columns past `cols`, up to a multiple of
    /// 16, hold the products of padding: zeros, or the last row of `A` repeated in place; a last
    /// panel of at most 16 columns leaves its other 16 unwritten).
    ///
    /// # Safety
    /// The CPU runs `kernel`s instructions; the operands hold the tile's `kp` slots (`a`'s rows
    /// padded to a multiple of [`MR`] where packed by `pack_a_panels`).
    pub(super) unsafe fn multiply_tile(
        kernels: Kernels,
        a: Lhs,
        b: &[u32],
        t: TileShape,
        tile: &mut [f32],
    ) {
        for k0 in (0..t.kp).step_by(KC) {
            let kc = KC.min(t.kp - k0);
            for panel in 0..t.cols.div_ceil(NR) {
                let b = &b[(panel * t.kp + k0) * NR..][..kc * NR];
                // A panel of at most 16 columns (attention's 40-wide values: 48 of 64) takes half
                // the products.
                let half = (t.cols - panel * NR).min(NR).div_ceil(16) - 1;
                let (packed, in_place) = (kernels.packed[half], kernels.in_place[half]);
                for g in 0..t.rows.div_ceil(MR) {
                    let c = &mut tile[g * MR * t.ldc + panel * NR..];
                    match a {
                        Lhs::Packed(a) => {
                            let a = &a[((t.m0 / MR + g) * t.kp + k0) * MR..][..kc * MR];
                            packed(Panel(a.as_ptr()), b, c, kc, t.ldc, k0 > 0);
                        }
                        Lhs::Rows { a, row, m } => {
                            // Rows past `m` repeat the last one: their sums are not read.
                            let first = t.m0 + g * MR;
                            let rows = std::array::from_fn(|r| {
                                a[(first + r).min(m - 1) * row + k0..][..kc].as_ptr()
                            });
                            in_place(InPlace(rows), b, c, kc, t.ldc, k0 > 0);
                        }
                    }
                }
            }
        }
    }

    /// A [`Kernel`] for the target features `$features` whose step `$step(acc, a, b)` adds the
    /// products of the broadcast slot `a` (an `__m512i`) with 16 slots `b` of a panel to `acc`.
    macro_rules! register_tile {
        ($(#[$doc:meta])* $name:ident, $features:literal, $step:expr) => {
            $(#[$doc])*
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<A: Rows, const H: usize>(
                a: A,
                b: &[u32],
                c: &mut [f32],
                kc: usize,
                ldc: usize,
                accumulate: bool,
            ) {
                use std::arch::x86_64::*;
                let mut acc = [[_mm512_setzero_ps(); H]; MR];
                let b = b.as_ptr() as *const __m512i;
                for p in 0..kc {
                    if p % 16 == 0 {
                        a.prefetch(p + PREFETCH);
                    }
                    let bh: [__m512i; H] = std::array::from_fn(|h| _mm512_loadu_si512(b.add(2 * p + h)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_epi32(*a.at(p, r) as i32);
                        for (acc, &b) in acc.iter_mut().zip(&bh) {
                            *acc = $step(*acc, av, b);
                        }
                    }
                }
                let c = c.as_mut_ptr();
                for (r, acc) in acc.iter().enumerate() {
                    for (h, &v) in acc.iter().enumerate() {
                        let dst = c.add(r * ldc + h * 16);
                        let v = if accumulate {
                            _mm512_add_ps(_mm512_loadu_ps(dst), v)
                        } else {
                            v
                        };
                        _mm512_storeu_ps(dst, v);
                    }
                }
            }

            #[cfg(not(target_arch = "x86_64"))]
            pub(super) unsafe fn $name<A: Rows, const H: usize>(_: A, _: &[u32], _: &mut [f32], _: usize, _: usize, _: bool) {
                unreachable!("AVX-512 is x86-64's")
            }
        };
    }

    register_tile!(
        /// bf16 pairs by `vdpbf16ps`: each lane adds `a₀b₀ + a₁b₁`.
        dot_bf16,
        "avx512f,avx512bf16",
        |acc, a: __m512i, b: __m512i| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b)
        )
    );

    register_tile!(
        /// f32 values by `vfmadd231ps`: each lane adds `a · b`.
        fma_f32,
        "avx512f",
        |acc, a, b| _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
    );
}

/// The AMX kernel: tiles `tmm0..3` hold a 32×32 block of `C`, `tmm4/5` two 16-row tiles of `A`,
/// `tmm6/7` two 16-column tiles of `B`.
mod amx {
    use super::{TileShape, AMX_PAIRS, AMX_ROWS, AMX_TILE_ROWS, LAZY_MAX, NR};

    /// The tile configuration (palette 1): eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// `tile = A[m0 .. m0 + rows] · B[:, panels]` over all of `K`, as the AVX-512 kernel's, with `A`
    /// packed by `pack_a_tiles`. A group of 32 rows of `A` meets every panel of `B` before the next
    /// group: each group comes once from L3 (a weight) and stays in L2 for the panels
    /// (`tools/bench/amx_tile.c`, a task's tile with `A` streamed from L3: 1,130–1,180 GFLOP/s a core
    /// against 880–950 with the panels outside).
    ///
    /// # Safety
    /// The CPU runs AMX-BF16 and the OS granted the tile state; the operands hold the tile's `kp`
    /// pairs (a multiple of [`AMX_PAIRS`]) and `A` its rows up to a multiple of [`AMX_ROWS`].
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn multiply_tile(a: &[u32], b: &[u32], t: TileShape, tile: &mut [f32]) {
        use std::arch::asm;
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
        let (a_stride, b_stride, c_stride) = (AMX_PAIRS * 4, NR * 4, t.ldc * 4);
        let a_tile = AMX_TILE_ROWS * AMX_PAIRS;
        for g in 0..t.rows.div_ceil(AMX_ROWS) {
            let a = a[(t.m0 + g * AMX_ROWS) * t.kp..][..AMX_ROWS * t.kp].as_ptr();
            for panel in 0..t.cols.div_ceil(NR) {
                let b = b[panel * t.kp * NR..][..t.kp * NR].as_ptr();
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                );
                for s in 0..t.kp / AMX_PAIRS {
                    let (a0, b0) = (a.add(s * a_tile), b.add(s * AMX_PAIRS * NR));
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.add(AMX_TILE_ROWS * t.kp),
                        b0 = in(reg) b0,
                        b1 = in(reg) b0.add(16),
                        sa = in(reg) a_stride,
                        sb = in(reg) b_stride,
                        options(nostack, readonly)
                    );
                }
                let c = tile[g * AMX_ROWS * t.ldc + panel * NR..][..(AMX_ROWS - 1) * t.ldc + NR]
                    .as_mut_ptr();
                asm!(
                    "tilestored [{c0} + {sc}*1], tmm0",
                    "tilestored [{c1} + {sc}*1], tmm1",
                    "tilestored [{c2} + {sc}*1], tmm2",
                    "tilestored [{c3} + {sc}*1], tmm3",
                    c0 = in(reg) c,
                    c1 = in(reg) c.add(16),
                    c2 = in(reg) c.add(16 * t.ldc),
                    c3 = in(reg) c.add(16 * t.ldc + 16),
                    sc = in(reg) c_stride,
                    options(nostack)
                );
            }
        }
        asm!("tilerelease", options(nostack));
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn multiply_tile(_: &[u32], _: &[u32], _: TileShape, _: &mut [f32]) {
        unreachable!("AMX is x86-64's")
    }
    /// [`super::PackedLhs::exp_bf16`] into AMX tiles (the layout of `pack_a_tiles`): row `r`'s
    /// slots `16·t .. 16·t + 16` hold its exponentials `32·t ..` as bf16 pairs, one
    /// `vcvtne2ps2bf16` of two blocks of 16 (zero past `k`); rows of −∞ scores and the padding rows
    /// are zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `values` holds the `m` rows, `max` `m` values and
    /// `slots` the tiles of `m` rows over `k` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_exp(
        values: &[f32],
        (m, k, a_row): (usize, usize, usize),
        s: f32,
        max: &[f32],
        slots: &mut [u32],
    ) -> Vec<(f32, f32)> {
        use crate::kernels::softmax::avx512::row_max;
        let kp = super::Isa::Amx.slots(k);
        // A loop, not a closure: a closure would not take the function's instruction sets.
        let mut rows = Vec::with_capacity(m);
        for r in 0..m.div_ceil(AMX_ROWS) * AMX_ROWS {
            let first = (r / AMX_TILE_ROWS) * AMX_TILE_ROWS * kp + (r % AMX_TILE_ROWS) * AMX_PAIRS;
            let zero = |slots: &mut [u32]| {
                for t in 0..kp / AMX_PAIRS {
                    let at = first + t * AMX_TILE_ROWS * AMX_PAIRS;
                    slots[at..at + AMX_PAIRS].fill(0);
                }
            };
            if r >= m {
                zero(slots);
                continue;
            }
            let row = &values[r * a_row..][..k];
            let exact = max[r] == f32::NEG_INFINITY;
            let mut mr = match exact {
                true => row_max(row, s, max[r]),
                false => max[r],
            };
            if mr == f32::NEG_INFINITY {
                zero(slots);
                rows.push((mr, 1.0));
                continue;
            }
            let (mut sum, above) = exp_row(row, s, mr, slots, first);
            if !exact && above > LAZY_MAX {
                mr = row_max(row, s, mr);
                sum = exp_row(row, s, mr, slots, first).0;
            }
            rows.push((mr, sum));
        }
        rows
    }

    /// One row of [`pack_exp`]: `e^(s · row − m)` into the slots from `first`, every 16th slot a
    /// tile row apart, returning the exponentials' sum and `maxⱼ (s · rowⱼ − m) · log₂e`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn exp_row(row: &[f32], s: f32, m: f32, slots: &mut [u32], first: usize) -> (f32, f32) {
        use crate::kernels::softmax::avx512::exp_at_bf16;
        use std::arch::x86_64::*;
        let tile = AMX_TILE_ROWS * AMX_PAIRS;
        let ls = _mm512_set1_ps(s * std::f32::consts::LOG2_E);
        let lm = _mm512_set1_ps(m * std::f32::consts::LOG2_E);
        let dst = slots.as_mut_ptr();
        let (mut acc, mut above) = (_mm512_setzero_ps(), _mm512_set1_ps(f32::NEG_INFINITY));
        for (step, j) in (0..row.len()).step_by(2 * AMX_PAIRS).enumerate() {
            let (lo, y) = exp_at_bf16(row, j, ls, lm);
            acc = _mm512_add_ps(acc, lo);
            above = _mm512_max_ps(above, y);
            let hi = match j + 16 < row.len() {
                true => {
                    let (hi, y) = exp_at_bf16(row, j + 16, ls, lm);
                    above = _mm512_max_ps(above, y);
                    hi
                }
                false => _mm512_setzero_ps(),
            };
            acc = _mm512_add_ps(acc, hi);
            _mm512_storeu_si512(
                dst.add(first + step * tile) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
            );
        }
        (_mm512_reduce_add_ps(acc), _mm512_reduce_max_ps(above))
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn pack_exp(
        _: &[f32],
        _: (usize, usize, usize),
        _: f32,
        _: &[f32],
        _: &mut [u32],
    ) -> Vec<(f32, f32)> {
        unreachable!("AMX is x86-64's")
    }
}

/// A product's shape, read off the operands' layouts: everything [`Operands`] holds but the values.
struct Plan {
    a_row: usize,
    b_k: usize,
    b_n: usize,
    m: usize,
    k: usize,
    n: usize,
    batch: usize,
    /// Elements between the operands of consecutive products of the batch.
    strides: (usize, usize),
    patches: Option<PatchGeometry>,
    shape: Vec<usize>,
}

impl Plan {
    fn operands<'a, S>(&self, a: &'a [S], b: &'a [S]) -> Operands<'a, S> {
        let Plan {
            a_row,
            b_k,
            b_n,
            m,
            k,
            n,
            ..
        } = *self;
        Operands {
            a,
            a_row,
            b,
            b_k,
            b_n,
            m,
            k,
            n,
        }
    }
}

impl Product {
    /// The shape of `A · B` for these layouts, or an error naming what does not fit.
    fn plan(&self, a_l: &Layout, b_l: &Layout) -> candle_core::Result<Plan> {
        let (ad, astr) = (a_l.dims(), a_l.stride());
        let (bd, bstr) = (b_l.dims(), b_l.stride());
        let (ar, br) = (ad.len(), bd.len());
        if ar < 2 || astr[ar - 1] != 1 {
            bail!("matmul: the left operand {ad:?} must have contiguous rows");
        }
        let (m, k) = (ad[ar - 2], ad[ar - 1]);
        let a_row = astr[ar - 2];
        match self.rhs {
            Rhs::Matrix => {
                if br < 2 || bd[br - 2] != k {
                    bail!("matmul: shapes {ad:?} and {bd:?} do not chain");
                }
                let n = bd[br - 1];
                let b_batch = match br {
                    2 => 0,
                    _ if bd[..br - 2] == ad[..ar - 2] && br == 3 && ar == 3 => bstr[0],
                    _ => bail!("matmul: batch dims of {ad:?} and {bd:?} differ"),
                };
                if ar > 3 {
                    bail!("matmul: the left operand {ad:?} must be [M, K] or [B, M, K]");
                }
                let a_batch = if ar == 3 { astr[0] } else { 0 };
                let mut shape = ad[..ar - 1].to_vec();
                shape.push(self.out_columns(n));
                Ok(Plan {
                    a_row,
                    b_k: bstr[br - 2],
                    b_n: bstr[br - 1],
                    m,
                    k,
                    n,
                    batch: ad[..ar - 2].iter().product(),
                    strides: (a_batch, b_batch),
                    patches: None,
                    shape,
                })
            }
            Rhs::Patches { k: kk, s, p } => {
                let (bn, c, h, w) = b_l.shape().dims4()?;
                if b_l.contiguous_offsets().is_none() || c * kk * kk != k || ar != 2 {
                    bail!("conv: weight {ad:?} does not fit a contiguous image {bd:?}");
                }
                let (ho, wo) = ((h + 2 * p - kk) / s + 1, (w + 2 * p - kk) / s + 1);
                Ok(Plan {
                    a_row,
                    b_k: 0,
                    b_n: 0,
                    m,
                    k,
                    n: ho * wo,
                    batch: bn,
                    strides: (0, c * h * w),
                    patches: Some(PatchGeometry {
                        k: kk,
                        s,
                        p,
                        c,
                        h,
                        w,
                        wo,
                        pairs: channel_pairs(self.isa, c),
                    }),
                    shape: vec![bn, m, ho, wo],
                })
            }
        }
    }

    /// The product of these values in the output dtype.
    fn storage<S: Source>(
        &self,
        plan: &Plan,
        a: &[S],
        b: &[S],
        packed: Prepacked,
    ) -> candle_core::Result<CpuStorage> {
        let ops = plan.operands(a, b);
        let (batch, strides, patches) = (plan.batch, plan.strides, plan.patches);
        Ok(match self.out {
            DType::F32 => CpuStorage::F32(self.run(ops, batch, strides, patches, packed)),
            DType::BF16 => CpuStorage::BF16(self.run(ops, batch, strides, patches, packed)),
            d => bail!("matmul: no {d:?} output"),
        })
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul-cpu"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        a_l: &Layout,
        b_s: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if !self.isa.supported() {
            bail!("matmul: this CPU does not run {:?}", self.isa);
        }
        let plan = self.plan(a_l, b_l)?;
        let (a0, b0) = (a_l.start_offset(), b_l.start_offset());
        let storage = match (self.isa.dtype(), a_s, b_s) {
            (DType::BF16, CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                self.storage(&plan, &a[a0..], &b[b0..], Prepacked::No)?
            }
            (DType::F32, CpuStorage::F32(a), CpuStorage::F32(b)) => {
                self.storage(&plan, &a[a0..], &b[b0..], Prepacked::No)?
            }
            (d, ..) => bail!(
                "matmul: {:?} runs {d:?} operands, not {:?} and {:?}",
                self.isa,
                a_s.dtype(),
                b_s.dtype()
            ),
        };
        Ok((storage, Shape::from(plan.shape)))
    }
}

/// The fastest instructions this CPU runs for operands like `t`, or an error naming what is missing.
fn best_isa(t: &Tensor) -> candle_core::Result<Isa> {
    match Isa::best(t.dtype()) {
        Some(isa) if t.device().is_cpu() => Ok(isa),
        _ => bail!(
            "matmul: no kernel for {:?} on {:?} (bf16 needs AMX-BF16 or AVX-512 BF16, f32 AVX-512F)",
            t.dtype(),
            t.device().location()
        ),
    }
}

/// `α · a · b` in `out` (f32 or bf16) for bf16 or f32 `a: [M, K]` or `[B, M, K]` and `b: [K, N]`
/// or `[B, K, N]` of the same dtype (any strides: a transposed view is read in place).
pub fn matmul(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> candle_core::Result<Tensor> {
    matmul_on(best_isa(a)?, a, b, alpha, out)
}

fn matmul_on(
    isa: Isa,
    a: &Tensor,
    b: &Tensor,
    alpha: f64,
    out: DType,
) -> candle_core::Result<Tensor> {
    let a = match a.stride().last() {
        Some(1) => a.clone(),
        _ => a.contiguous()?,
    };
    let op = Product {
        isa,
        alpha: alpha as f32,
        bias: Bias::None,
        out,
        rhs: Rhs::Matrix,
        gated: false,
    };
    a.apply_op2_no_bwd(b, &op)
}

/// candle's `Linear`, `y = x Wᵀ + bias`, for bf16 or f32 `x: [.., K]` and `W: [N, K]`, in `x`'s
/// dtype.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    linear_on(best_isa(x)?, x, w, bias)
}

fn linear_on(
    isa: Isa,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let x2 = x.contiguous()?.reshape((x.elem_count() / k, k))?;
    let op = Product {
        isa,
        alpha: 1.0,
        bias: Bias::of(bias, Bias::Columns)?,
        out: x.dtype(),
        rhs: Rhs::Matrix,
        gated: false,
    };
    let y = x2.apply_op2_no_bwd(&w.t()?, &op)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// A square convolution with stride `s` and zero padding `p`, `y = W ⋆ x + bias`, for bf16 or f32
/// `x: [B, C, H, W]` and `W: [O, C, k, k]`, in `x`'s dtype: the product of `W: [O, C·k·k]` with the patch
/// matrix of each image.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    s: usize,
    p: usize,
) -> candle_core::Result<Tensor> {
    conv2d_on(best_isa(x)?, x, weight, bias, s, p)
}

fn conv2d_on(
    isa: Isa,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    s: usize,
    p: usize,
) -> candle_core::Result<Tensor> {
    let (o, c, k, _) = weight.dims4()?;
    let op = Product {
        isa,
        alpha: 1.0,
        bias: Bias::of(bias, Bias::Rows)?,
        out: x.dtype(),
        rhs: Rhs::Patches { k, s, p },
        gated: false,
    };
    conv_lhs(isa, weight)?
        .reshape((o, c * k * k))?
        .apply_op2_no_bwd(&x.contiguous()?, &op)
}

/// A convolution's weight `[O, C, k, k]` in the order of `K` its product on `isa` takes: as it is,
/// or `[O, k, k, C]` where the channels go in pairs ([`channel_pairs`]); contiguous.
fn conv_lhs(isa: Isa, weight: &Tensor) -> candle_core::Result<Tensor> {
    match channel_pairs(isa, weight.dim(1)?) {
        true => weight.permute((0, 2, 3, 1))?.contiguous(),
        false => weight.contiguous(),
    }
}

/// A layer's weight packed once, at load, for this CPU's product kernel, in place of its tensor
/// (inference: no gradient reaches it): a linear layer's `W: [N, K]` as the right operand `Wᵀ` in
/// panels, a square convolution's `W: [O, C, k, k]` as the left operand `[O, C·k·k]` in the kernel's
/// rows. Each call then packs only its input, where [`linear`] and [`conv2d`] pack the weight every
/// time (a tenth of a bf16 SD1.5 UNet step). The packed weight takes the plain one's memory: a bf16
/// pair or an f32 a slot, `K` padded to the kernel's step.
pub struct PackedWeight {
    isa: Isa,
    slots: Aligned<u32>,
    /// The weight's shape as stored: `[N, K]` or `[O, C, k, k]`.
    dims: Vec<usize>,
    bias: Bias,
    /// A GEGLU projection's, its features reordered for the gated product ([`PackedWeight::geglu`]).
    gated: bool,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({:?}, {:?})", self.dims, self.isa)
    }
}

impl PackedWeight {
    /// A linear layer's `W: [N, K]` and bias, or `None` where no kernel runs its dtype on its device.
    pub fn linear(w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Option<Self>> {
        w.dims2()?;
        Self::pack(w, bias, Bias::Columns)
    }

    /// A square convolution's `W: [O, C, k, k]` and bias, or `None` where no kernel runs its dtype on
    /// its device or the kernel is not square.
    pub fn conv(w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Option<Self>> {
        let (_, _, kh, kw) = w.dims4()?;
        match kh == kw {
            true => Self::pack(w, bias, Bias::Rows),
            false => Ok(None),
        }
    }

    /// `w` packed as [`Bias::Columns`] says a linear layer's is, [`Bias::Rows`] a convolution's.
    fn pack(
        w: &Tensor,
        bias: Option<&Tensor>,
        along: fn(Vec<f32>) -> Bias,
    ) -> candle_core::Result<Option<Self>> {
        let Some(isa) = Isa::best(w.dtype()).filter(|_| w.device().is_cpu()) else {
            return Ok(None);
        };
        let dims = w.dims().to_vec();
        /// `Wᵀ` of a linear layer's `[N, K]` as a right operand, a convolution's `[O, C·k·k]` (in
        /// the order of [`conv_lhs`]) as a left one.
        fn values<S: Source>(isa: Isa, dims: &[usize], v: &[S]) -> Aligned<u32> {
            match *dims {
                [n, k] => PackedRhs::pack(isa, v, (1, k), k, n).slots,
                _ => {
                    let (o, k) = (dims[0], dims[1..].iter().product());
                    pack_a(isa, &Operands::lhs(v, k, o, k))
                }
            }
        }
        let flat = match dims.len() {
            4 => conv_lhs(isa, w)?.flatten_all()?,
            _ => w.flatten_all()?,
        };
        let slots = match w.dtype() {
            DType::BF16 => values(isa, &dims, &flat.to_vec1::<bf16>()?),
            _ => values(isa, &dims, &flat.to_vec1::<f32>()?),
        };
        Ok(Some(Self {
            isa,
            slots,
            dims,
            bias: Bias::of(bias, along)?,
            gated: false,
        }))
    }

    /// The projection of a GEGLU feed-forward, `W: [2·inner, K]` and its bias, whose features
    /// `0 .. inner` are `h` and `inner .. 2·inner` the gates `g` ([`forward_geglu`](Self::forward_geglu)),
    /// or `None` where no kernel runs its dtype on its device. The features are reordered so that each
    /// block of [`NC`] columns of the product holds 64 features of `h` and the same 64 of `g`.
    pub fn geglu(w: &Tensor, bias: &Tensor) -> candle_core::Result<Option<Self>> {
        let (n, _) = w.dims2()?;
        if !n.is_multiple_of(2) || bias.dims1()? != n {
            bail!(
                "geglu: a projection {:?} with a bias {:?} has no halves h and g",
                w.dims(),
                bias.dims()
            );
        }
        let inner = n / 2;
        let order: Vec<u32> = (0..inner)
            .step_by(NC / 2)
            .flat_map(|f0| {
                let features = f0..(f0 + NC / 2).min(inner);
                features.clone().chain(features.map(|f| f + inner))
            })
            .map(|f| f as u32)
            .collect();
        let order = Tensor::new(order, w.device())?;
        let packed = Self::linear(
            &w.index_select(&order, 0)?,
            Some(&bias.index_select(&order, 0)?),
        )?;
        Ok(packed.map(|p| Self { gated: true, ..p }))
    }

    /// `h · gelu(g)` of `[h, g] = x Wᵀ + bias` for `x: [.., K]` (diffusers' `GEGLU`, the exact GELU),
    /// `[.., inner]`, the gate computed on each block of the product as it is written (never the
    /// `2·inner` features), for a weight packed by [`geglu`](Self::geglu).
    pub fn forward_geglu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.gated {
            true => self.forward_rows(x),
            false => bail!(
                "geglu: the weight {:?} was not packed as a GEGLU projection",
                self.dims
            ),
        }
    }

    /// The weight's shape as stored.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// `y = x Wᵀ + bias` for `x: [.., K]` of the weight's dtype (candle's `Linear`).
    pub fn forward_linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.gated {
            true => bail!(
                "matmul: the weight {:?} was packed as a GEGLU projection",
                self.dims
            ),
            false => self.forward_rows(x),
        }
    }

    /// The product over the rows of `x: [.., K]`, as many values a row out as the product writes.
    fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.dims[1];
        let dims = x.dims().to_vec();
        let x2 = x.contiguous()?.reshape((x.elem_count() / k.max(1), k))?;
        let y = x2.apply_op1_no_bwd(&self.product(x, Rhs::Matrix)?)?;
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }

    /// `y = W ⋆ x + bias` with stride `s` and zero padding `p`, for `x: [B, C, H, W]` of the weight's
    /// dtype (as [`conv2d`]).
    pub fn forward_conv(&self, x: &Tensor, s: usize, p: usize) -> candle_core::Result<Tensor> {
        let rhs = Rhs::Patches {
            k: self.dims[2],
            s,
            p,
        };
        x.contiguous()?.apply_op1_no_bwd(&self.product(x, rhs)?)
    }

    fn product(&self, x: &Tensor, rhs: Rhs) -> candle_core::Result<WeightProduct<'_>> {
        if x.dtype() != self.isa.dtype() || !x.device().is_cpu() {
            bail!(
                "matmul: a {:?} weight packed for the CPU, given a {:?} input on {:?}",
                self.isa.dtype(),
                x.dtype(),
                x.device().location()
            );
        }
        Ok(WeightProduct {
            product: Product {
                isa: self.isa,
                alpha: 1.0,
                bias: self.bias.clone(),
                out: x.dtype(),
                rhs,
                gated: self.gated,
            },
            weight: self,
        })
    }
}

/// A product with a [`PackedWeight`], as a custom op on the input alone.
struct WeightProduct<'a> {
    product: Product,
    weight: &'a PackedWeight,
}

impl WeightProduct<'_> {
    /// The plan of the product, the weight's side given the layout it was packed from.
    fn plan(&self, x_l: &Layout) -> candle_core::Result<(Plan, Prepacked<'_>)> {
        let (w, slots) = (&self.weight.dims, &self.weight.slots[..]);
        Ok(match self.product.rhs {
            Rhs::Matrix => {
                let wt = Layout::contiguous((w[0], w[1])).transpose(0, 1)?;
                (self.product.plan(x_l, &wt)?, Prepacked::Rhs(slots))
            }
            Rhs::Patches { .. } => {
                let a = Layout::contiguous((w[0], w[1] * w[2] * w[3]));
                (self.product.plan(&a, x_l)?, Prepacked::Lhs(slots))
            }
        })
    }

    /// The product with the input `x` as the operand the weight is not: `A` of a linear layer,
    /// `B` (the image) of a convolution.
    fn storage<S: Source>(
        &self,
        plan: &Plan,
        x: &[S],
        packed: Prepacked,
    ) -> candle_core::Result<CpuStorage> {
        let (a, b): (&[S], &[S]) = match self.product.rhs {
            Rhs::Matrix => (x, &[]),
            Rhs::Patches { .. } => (&[], x),
        };
        self.product.storage(plan, a, b, packed)
    }
}

impl CustomOp1 for WeightProduct<'_> {
    fn name(&self) -> &'static str {
        "matmul-packed-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (plan, packed) = self.plan(l)?;
        let x0 = l.start_offset();
        let storage = match s {
            CpuStorage::BF16(x) if self.product.isa.dtype() == DType::BF16 => {
                self.storage(&plan, &x[x0..], packed)?
            }
            CpuStorage::F32(x) if self.product.isa.dtype() == DType::F32 => {
                self.storage(&plan, &x[x0..], packed)?
            }
            _ => bail!("matmul: the input of a packed weight must have the weight's dtype"),
        };
        Ok((storage, Shape::from(plan.shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs, max_abs_diff, test_input};

    fn f32(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// `t` in the dtype `isa` multiplies.
    fn cast(isa: Isa, t: &Tensor) -> Tensor {
        t.to_dtype(isa.dtype()).unwrap()
    }

    /// The relative error of `got` against the f32 product of the same inputs, which only the order
    /// of the f32 sums separates from the kernel's (and, for a bf16 output, its rounding), and the
    /// bound it must meet.
    fn relative(got: &Tensor, want: &Tensor) -> (f32, f32) {
        let bound = match got.dtype() {
            DType::BF16 => 8e-3,
            _ => 1e-5,
        };
        (max_abs_diff(&f32(got), want) / max_abs(want), bound)
    }

    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        let (err, bound) = relative(got, want);
        assert!(err < bound, "{what}: relative error {err} ≥ {bound}");
    }

    /// The instruction sets this machine runs: each is tested; the test asserts the check's answer
    /// where there is none.
    fn isas() -> Vec<Isa> {
        let isas: Vec<Isa> = [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512F]
            .into_iter()
            .filter(|i| i.supported())
            .collect();
        for dtype in [DType::BF16, DType::F32] {
            let t = test_input(&[2, 2], 0).to_dtype(dtype).unwrap();
            let runs = isas.iter().any(|i| i.dtype() == dtype);
            assert_eq!(available(&t), runs, "{dtype:?}");
            assert_eq!(matmul(&t, &t, 1.0, DType::F32).is_ok(), runs, "{dtype:?}");
        }
        assert!(!available(
            &test_input(&[2, 2], 0).to_dtype(DType::F16).unwrap()
        ));
        isas
    }

    #[test]
    fn matches_the_f32_product_at_awkward_sizes() {
        // Sizes around the blocks (MR 12, NR 32, KC 256 slots, AMX 32 rows and 16 pairs, MC 96,
        // NC 128), odd K, one row; last panels of 1, 8 and 12 columns (half a panel's products)
        // and of 18.
        for isa in isas() {
            for (m, k, n) in [
                (1, 1, 1),
                (13, 7, 33),
                (31, 64, 50),
                (97, 257, 129),
                (200, 320, 40),
                (5, 1000, 300),
            ] {
                let (a, b) = (
                    cast(isa, &test_input(&[m, k], 1)),
                    cast(isa, &test_input(&[k, n], 2)),
                );
                let want = f32(&a).matmul(&f32(&b)).unwrap();
                let got = matmul_on(isa, &a, &b, 1.0, DType::F32).unwrap();
                assert_eq!(got.dims(), &[m, n]);
                assert_close(&got, &want, &format!("{isa:?} {m}×{k}×{n}"));
                // A transposed right operand is read in place; α scales; a bf16 output is rounded
                // once.
                let bt = cast(isa, &test_input(&[n, k], 3));
                let want = (f32(&a).matmul(&f32(&bt).t().unwrap()).unwrap() * 0.5).unwrap();
                let got = matmul_on(isa, &a, &bt.t().unwrap(), 0.5, DType::BF16).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                assert_close(&got, &want, &format!("{isa:?} {m}×{k}×{n} transposed"));
                // A left operand whose rows lie `k + 5` apart, from an offset (f32: read in place).
                let a = cast(isa, &test_input(&[m, k + 5], 4))
                    .narrow(1, 2, k)
                    .unwrap();
                let want = f32(&a).matmul(&f32(&b)).unwrap();
                let got = matmul_on(isa, &a, &b, 1.0, DType::F32).unwrap();
                assert_close(&got, &want, &format!("{isa:?} {m}×{k}×{n} rows apart"));
            }
        }
    }

    #[test]
    fn operands_of_another_dtype_are_refused() {
        for isa in isas() {
            let other = match isa.dtype() {
                DType::F32 => DType::BF16,
                _ => DType::F32,
            };
            let a = test_input(&[3, 4], 1).to_dtype(other).unwrap();
            let err = matmul_on(isa, &a, &a.t().unwrap(), 1.0, DType::F32).unwrap_err();
            assert!(err.to_string().contains("operands"), "{isa:?}: {err}");
        }
    }

    #[test]
    fn batches_and_linear_layers_match_candle() {
        for isa in isas() {
            let (q, kt) = (
                cast(isa, &test_input(&[3, 50, 40], 4)),
                cast(isa, &test_input(&[3, 77, 40], 5)),
            );
            let want = f32(&q).matmul(&f32(&kt).transpose(1, 2).unwrap()).unwrap();
            let got = matmul_on(isa, &q, &kt.transpose(1, 2).unwrap(), 1.0, DType::F32).unwrap();
            assert_eq!(got.dims(), &[3, 50, 77]);
            assert_close(&got, &want, &format!("{isa:?}"));

            let (x, w, b) = (
                cast(isa, &test_input(&[2, 45, 70], 6)),
                cast(isa, &test_input(&[33, 70], 7)),
                cast(isa, &test_input(&[33], 8)),
            );
            let want = f32(&x)
                .broadcast_matmul(&f32(&w).t().unwrap())
                .unwrap()
                .broadcast_add(&f32(&b))
                .unwrap();
            let got = linear_on(isa, &x, &w, Some(&b)).unwrap();
            assert_eq!(got.dims(), &[2, 45, 33]);
            assert_eq!(got.dtype(), isa.dtype());
            assert_close(&got, &want, &format!("{isa:?} linear"));
        }
    }

    #[test]
    fn convolutions_match_candle_at_awkward_sizes() {
        // Kernel, stride, padding as the UNet and VAE use them, on sizes off the blocks; odd and
        // even channels (bf16's come in pairs where even), rows of the output longer and shorter
        // than a panel, padding at every edge.
        for isa in isas() {
            for (b, c, o, h, w, k, s, p) in [
                (2, 5, 7, 9, 13, 3, 1, 1),
                (2, 6, 9, 9, 13, 3, 1, 1),
                (1, 34, 33, 5, 45, 3, 1, 1),
                (1, 8, 5, 11, 10, 3, 2, 1),
                (1, 33, 17, 16, 15, 3, 2, 1),
                (1, 20, 40, 7, 5, 1, 1, 0),
                (1, 3, 2, 1, 1, 3, 1, 1),
                (1, 64, 130, 12, 11, 3, 2, 0),
            ] {
                let x = cast(isa, &test_input(&[b, c, h, w], 9));
                let g = cast(isa, &test_input(&[o, c, k, k], 10));
                let bias = cast(isa, &test_input(&[o], 11));
                let want = f32(&x)
                    .conv2d(&f32(&g), p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&f32(&bias).reshape((1, o, 1, 1)).unwrap())
                    .unwrap();
                let got = conv2d_on(isa, &x, &g, Some(&bias), s, p).unwrap();
                let what = format!("{isa:?} {c}→{o} k{k} s{s} p{p}");
                assert_eq!(got.dims(), want.dims(), "{what}");
                assert_close(&got, &want, &what);
            }
        }
    }

    #[test]
    fn amx_tiles_of_a_hold_its_pairs_and_zeros_elsewhere() {
        // Rows off the 32-row blocks, K off the 32-value steps, rows with a stride: every slot
        // written (the buffer is not zeroed first), the padding with zeros.
        let (m, k, a_row) = (37, 45, 50);
        let a: Vec<bf16> = (0..m * a_row).map(|i| bf16::from_f32(i as f32)).collect();
        let kp = Isa::Amx.slots(k);
        let got = pack_a_tiles(&Operands::lhs(&a, a_row, m, k), kp);
        assert_eq!(got.len(), 64 * kp);
        for (i, &slot) in got.iter().enumerate() {
            // [block of 16 rows][step of 16 slots][row][slot]
            let (block, rest) = (i / (16 * kp), i % (16 * kp));
            let (step, row, p) = (rest / 256, rest % 256 / 16, rest % 16);
            let (r, j) = (block * 16 + row, 2 * (step * 16 + p));
            let value = |j: usize| match r < m && j < k {
                true => a[r * a_row + j].to_bits() as u32,
                false => 0,
            };
            assert_eq!(
                slot,
                value(j) | value(j + 1) << 16,
                "row {r}, values {j}, {}",
                j + 1
            );
        }
    }

    #[test]
    fn a_geglu_projection_gives_the_gate_of_the_linear_layer() {
        // Inner widths of less than one block of 64 features, and of blocks and a part; K odd.
        for dtype in [DType::BF16, DType::F32] {
            if Isa::best(dtype).is_none() {
                continue;
            }
            for (rows, k, inner) in [(7, 33, 40), (2 * 45, 70, 200)] {
                let (x, w, b) = (
                    test_input(&[rows, k], 20).to_dtype(dtype).unwrap(),
                    test_input(&[2 * inner, k], 21).to_dtype(dtype).unwrap(),
                    test_input(&[2 * inner], 22).to_dtype(dtype).unwrap(),
                );
                let packed = PackedWeight::geglu(&w, &b).unwrap().unwrap();
                let got = packed.forward_geglu(&x).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[rows, inner][..], dtype));
                // The f32 gate of the f32 product: the same numbers in f32; in bf16 the output's
                // rounding (the unfused path also rounds `[h, g]`).
                let hg = linear(&f32(&x), &f32(&w), Some(&f32(&b))).unwrap();
                let want = crate::kernels::geglu::geglu(&hg).unwrap();
                let err = max_abs_diff(&f32(&got), &want) / max_abs(&want);
                let bound = if dtype == DType::F32 { 0.0 } else { 8e-3 };
                assert!(err <= bound, "{dtype:?} {rows}×{k}→{inner}: {err}");
            }
            // A gated weight is no linear layer, a plain one no GEGLU projection; halves must exist.
            let (w, b) = (
                test_input(&[10, 4], 1).to_dtype(dtype).unwrap(),
                test_input(&[10], 2).to_dtype(dtype).unwrap(),
            );
            let x = test_input(&[3, 4], 3).to_dtype(dtype).unwrap();
            let gated = PackedWeight::geglu(&w, &b).unwrap().unwrap();
            let err = gated.forward_linear(&x).unwrap_err().to_string();
            assert!(err.contains("GEGLU projection"), "{err}");
            let plain = PackedWeight::linear(&w, Some(&b)).unwrap().unwrap();
            let err = plain.forward_geglu(&x).unwrap_err().to_string();
            assert!(err.contains("not packed as a GEGLU"), "{err}");
            let odd = test_input(&[9, 4], 1).to_dtype(dtype).unwrap();
            let err = PackedWeight::geglu(&odd, &b.narrow(0, 0, 9).unwrap()).unwrap_err();
            assert!(err.to_string().contains("no halves"), "{err}");
        }
    }

    #[test]
    fn packed_weights_give_the_products_of_the_plain_ones() {
        // The best kernel of each dtype (the one a packed weight takes), awkward sizes: the same
        // packing, once at load instead of at every call, so the same bits.
        for dtype in [DType::BF16, DType::F32] {
            let Some(isa) = Isa::best(dtype) else {
                continue;
            };
            let (x, w, b) = (
                cast(isa, &test_input(&[2, 45, 70], 9)),
                cast(isa, &test_input(&[133, 70], 10)),
                cast(isa, &test_input(&[133], 11)),
            );
            let packed = PackedWeight::linear(&w, Some(&b)).unwrap().unwrap();
            let got = packed.forward_linear(&x).unwrap();
            let want = linear(&x, &w, Some(&b)).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            assert_eq!(
                max_abs_diff(&f32(&got), &f32(&want)),
                0.0,
                "{dtype:?} linear"
            );
            for (c, k, s, p) in [(5, 3, 1, 1), (5, 3, 2, 1), (5, 1, 1, 0), (6, 3, 1, 1)] {
                let (x, w, b) = (
                    cast(isa, &test_input(&[2, c, 17, 11], 12)),
                    cast(isa, &test_input(&[13, c, k, k], 13)),
                    cast(isa, &test_input(&[13], 14)),
                );
                let packed = PackedWeight::conv(&w, Some(&b)).unwrap().unwrap();
                let got = packed.forward_conv(&x, s, p).unwrap();
                let want = conv2d(&x, &w, Some(&b), s, p).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(
                    max_abs_diff(&f32(&got), &f32(&want)),
                    0.0,
                    "{dtype:?} conv {c} {k} {s} {p}"
                );
            }
            // An input of another dtype is refused, naming both.
            let other = x.to_dtype(if dtype == DType::F32 {
                DType::BF16
            } else {
                DType::F32
            });
            let err = packed
                .forward_linear(&other.unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains("packed for the CPU"), "{err}");
        }
    }

    #[test]
    fn probabilities_computed_into_tiles_are_those_of_the_online_softmax() {
        // Rows with a stride, `k` off the 16- and 32-value steps, `m` off the row blocks; running
        // maxima none (−∞), below the rows' own (within [`LAZY_MAX`] and far below), above them.
        // (The rows' own maxima lie above 0.5: `s · x` spans ±5.6.)
        let (m, k, a_row, n, s) = (37, 45, 50, 40, 0.7);
        let values: Vec<f32> = (test_input(&[m, a_row], 3) * 4.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max: Vec<f32> = (0..m)
            .map(|i| [f32::NEG_INFINITY, 0.5, 9.0, -100.0][i % 4])
            .collect();
        // A buffer reused from a larger block: its stale values must not show.
        let mut slots = Aligned::zeroed(0);
        slots.resize(4 * m * k);
        slots.iter_mut().for_each(|v| *v = 0x7f80_7f80);
        let Some((got, rows)) = PackedLhs::exp_bf16(&values, (m, k, a_row), s, &max, &mut slots)
        else {
            assert!(!Isa::Amx.supported());
            return;
        };
        let mut exps = values.clone();
        let (mut want_max, mut sums, mut rescale) = (max.clone(), vec![0.0; m], vec![0.0; m]);
        let state = (&mut want_max[..], &mut sums[..], &mut rescale[..]);
        crate::kernels::softmax::exp_rows_online(&mut exps, (m, k, a_row), s, state);
        for (i, &(row_max, block)) in rows.iter().enumerate() {
            // A running maximum is kept where the row's scores exceed it by a little (`s · x` ≤
            // 5.6 here, 7.4 in log₂ units above 0.5), the row's own taken where they exceed it by
            // far (e^105 would overflow f32) or where there is none.
            let m_i = match max[i] {
                0.5 => 0.5,
                _ => want_max[i],
            };
            assert_eq!(row_max, m_i, "row {i}");
            // The sums within the exponentials' relative 3·10⁻⁶ (and f32 summation orders).
            let want = sums[i] * (want_max[i] - m_i).exp();
            assert!(
                (block - want).abs() <= 5e-6 * want,
                "row {i}: {block} {want}"
            );
        }
        let want = PackedLhs::rounded_bf16(&exps, (m, k, a_row)).unwrap();
        let b: Vec<bf16> = test_input(&[k, n], 4)
            .to_dtype(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rhs = PackedRhs::new(&b, (n, 1), k, n).unwrap();
        let (step, ldc) = (row_step(DType::BF16).unwrap(), n.div_ceil(NR) * NR);
        let product = |a: &PackedLhs| {
            let mut c = vec![0f32; m.div_ceil(step) * step * ldc];
            a.multiply_raw(&rhs, &mut c, ldc);
            c.chunks(ldc)
                .take(m)
                .flat_map(|r| r[..n].to_vec())
                .collect::<Vec<_>>()
        };
        // Each row of `P V` over its own sum: the same whichever maximum the exponentials took.
        let normalised = |c: Vec<f32>, sums: &[f32]| {
            c.chunks(n)
                .zip(sums)
                .flat_map(|(r, s)| r.iter().map(move |v| v / s).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let got_sums: Vec<f32> = rows.iter().map(|r| r.1).collect();
        let (got, want) = (
            normalised(product(&got), &got_sums),
            normalised(product(&want), &sums),
        );
        assert!(got.iter().any(|&v| v != 0.0));
        // Rounded to bf16 alike but where an exponential lies within 3·10⁻⁶ of a rounding boundary
        // (or where a kept maximum moved the rounding): each such probability moves by one bf16
        // step (2⁻⁸ of it).
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(err <= 1e-2 * scale, "{err} of {scale}");
    }
}
