//! diffusers' `EulerDiscreteScheduler` without churn (Karras et al. 2022, "Elucidating the Design Space
//! of Diffusion-Based Generative Models", Algorithm 2 with γ = 0): Euler steps of the probability-flow
//! ODE in σ, on σ-scaled latents `x = x₀ + σ ε`.

use candle_core::Tensor;

use super::betas::{
    img2img_t_start, karras_sigmas, log_f32, np_arange_f64, np_interp_index, np_linspace, np_round,
    sigma_alphas_cumprod, sigma_to_t, sigmas_from_alphas_cumprod,
};
use super::{
    check_timestep, div_s, index_for_timestep, mul_s, to_f32, PredictionType, ResolvedConfig,
    ScheduleRequest, Scheduler, SchedulerKind, TimestepSpacing,
};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The Euler sampler.
#[derive(Debug)]
pub struct EulerScheduler {
    prediction_type: PredictionType,
    /// The full schedule's timesteps (float32 values as f64).
    all_timesteps: Vec<f64>,
    /// The visited ones (`all_timesteps[begin_index..]`).
    timesteps: Vec<f64>,
    /// σ for each timestep of the full schedule, then the final σ (0 or σ_min); float32.
    sigmas: Vec<f32>,
    begin_index: usize,
    step_index: usize,
    init_noise_sigma: f32,
    pred_original: Option<Tensor>,
}

impl EulerScheduler {
    /// `set_timesteps(steps)`: timesteps by `timestep_spacing` (linspace: `linspace(0, T−1, n)`
    /// descending, float32; leading: `i·(T/n) + steps_offset`; trailing: `round(arange(T, 0, −T/n)) − 1`),
    /// σ(t) = interpolation of √((1−ᾱ)/ᾱ) at the (possibly fractional) t, then a final σ of 0 (or σ_min);
    /// then img2img's `get_timesteps`: begin at index `steps − min(⌊steps·strength⌋, steps)`.
    pub fn new(cfg: &ResolvedConfig, req: &ScheduleRequest) -> Result<Self> {
        let ac = sigma_alphas_cumprod(&cfg.noise)?;
        let t = cfg.noise.num_train_timesteps;
        let n = req.steps;
        let ts32: Vec<f32> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n, true)
                .iter()
                .rev()
                .map(|&v| v as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (t / n) as f64;
                (0..n)
                    .rev()
                    .map(|i| np_round(i as f64 * ratio) as f32 + cfg.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange_f64(t as f64, 0.0, -(t as f64 / n as f64))
                .iter()
                .map(|&v| np_round(v) as f32 - 1.0)
                .collect(),
        };
        let base = sigmas_from_alphas_cumprod(&ac);
        let interp: Vec<f64> = ts32
            .iter()
            .map(|&x| np_interp_index(x as f64, &base))
            .collect();
        let (ts32, mut sigmas): (Vec<f32>, Vec<f32>) = if cfg.use_karras_sigmas {
            // σ from Karras et al.'s ρ-schedule between the interpolated end σs; timesteps back from σ.
            let log_sigmas = log_f32(&base);
            let k = karras_sigmas(interp[interp.len() - 1], interp[0], n);
            let ts = k
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
            (ts, k.iter().map(|&s| s as f32).collect())
        } else {
            (ts32, interp.iter().map(|&s| s as f32).collect())
        };
        let last = if cfg.final_sigma_min {
            ((1.0 - ac[0]) / ac[0]).sqrt()
        } else {
            0.0
        };
        sigmas.push(last);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match cfg.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        let all_timesteps: Vec<f64> = ts32.iter().map(|&v| v as f64).collect();
        let begin_index = img2img_t_start(n, req.strength)?;
        Ok(Self {
            prediction_type: cfg.prediction_type,
            timesteps: all_timesteps[begin_index..].to_vec(),
            all_timesteps,
            sigmas,
            begin_index,
            step_index: begin_index,
            init_noise_sigma,
            pred_original: None,
        })
    }

    /// Index into the full schedule for `add_noise` at `timestep`: the first visited timestep maps to
    /// the begin index (as after `set_begin_index`), any other to its place in the schedule.
    fn index_of(&self, timestep: f64) -> Result<usize> {
        if self.timesteps.first() == Some(&timestep) {
            return Ok(self.begin_index);
        }
        index_for_timestep(&self.all_timesteps, timestep)
            .ok_or_else(|| Error::invalid("timestep", format!("{timestep} is not in the schedule")))
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `max σ` for linspace/trailing spacing, `√(max σ² + 1)` for leading (float32).
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    /// `x / √(σ² + 1)` with σ of the current step.
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        check_timestep(timestep)?;
        let sigma = *self
            .sigmas
            .get(self.step_index)
            .ok_or_else(|| Error::invalid("timestep", "the schedule is already finished"))?;
        let dtype = sample.dtype();
        let out = div_s(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(out.to_dtype(dtype)?)
    }

    /// Euler step: x̂₀ = `x − σ ε` (ε), `x·1/(σ²+1) − v·σ/√(σ²+1)` (v), or the output (sample);
    /// `d = (x − x̂₀)/σ`, `x_next = x + d·(σ_next − σ)`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        check_timestep(timestep)?;
        if self.step_index + 1 >= self.sigmas.len() {
            return Err(Error::invalid(
                "timestep",
                "the schedule is already finished",
            ));
        }
        let out_dtype = model_output.dtype();
        let mo = to_f32(model_output)?;
        let x = to_f32(sample)?;
        let sigma = self.sigmas[self.step_index];
        let sigma_hat = sigma * (0.0 + 1.0);
        let x0 = match self.prediction_type {
            PredictionType::Sample => mo.clone(),
            PredictionType::Epsilon => (&x - mul_s(&mo, sigma_hat)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul_s(&mo, -sigma / s2.sqrt())? + div_s(&x, s2)?)?
            }
        };
        let derivative = div_s(&(&x - &x0)?, sigma_hat)?;
        let dt = self.sigmas[self.step_index + 1] - sigma_hat;
        let prev = (&x + mul_s(&derivative, dt)?)?;
        self.step_index += 1;
        self.pred_original = Some(x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// `x₀ + σₜ ε` (variance-exploding form).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        check_timestep(timestep)?;
        let sigma = self.sigmas[self.index_of(timestep)?];
        let dtype = original.dtype();
        let out = (to_f32(original)? + mul_s(&to_f32(noise)?, sigma)?)?;
        Ok(out.to_dtype(dtype)?)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.pred_original.as_ref()
    }
}
