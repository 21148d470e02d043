//! A seeded random generator that reproduces PyTorch's CPU generator bit for bit, so that a seed gives the
//! same starting noise (and the same LCM step noise) as diffusers does on the CPU.
//!
//! What torch does (torch 2.x, `aten/src/ATen/core/MT19937RNGEngine.h`, `CPUGeneratorImpl`,
//! `aten/src/ATen/native/cpu/DistributionTemplates.h`), and what this module mirrors:
//!
//! * `manual_seed(seed)` seeds a 32-bit Mersenne Twister (MT19937) with the low 32 bits of the seed using
//!   the standard initialisation `mt[i] = 1812433253 · (mt[i-1] ⊕ (mt[i-1] >> 30)) + i`, and clears the
//!   cached second Box–Muller value.
//! * A `float` uniform in `[0, 1)` is `(r & (2²⁴ − 1)) · 2⁻²⁴` of one 32-bit draw `r`; a `double` uniform
//!   is `(r64 & (2⁵³ − 1)) · 2⁻⁵³` where `r64 = (r₁ << 32) | r₂` joins two consecutive draws.
//! * `randn` of a contiguous float32 tensor with `n ≥ 16` elements first fills all `n` slots with float
//!   uniforms, then transforms them in blocks of 16 with Box–Muller, pairing element `j` with `j + 8`:
//!   `u₁ = 1 − d[j]`, `u₂ = d[j+8]`, `ρ = √(−2 ln u₁)`, `θ = 2π u₂`, `d[j] = ρ cos θ`, `d[j+8] = ρ sin θ`.
//!   When `n` is not a multiple of 16, the last 16 slots are refilled with 16 fresh uniforms and
//!   transformed again (overwriting values already computed). On x86-64 builds with AVX2 (the build torch
//!   ships and picks at run time), `ln`, `sin` and `cos` are the single-precision Cephes polynomials of
//!   `avx_mathfun.h`, compiled with fused multiply–adds; they are reproduced here in scalar code with the
//!   same operation order and the same fusions, so the results are identical to the last bit.
//! * `randn` with `n < 16` elements draws each value with `normal_distribution<double>`: if a cached value
//!   exists it is returned (and the cache cleared); otherwise two double uniforms `u₁, u₂` give
//!   `ρ = √(−2 ln(1 − u₂))`, `θ = 2π u₁`, the value `ρ cos θ` is returned and `ρ sin θ` is cached (in the
//!   generator, so it carries across calls). The double is then rounded to float32.

use candle_core::{DType, Device, Tensor};

use crate::Result;

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The 32-bit Mersenne Twister MT19937, seeded as torch's `at::mt19937`.
#[derive(Clone, Debug)]
struct Mt19937 {
    state: [u32; MT_N],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    /// Regenerates the 624 words of state (the "twist").
    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output.
    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A generator equal to `torch.Generator("cpu").manual_seed(seed)`: the same seed gives the same
/// sequence of `torch.randn` draws (float32, bit for bit), with state carried from one call to the next.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// The second Box–Muller value of `normal_distribution<double>`, kept for the next scalar draw.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: MT19937 seeded with the low 32 bits of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// One 32-bit draw (torch's `random()`).
    fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: `(r & (2²⁴−1)) · 2⁻²⁴`, in `[0, 1)`.
    fn uniform_f32(&mut self) -> f32 {
        let r = self.random() & ((1 << 24) - 1);
        r as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: `(r64 & (2⁵³−1)) · 2⁻⁵³` with
    /// `r64 = (r₁ << 32) | r₂`, in `[0, 1)`.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        let r = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        r as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's `normal_distribution<double>(0, 1)` (Box–Muller with a cached second value):
    /// `ρ = √(−2 ln(1 − u₂))`, `θ = 2π u₁`; returns `ρ cos θ`, caches `ρ sin θ`.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(shape, generator=g)` in float32, bit for bit (see the module documentation for the
    /// two paths torch takes, by element count).
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut i = 0;
        while i + 16 <= n {
            box_muller_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=g, dtype=float16)` bit for bit, as `f16` bits widened to `f32`.
    /// See [`TorchGenerator::randn_half`].
    pub fn randn_f16(&mut self, shape: &[usize]) -> Vec<half::f16> {
        self.randn_half(shape, HalfKind::F16)
            .into_iter()
            .map(half::f16::from_f32)
            .collect()
    }

    /// `torch.randn(shape, generator=g, dtype=bfloat16)` bit for bit.
    /// See [`TorchGenerator::randn_half`].
    pub fn randn_bf16(&mut self, shape: &[usize]) -> Vec<half::bf16> {
        self.randn_half(shape, HalfKind::Bf16)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect()
    }

    /// What `torch.randn(..., dtype=float16 | bfloat16)` does on the CPU (e.g. diffusers' `randn_tensor`
    /// with a CPU generator in a half-precision pipeline), found by comparison with torch 2.15: with
    /// `n ≥ 16`, only the `16·⌊n/16⌋` elements of the full blocks get float uniforms first (not all `n`
    /// as in float32); the blocks go through the same float32 Box–Muller as
    /// [`TorchGenerator::randn`]; a partial tail then refills the last 16 elements with 16 fresh
    /// uniforms and transforms them; every value is finally rounded (to nearest, ties to even) to the
    /// 16-bit type. With `n < 16` it is the double Box–Muller path, rounded to float32 then to the type.
    /// Values are returned as float32, exactly representable in the 16-bit type.
    fn randn_half(&mut self, shape: &[usize], kind: HalfKind) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let round = |x: f32| kind.round(x);
        if n < 16 {
            return (0..n).map(|_| round(self.normal_f64() as f32)).collect();
        }
        let full = n / 16 * 16;
        let mut data = vec![0f32; n];
        for v in data[..full].iter_mut() {
            *v = self.uniform_f32();
        }
        for block in data[..full].chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if full != n {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data.into_iter().map(round).collect()
    }

    /// `torch.randn(shape, generator=g, dtype=dtype)` on the CPU, bit for bit, for float32, float16 and
    /// bfloat16 (each has its own path in torch; other dtypes draw float32 and convert), then moved to
    /// `device`. This is exactly what diffusers' `randn_tensor` does with a CPU generator, including for
    /// half-precision pipelines.
    pub fn randn_like_torch(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match dtype {
            DType::F16 => Tensor::from_vec(self.randn_f16(shape), shape, &Device::Cpu)?,
            DType::BF16 => Tensor::from_vec(self.randn_bf16(shape), shape, &Device::Cpu)?,
            _ => Tensor::from_vec(self.randn(shape), shape, &Device::Cpu)?.to_dtype(dtype)?,
        };
        Ok(t.to_device(device)?)
    }

    /// Standard-normal noise as a tensor: draws float32 on the CPU with [`TorchGenerator::randn`], then
    /// converts to `dtype` and moves to `device`. This equals diffusers' `randn_tensor` whenever diffusers
    /// draws in float32 (float32 pipelines); for torch's own float16/bfloat16 draws use
    /// [`TorchGenerator::randn_like_torch`].
    pub fn randn_tensor(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let data = self.randn(shape);
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The 16-bit float types torch's generic normal fill runs in.
#[derive(Clone, Copy)]
enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    /// Rounds a float32 to the nearest value of the type (ties to even), returned as float32.
    fn round(self, x: f32) -> f32 {
        match self {
            HalfKind::F16 => half::f16::from_f32(x).to_f32(),
            HalfKind::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Box–Muller on 16 uniforms in place, pairing `j` with `j + 8` (torch's `normal_fill_16_AVX2`):
/// `d[j] = √(−2 ln(1 − d[j])) cos(2π d[j+8])`, `d[j+8] = √(−2 ln(1 − d[j])) sin(2π d[j+8])`,
/// all in float32 with the Cephes `ln`/`sincos` of `avx_mathfun.h`.
fn box_muller_16(d: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * cephes_logf(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = cephes_sincosf(theta);
        // torch stores fmadd(n, std = 1, mean = 0): `+ 0.0` turns a −0 into +0 exactly as that does.
        d[j] = radius * c + 0.0;
        d[j + 8] = radius * s + 0.0;
    }
}

/// Natural logarithm of `log256_ps` (Cephes `logf`): `x = m · 2^e` with `m ∈ [√½, √2)`, then
/// `ln x = (m−1) + P(m−1)·(m−1)³ − (m−1)²/2 + e·ln 2` with `ln 2` split as `0.693359375 − 2.12194440e−4`.
/// Valid for the normal positive inputs Box–Muller gives it (`1 − u ∈ (0, 1]`).
#[allow(clippy::excessive_precision)]
fn cephes_logf(x: f32) -> f32 {
    // Cephes SQRTHF = √½ (0.707106781186547524).
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    // Mantissa scaled into [0.5, 1).
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let (mut x, below) = (m, m < SQRTHF);
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(x, *p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    x += y;
    e.mul_add(Q2, x)
}

/// `sincos256_ps` (Cephes `sinf`/`cosf`): reduce `|x|` by multiples of π/4 (`j = (⌊|x|·4/π⌋ + 1) & ~1`,
/// `x' = |x| − j·π/4` with π/4 split in three parts), evaluate the sine and cosine polynomials on
/// `x'`, and pick / sign them by the octant `j`. Returns `(sin x, cos x)`.
#[allow(clippy::excessive_precision)]
fn cephes_sincosf(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const SIN_P: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COS_P: [f32; 3] = [
        2.443315711809948E-5,
        -1.388731625493765E-3,
        4.166664568298827E-2,
    ];
    let sign_in = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    let mut j = (ax * FOPI) as i32;
    j = (j + 1) & !1;
    let yq = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    let mut r = yq.mul_add(DP1, ax);
    r = yq.mul_add(DP2, r);
    r = yq.mul_add(DP3, r);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sin;
    let z = r * r;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]);
    yc = yc.mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]);
    ys = ys.mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(r, r);
    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}
