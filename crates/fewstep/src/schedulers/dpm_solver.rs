//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (Lu et al. 2022,
//! "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2,
//! the multistep data-prediction solver; "DPM++ 2M" with the default order 2).

use candle_core::Tensor;

use super::betas::{img2img_t_start, np_arange_f64, np_linspace, np_round, sigma_alphas_cumprod};
use super::{
    check_timestep, div_s, index_for_timestep, mul_s, to_f32, PredictionType, ResolvedConfig,
    ScheduleRequest, Scheduler, SchedulerKind, TimestepSpacing,
};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The DPM-Solver++ multistep sampler.
#[derive(Debug)]
pub struct DpmSolverScheduler {
    prediction_type: PredictionType,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    all_timesteps: Vec<f64>,
    timesteps: Vec<f64>,
    /// σ per timestep of the full schedule, then the final σ; float32.
    sigmas: Vec<f32>,
    begin_index: usize,
    step_index: usize,
    /// The last `solver_order` converted model outputs (x̂₀ predictions), oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// `(αₜ, σₜ)` of the VP process from the VE noise level σ: `αₜ = 1/√(σ² + 1)`, `σₜ = σ·αₜ` (float32).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// λ = ln αₜ − ln σₜ (half log-SNR).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverScheduler {
    /// `set_timesteps(steps)`: integer timesteps by `timestep_spacing` over `last = T` (linspace:
    /// `round(linspace(0, T−1, n+1))` descending without the final 0; leading: `i·(T/(n+1)) +
    /// steps_offset`, `i = n … 1`; trailing: `round(arange(T, 0, −T/n)) − 1`), σ(t) = √((1−ᾱₜ)/ᾱₜ),
    /// a final σ of 0 (`final_sigmas_type = "zero"`) or σ_min; then img2img's `get_timesteps`.
    pub fn new(cfg: &ResolvedConfig, req: &ScheduleRequest) -> Result<Self> {
        let ac = sigma_alphas_cumprod(&cfg.noise)?;
        let t = cfg.noise.num_train_timesteps;
        let n = req.steps;
        let last_timestep = t; // lambda_min_clipped = −∞ keeps every training timestep.
        let ts: Vec<i64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let v = np_linspace(0.0, (last_timestep - 1) as f64, n + 1, true);
                v.iter()
                    .rev()
                    .take(n)
                    .map(|&x| np_round(x) as i64)
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (last_timestep / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + cfg.steps_offset as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange_f64(last_timestep as f64, 0.0, -(t as f64 / n as f64))
                    .iter()
                    .map(|&x| np_round(x) as i64 - 1)
                    .collect()
            }
        };
        let base = super::betas::sigmas_from_alphas_cumprod(&ac);
        let (ts, mut sigmas): (Vec<i64>, Vec<f32>) = if cfg.use_karras_sigmas {
            // Karras et al.'s ρ-schedule between the training σ extremes; timesteps back from σ,
            // rounded (except for squaredcos_cap_v2, where diffusers keeps them fractional and then
            // truncates them to integers).
            let log_sigmas = super::betas::log_f32(&base);
            let k = super::betas::karras_sigmas(base[0] as f64, base[base.len() - 1] as f64, n);
            let round = cfg.noise.beta_schedule != super::betas::BetaSchedule::SquaredCosCapV2;
            let ts = k
                .iter()
                .map(|&s| {
                    let t = super::betas::sigma_to_t(s, &log_sigmas);
                    if round {
                        np_round(t) as i64
                    } else {
                        t as i64
                    }
                })
                .collect();
            (ts, k.iter().map(|&s| s as f32).collect())
        } else {
            let mut sigmas = Vec::with_capacity(ts.len() + 1);
            for &ti in &ts {
                let s = usize::try_from(ti)
                    .ok()
                    .and_then(|i| base.get(i))
                    .ok_or_else(|| {
                        Error::invalid(
                            "steps",
                            format!("timestep {ti} is outside the training schedule"),
                        )
                    })?;
                sigmas.push(*s);
            }
            (ts, sigmas)
        };
        sigmas.push(if cfg.final_sigma_min {
            ((1.0 - ac[0]) / ac[0]).sqrt()
        } else {
            0.0
        });
        let all_timesteps: Vec<f64> = ts.iter().map(|&v| v as f64).collect();
        let begin_index = img2img_t_start(all_timesteps.len(), req.strength)?;
        Ok(Self {
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order,
            heun: cfg.solver_type_heun,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero: !cfg.final_sigma_min,
            timesteps: all_timesteps[begin_index..].to_vec(),
            all_timesteps,
            sigmas,
            begin_index,
            step_index: begin_index,
            model_outputs: vec![None; cfg.solver_order],
            lower_order_nums: 0,
        })
    }

    /// `convert_model_output` for dpmsolver++: the data prediction x̂₀ (ε: `(x − σₜ ε)/αₜ`;
    /// v: `αₜ x − σₜ v`; sample: the output).
    fn convert(&self, mo: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[self.step_index]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => div_s(&(x - mul_s(mo, s)?)?, a)?,
            PredictionType::Sample => mo.clone(),
            PredictionType::VPrediction => (mul_s(x, a)? - mul_s(mo, s)?)?,
        })
    }

    /// First order (DDIM-like): `x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) D₀`, `h = λ_t − λ_s`.
    fn first_order(&self, m0: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (a_t, s_t) = alpha_sigma(self.sigmas[self.step_index + 1]);
        let (a_s, s_s) = alpha_sigma(self.sigmas[self.step_index]);
        let h = lambda(a_t, s_t) - lambda(a_s, s_s);
        Ok((mul_s(x, s_t / s_s)? - mul_s(m0, a_t * ((-h).exp() - 1.0))?)?)
    }

    /// Second order multistep: `r₀ = h₀/h`, `D₀ = m₀`, `D₁ = (m₀ − m₁)/r₀`; midpoint:
    /// `x_t = (σ_t/σ_s₀) x − α_t(e^{−h} − 1) D₀ − ½ α_t(e^{−h} − 1) D₁`; heun:
    /// `… + α_t((e^{−h} − 1)/h + 1) D₁`.
    fn second_order(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let (m0, m1) = match (&self.model_outputs[k - 1], &self.model_outputs[k - 2]) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(Error::invalid("step", "missing previous model output")),
        };
        let i = self.step_index;
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let (a_s0, s_s0) = alpha_sigma(self.sigmas[i]);
        let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (l_t, l_s0, l_s1) = (lambda(a_t, s_t), lambda(a_s0, s_s0), lambda(a_s1, s_s1));
        let h = l_t - l_s0;
        let h0 = l_s0 - l_s1;
        let r0 = h0 / h;
        let d1 = mul_s(&(m0 - m1)?, 1.0 / r0)?;
        let em1 = (-h).exp() - 1.0;
        let base = (mul_s(x, s_t / s_s0)? - mul_s(m0, a_t * em1)?)?;
        Ok(if self.heun {
            (base + mul_s(&d1, a_t * (em1 / h + 1.0))?)?
        } else {
            (base - mul_s(&d1, 0.5 * (a_t * em1))?)?
        })
    }

    /// Third order multistep (Lu et al. 2022, Eq. for 3M): `D₁ = D₁₀ + r₀/(r₀+r₁)(D₁₀ − D₁₁)`,
    /// `D₂ = (D₁₀ − D₁₁)/(r₀+r₁)`, `x_t = (σ_t/σ_s₀)x − α_t(e^{−h}−1)D₀ + α_t((e^{−h}−1)/h + 1)D₁
    /// − α_t((e^{−h} − 1 + h)/h² − ½)D₂`.
    fn third_order(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let (m0, m1, m2) = match (
            &self.model_outputs[k - 1],
            &self.model_outputs[k - 2],
            &self.model_outputs[k - 3],
        ) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(Error::invalid("step", "missing previous model output")),
        };
        let i = self.step_index;
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let (a_s0, s_s0) = alpha_sigma(self.sigmas[i]);
        let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (a_s2, s_s2) = alpha_sigma(self.sigmas[i - 2]);
        let l_t = lambda(a_t, s_t);
        let l_s0 = lambda(a_s0, s_s0);
        let l_s1 = lambda(a_s1, s_s1);
        let l_s2 = lambda(a_s2, s_s2);
        let h = l_t - l_s0;
        let (h0, h1) = (l_s0 - l_s1, l_s1 - l_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = mul_s(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul_s(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul_s(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul_s(&diff, 1.0 / (r0 + r1))?;
        let em1 = (-h).exp() - 1.0;
        let out = (mul_s(x, s_t / s_s0)? - mul_s(m0, a_t * em1)?)?;
        let out = (out + mul_s(&d1, a_t * (em1 / h + 1.0))?)?;
        Ok((out - mul_s(&d2, a_t * ((em1 + h) / (h * h) - 0.5))?)?)
    }

    fn index_of(&self, timestep: f64) -> usize {
        if self.timesteps.first() == Some(&timestep) {
            return self.begin_index;
        }
        index_for_timestep(&self.all_timesteps, timestep).unwrap_or(self.all_timesteps.len() - 1)
    }
}

impl Scheduler for DpmSolverScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// One multistep update: convert the output to x̂₀, push it into the history, then use the first
    /// order update on the first step and on the final step (`lower_order_final` with < 15 steps, or
    /// `final_sigmas_type = "zero"`, or `euler_at_final`), the second order on the second-to-last step
    /// of short schedules, and `solver_order` otherwise.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        check_timestep(timestep)?;
        let n = self.all_timesteps.len();
        if self.step_index >= n {
            return Err(Error::invalid(
                "timestep",
                "the schedule is already finished",
            ));
        }
        let out_dtype = model_output.dtype();
        let mo = to_f32(model_output)?;
        let x = to_f32(sample)?;
        let lower_order_final = self.step_index == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = self.step_index + 2 == n && self.lower_order_final && n < 15;
        let converted = self.convert(&mo, &x)?;
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(converted.clone());
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted, &x)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&x)?
        } else {
            self.third_order(&x)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// `αₜ x₀ + σₜ ε` with `(αₜ, σₜ)` from the schedule's σ at `timestep`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        check_timestep(timestep)?;
        let (a, s) = alpha_sigma(self.sigmas[self.index_of(timestep)]);
        let dtype = original.dtype();
        let out = (mul_s(&to_f32(original)?, a)? + mul_s(&to_f32(noise)?, s)?)?;
        Ok(out.to_dtype(dtype)?)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverPlusPlus
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.model_outputs.last().and_then(|m| m.as_ref())
    }
}
