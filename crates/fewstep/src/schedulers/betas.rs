//! The noise schedule shared by every scheduler: βₜ, αₜ = 1 − βₜ and ᾱₜ = ∏ₛ≤ₜ αₛ (`alphas_cumprod`),
//! computed with diffusers' float32 arithmetic, plus the numpy-compatible helpers the schedulers use to
//! place their timesteps (`np.linspace`, `np.arange` with a float step, `np.round`, `np.interp`).

use crate::{Error, Result};

/// Which β schedule (`beta_schedule` in the config file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// βₜ linear from `beta_start` to `beta_end` (`torch.linspace` in float32).
    Linear,
    /// βₜ = (linear from √`beta_start` to √`beta_end`)², Stable Diffusion's schedule.
    ScaledLinear,
    /// Nichol & Dhariwal's cosine schedule: βₜ = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with
    /// ᾱ(t) = cos²(((t/T) + 0.008)/1.008 · π/2) (`betas_for_alpha_bar`).
    SquaredCosCapV2,
}

impl BetaSchedule {
    /// Parses the config value; an unknown value names the field.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredCosCapV2),
            other => Err(Error::invalid(
                "beta_schedule",
                format!(
                    "unknown value `{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"
                ),
            )),
        }
    }
}

/// Everything that determines the β schedule.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU, value for value: the endpoints are
/// rounded to float32, `step = (end − start)/(steps − 1)` in float32; index `i` below `steps/2` is
/// `start + step·i`, the others `end − step·(steps − 1 − i)`, each a single fused multiply–add (torch's
/// x86-64 build contracts these expressions into FMAs), so both endpoints are exact.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 0 {
        return vec![];
    }
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// βₜ in float32 as diffusers builds them (`trained_betas`, `linear`, `scaled_linear`,
/// `squaredcos_cap_v2`), then `rescale_zero_terminal_snr` if asked (Lin et al. 2023, Algorithm 1:
/// shift and scale √ᾱ so that √ᾱ_T = 0 while √ᾱ₀ is unchanged, then undo the cumulative product).
pub fn betas(s: &NoiseSchedule) -> Result<Vec<f32>> {
    let n = s.num_train_timesteps;
    if n == 0 {
        return Err(Error::invalid("num_train_timesteps", "must be at least 1"));
    }
    let mut betas: Vec<f32> = if let Some(tb) = &s.trained_betas {
        if tb.len() != n {
            return Err(Error::invalid(
                "trained_betas",
                format!("has {} values, num_train_timesteps is {n}", tb.len()),
            ));
        }
        if tb.iter().any(|b| !b.is_finite()) {
            return Err(Error::invalid(
                "trained_betas",
                "contains a non-finite value",
            ));
        }
        tb.iter().map(|&b| b as f32).collect()
    } else {
        for (name, v) in [("beta_start", s.beta_start), ("beta_end", s.beta_end)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(
                    name,
                    format!("must be a finite value ≥ 0, got {v}"),
                ));
            }
        }
        match s.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(s.beta_start, s.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(s.beta_start.sqrt(), s.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    };
    if s.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    Ok(betas)
}

/// `torch.cumprod` of a float32 vector on the CPU: the running product is kept in double and each
/// partial product rounded to float32.
pub fn cumprod_f32(v: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    v.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1, in
/// float32: √ᾱ ← (√ᾱ − √ᾱ_T) · √ᾱ₀ / (√ᾱ₀ − √ᾱ_T); ᾱ ← (√ᾱ)²; αₜ = ᾱₜ/ᾱₜ₋₁ (α₀ = ᾱ₀); β = 1 − α.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sq: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let a0 = sq[0];
    let at = sq[sq.len() - 1];
    let scale = a0 / (a0 - at);
    for v in sq.iter_mut() {
        *v -= at;
        *v *= scale;
    }
    let bar: Vec<f32> = sq.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// ᾱₜ (`alphas_cumprod`, float32) for a schedule.
pub fn alphas_cumprod(s: &NoiseSchedule) -> Result<Vec<f32>> {
    let alphas: Vec<f32> = betas(s)?.iter().map(|b| 1.0 - b).collect();
    Ok(cumprod_f32(&alphas))
}

/// The Karras-style noise levels σₜ = √((1 − ᾱₜ)/ᾱₜ), in float32 as the torch expression computes them.
pub fn sigmas_from_alphas_cumprod(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num, endpoint)` in float64: `start + i·step`, `step = (stop − start)/div`
/// with `div = num − 1` (endpoint) or `num`; with `endpoint` the last value is exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div == 0 {
        (0..num).map(|i| i as f64 * delta + start).collect()
    } else {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num)
                .map(|i| (i as f64 / div as f64) * delta + start)
                .collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    };
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with float64 values: `len = ⌈(stop − start)/step⌉`,
/// values `start + i·δ` with `δ = (start + step) − start` (numpy fills from the first two values).
pub fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` (round half to even).
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, [0, 1, …, n−1], fp)` in float64: `fp[j] + (fp[j+1] − fp[j])·(x − j)` for
/// `j ≤ x < j+1`, clamped to the end values outside the range.
pub fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Validates img2img `strength` and returns `t_start`, the number of leading steps to skip, as
/// diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps` does:
/// `init = min(⌊steps·strength⌋, steps)`, `t_start = max(steps − init, 0)`.
pub fn img2img_t_start(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let init = ((steps as f64 * strength) as usize).min(steps);
    if init == 0 {
        return Err(Error::invalid(
            "strength",
            format!("{strength} with {steps} steps leaves no denoising step (need steps × strength ≥ 1)"),
        ));
    }
    Ok(steps - init)
}

/// `strength` must be a number in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if strength.is_nan() || strength <= 0.0 || strength > 1.0 {
        return Err(Error::invalid(
            "strength",
            format!("must be in (0, 1], got {strength}"),
        ));
    }
    Ok(())
}

/// Karras et al. 2022 (Eq. 5) noise levels, as diffusers' `_convert_to_karras` (ρ = 7, float64):
/// `σᵢ = (σ_max^{1/ρ} + rampᵢ·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ` with `ramp = linspace(0, 1, n)`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n, true)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose σ is `sigma`, by linear
/// interpolation in log σ between the neighbouring training σs (`log_sigmas` = ln σₜ, float32, rising).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Last index with log_sigmas[i] <= log_sigma (0 if none), at most n − 2.
    let mut low = 0;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n.saturating_sub(2));
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `np.log` of a float32 array: ln in float32 (computed in double and rounded).
pub fn log_f32(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| (x as f64).ln() as f32).collect()
}

/// ᾱ at training timestep `t`; below 0 (the step after the last) the schedule's `final_alpha_cumprod`
/// (1 with `set_alpha_to_one`, else ᾱ₀), as DDIM and LCM define `alpha_prod_t_prev`.
pub fn alpha_at(alphas_cumprod: &[f32], final_alpha_cumprod: f32, t: i64) -> Result<f32> {
    if t < 0 {
        return Ok(final_alpha_cumprod);
    }
    alphas_cumprod
        .get(t as usize)
        .copied()
        .ok_or_else(|| Error::invalid("timestep", format!("{t} is outside the training schedule")))
}

/// ᾱ for the σ-parameterised schedulers (Euler, DPM-Solver): as [`alphas_cumprod`], except that with
/// zero-terminal-SNR rescaling the last ᾱ (exactly 0) becomes 2⁻²⁴ so that σ = √((1−ᾱ)/ᾱ) stays finite,
/// as diffusers does.
pub fn sigma_alphas_cumprod(s: &NoiseSchedule) -> Result<Vec<f32>> {
    let mut ac = alphas_cumprod(s)?;
    if s.rescale_betas_zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}
