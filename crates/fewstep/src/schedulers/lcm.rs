//! diffusers' `LCMScheduler` (Luo et al. 2023, "Latent Consistency Models", Algorithm 3: multistep
//! latent consistency sampling).

use candle_core::Tensor;

use super::betas::{alpha_at, alphas_cumprod, np_linspace};
use super::{
    check_timestep, div_s, mul_s, to_f32, PredictionType, ResolvedConfig, ScheduleRequest,
};
use super::{Scheduler, SchedulerKind};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The consistency model's data standard deviation σ_data in the boundary-condition scalings.
pub const SIGMA_DATA: f32 = 0.5;

/// The boundary-condition scalings (`get_scalings_for_boundary_condition_discrete`), with
/// `s = t · timestep_scaling` in f32: `c_skip = σ_data²/(s² + σ_data²)`, `c_out = s/√(s² + σ_data²)`.
/// At t = 0, `c_skip = 1` and `c_out = 0`: `f(x, 0) = x`.
pub fn boundary_scalings(timestep: f64, timestep_scaling: f64) -> (f32, f32) {
    let s = (timestep * timestep_scaling) as f32;
    let sd2 = SIGMA_DATA * SIGMA_DATA;
    let denom = s * s + sd2;
    (sd2 / denom, s / denom.sqrt())
}

/// The LCM sampler: at each timestep the consistency function maps xₜ to x̂₀ (`denoised`), then fresh
/// noise brings it back to the next (smaller) timestep, except after the last step.
#[derive(Debug)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    timestep_scaling: f64,
    clip_sample: Option<f32>,
    /// Visited timesteps (integers, stored as f64).
    timesteps: Vec<f64>,
    /// diffusers' `num_inference_steps`: the number of steps asked for (for custom timesteps, their
    /// count before `strength` trims them). The last step injects no noise when
    /// `step_index == num_inference_steps − 1`.
    num_inference_steps: usize,
    step_index: usize,
    denoised: Option<Tensor>,
}

impl LcmScheduler {
    /// `LCMScheduler.set_timesteps(steps, original_inference_steps, timesteps, strength)`:
    /// with `k = T / original_steps` (integer division), the distillation schedule is
    /// `tᵢ = i·k − 1` for `i = 1 … ⌊original_steps · strength⌋`, taken in descending order; the
    /// `steps` timesteps are its entries at indices `⌊j · len / steps⌋`, `j = 0 … steps−1`.
    /// Custom timesteps must descend and start below T; `strength` then keeps their last
    /// `min(⌊n·strength⌋, n)`.
    pub fn new(cfg: &ResolvedConfig, req: &ScheduleRequest) -> Result<Self> {
        let ac = alphas_cumprod(&cfg.noise)?;
        let t_train = cfg.noise.num_train_timesteps;
        let original_steps = req
            .original_inference_steps
            .unwrap_or(cfg.original_inference_steps);
        if original_steps == 0 {
            return Err(Error::invalid(
                "original_inference_steps",
                "must be at least 1",
            ));
        }
        if original_steps > t_train {
            return Err(Error::invalid(
                "original_inference_steps",
                format!("{original_steps} is more than num_train_timesteps ({t_train})"),
            ));
        }
        super::betas::check_strength(req.strength)?;
        let strength = req.strength;
        let k = t_train / original_steps;
        let origin_len = (original_steps as f64 * strength) as usize;
        // lcm_origin_timesteps = [1..=origin_len] · k − 1, ascending.
        let origin: Vec<i64> = (1..=origin_len as i64).map(|i| i * k as i64 - 1).collect();

        let (timesteps, num_inference_steps) = if let Some(custom) = &req.custom_timesteps {
            if custom.is_empty() {
                return Err(Error::invalid("custom_timesteps", "is empty"));
            }
            for w in custom.windows(2) {
                if w[1] >= w[0] {
                    return Err(Error::invalid(
                        "custom_timesteps",
                        "must be in descending order",
                    ));
                }
            }
            if custom[0] >= t_train {
                return Err(Error::invalid(
                    "custom_timesteps",
                    format!(
                        "must start below num_train_timesteps ({t_train}), got {}",
                        custom[0]
                    ),
                ));
            }
            let n = custom.len();
            let init = ((n as f64 * strength) as usize).min(n);
            let t_start = n - init;
            if t_start >= n {
                return Err(Error::invalid(
                    "strength",
                    format!("{strength} with {n} custom timesteps leaves no denoising step"),
                ));
            }
            let ts: Vec<f64> = custom[t_start..].iter().map(|&t| t as f64).collect();
            (ts, n)
        } else {
            let steps = req.steps;
            if steps == 0 {
                return Err(Error::invalid("steps", "must be at least 1"));
            }
            if steps > t_train {
                return Err(Error::invalid(
                    "steps",
                    format!("{steps} is more than num_train_timesteps ({t_train})"),
                ));
            }
            if steps > original_steps {
                return Err(Error::invalid(
                    "steps",
                    format!(
                        "{steps} is more than original_inference_steps ({original_steps}): LCM picks its \
                         timesteps from that schedule"
                    ),
                ));
            }
            if origin_len == 0 {
                return Err(Error::invalid(
                    "strength",
                    format!(
                        "{strength} is too small: original_inference_steps × strength = \
                         {original_steps} × {strength} leaves no timestep"
                    ),
                ));
            }
            if origin_len / steps < 1 {
                return Err(Error::invalid(
                    "steps",
                    format!(
                        "{steps} is more than original_inference_steps × strength = {original_steps} × \
                         {strength} = {origin_len} timesteps; lower steps or raise strength"
                    ),
                ));
            }
            let desc: Vec<i64> = origin.iter().rev().copied().collect();
            let idx = np_linspace(0.0, desc.len() as f64, steps, false);
            let ts: Vec<f64> = idx
                .iter()
                .map(|&i| desc[i.floor() as usize] as f64)
                .collect();
            (ts, steps)
        };
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        Ok(Self {
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prediction_type: cfg.prediction_type,
            timestep_scaling: cfg.timestep_scaling,
            clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
            timesteps,
            num_inference_steps,
            step_index: 0,
            denoised: None,
        })
    }

    /// The boundary-condition scalings of the consistency function
    /// `f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t)` (`get_scalings_for_boundary_condition_discrete`),
    /// with `s = t · timestep_scaling` in float32: `c_skip = σ_data²/(s² + σ_data²)`,
    /// `c_out = s/√(s² + σ_data²)`.
    pub fn boundary_scalings(&self, timestep: f64) -> (f32, f32) {
        boundary_scalings(timestep, self.timestep_scaling)
    }

    /// x̂₀ from the last step (diffusers' `LCMSchedulerOutput.denoised`).
    pub fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// One LCM step: x̂₀ from the prediction (ε: `(x − √(1−ᾱₜ) ε)/√ᾱₜ`; v: `√ᾱₜ x − √(1−ᾱₜ) v`;
    /// sample: the output itself), clipped if `clip_sample`; `denoised = c_out·x̂₀ + c_skip·x`;
    /// then, unless this is the last step, `x_prev = √ᾱ_prev · denoised + √(1−ᾱ_prev) · z` with
    /// `z ~ N(0, I)` drawn from `rng` in the model output's shape; after the last step `x_prev = denoised`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        check_timestep(timestep)?;
        let out_dtype = sample.dtype();
        let mo = to_f32(model_output)?;
        let x = to_f32(sample)?;
        let t = timestep as i64;
        let prev_index = self.step_index + 1;
        let prev_t = if prev_index < self.timesteps.len() {
            self.timesteps[prev_index] as i64
        } else {
            t
        };
        let a_t = alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, t)?;
        let a_prev = alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, prev_t)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let mut x0 = match self.prediction_type {
            PredictionType::Epsilon => div_s(&(&x - mul_s(&mo, b_t.sqrt())?)?, a_t.sqrt())?,
            PredictionType::Sample => mo.clone(),
            PredictionType::VPrediction => (mul_s(&x, a_t.sqrt())? - mul_s(&mo, b_t.sqrt())?)?,
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = (mul_s(&x0, c_out)? + mul_s(&x, c_skip)?)?;
        let prev = if self.step_index + 1 != self.num_inference_steps {
            let noise = rng.randn_tensor(mo.dims(), mo.dtype(), mo.device())?;
            (mul_s(&denoised, a_prev.sqrt())? + mul_s(&noise, b_prev.sqrt())?)?
        } else {
            denoised.clone()
        };
        self.step_index += 1;
        self.denoised = Some(denoised.to_dtype(out_dtype)?);
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// q(xₜ | x₀): `√ᾱₜ · x₀ + √(1 − ᾱₜ) · ε` (DDPM forward process).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_vp(
            original,
            noise,
            &self.alphas_cumprod,
            self.final_alpha_cumprod,
            timestep,
        )
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
}

/// Variance-preserving forward diffusion at training timestep `timestep` of the schedule
/// `alphas_cumprod`: `√ᾱ · x₀ + √(1 − ᾱ) · ε`, in float32 then cast back (DDIM's and LCM's `add_noise`).
pub(crate) fn add_noise_vp(
    original: &Tensor,
    noise: &Tensor,
    alphas_cumprod: &[f32],
    final_alpha_cumprod: f32,
    timestep: f64,
) -> Result<Tensor> {
    check_timestep(timestep)?;
    let alpha_cumprod = alpha_at(alphas_cumprod, final_alpha_cumprod, timestep as i64)?;
    let dtype = original.dtype();
    let x = to_f32(original)?;
    let n = to_f32(noise)?;
    let out = (mul_s(&x, alpha_cumprod.sqrt())? + mul_s(&n, (1.0 - alpha_cumprod).sqrt())?)?;
    Ok(out.to_dtype(dtype)?)
}
