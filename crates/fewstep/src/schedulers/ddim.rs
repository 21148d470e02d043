//! diffusers' `DDIMScheduler` with η = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models",
//! Eq. 12 without the stochastic term).

use candle_core::Tensor;

use super::betas::{alpha_at, alphas_cumprod, img2img_t_start, np_linspace, np_round};
use super::lcm::add_noise_vp;
use super::{
    check_timestep, div_s, mul_s, to_f32, PredictionType, ResolvedConfig, ScheduleRequest,
};
use super::{Scheduler, SchedulerKind, TimestepSpacing};
use crate::rng::TorchGenerator;
use crate::Result;

/// Deterministic DDIM.
#[derive(Debug)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    num_train_timesteps: usize,
    /// The schedule's length before `strength` (diffusers' `num_inference_steps`): the step between
    /// timesteps is `T / num_inference_steps`.
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    pred_original: Option<Tensor>,
}

/// The integer timesteps of `DDIMScheduler.set_timesteps(n)`:
/// linspace: `round(linspace(0, T−1, n))` descending; leading: `i · (T / n) + steps_offset`,
/// `i = n−1 … 0`; trailing: `round(arange(T, 0, −T/n)) − 1`.
pub fn ddim_timesteps(cfg: &ResolvedConfig, n: usize) -> Vec<i64> {
    let t = cfg.noise.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n, true)
            .iter()
            .rev()
            .map(|&v| np_round(v) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (t / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + cfg.steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            super::betas::np_arange_f64(t as f64, 0.0, -(t as f64 / n as f64))
                .iter()
                .map(|&v| np_round(v) as i64 - 1)
                .collect()
        }
    }
}

impl DdimScheduler {
    /// `set_timesteps(steps)` then img2img's `get_timesteps(steps, strength)`: the first
    /// `steps − min(⌊steps·strength⌋, steps)` timesteps are skipped.
    pub fn new(cfg: &ResolvedConfig, req: &ScheduleRequest) -> Result<Self> {
        let ac = alphas_cumprod(&cfg.noise)?;
        let n = req.steps;
        let all = ddim_timesteps(cfg, n);
        let t_start = img2img_t_start(n, req.strength)?;
        let timesteps: Vec<f64> = all[t_start..].iter().map(|&t| t as f64).collect();
        Ok(Self {
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            prediction_type: cfg.prediction_type,
            clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
            num_train_timesteps: cfg.noise.num_train_timesteps,
            num_inference_steps: n,
            timesteps,
            pred_original: None,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// DDIM (η = 0): with `t_prev = t − T/n`, x̂₀ and ε̂ from the prediction (ε: x̂₀ =
    /// `(x − √(1−ᾱₜ) ε)/√ᾱₜ`; sample: ε̂ = `(x − √ᾱₜ x̂₀)/√(1−ᾱₜ)`; v: x̂₀ = `√ᾱₜ x − √(1−ᾱₜ) v`,
    /// ε̂ = `√ᾱₜ v + √(1−ᾱₜ) x`), x̂₀ clipped if `clip_sample`, then
    /// `x_prev = √ᾱ_prev · x̂₀ + √(1 − ᾱ_prev) · ε̂` (ᾱ_prev = `final_alpha_cumprod` below 0).
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        check_timestep(timestep)?;
        let out_dtype = sample.dtype();
        let mo = to_f32(model_output)?;
        let x = to_f32(sample)?;
        let t = timestep as i64;
        let prev_t = t - (self.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, t)?;
        let a_prev = alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, prev_t)?;
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                div_s(&(&x - mul_s(&mo, b_t.sqrt())?)?, a_t.sqrt())?,
                mo.clone(),
            ),
            PredictionType::Sample => (
                mo.clone(),
                div_s(&(&x - mul_s(&mo, a_t.sqrt())?)?, b_t.sqrt())?,
            ),
            PredictionType::VPrediction => (
                (mul_s(&x, a_t.sqrt())? - mul_s(&mo, b_t.sqrt())?)?,
                (mul_s(&mo, a_t.sqrt())? + mul_s(&x, b_t.sqrt())?)?,
            ),
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        // std_dev_t = η·σₜ = 0, so the direction coefficient is √(1 − ᾱ_prev − 0²).
        let dir = mul_s(&eps, (1.0 - a_prev - 0.0f32).sqrt())?;
        let prev = (mul_s(&x0, a_prev.sqrt())? + dir)?;
        self.pred_original = Some(x0.to_dtype(out_dtype)?);
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// q(xₜ | x₀): `√ᾱₜ · x₀ + √(1 − ᾱₜ) · ε`.
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
        SchedulerKind::Ddim
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.pred_original.as_ref()
    }
}
