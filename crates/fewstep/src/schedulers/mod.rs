//! Schedulers: the timestep schedule and the update rule of a sampler, with diffusers 0.42.1's semantics
//! (same config keys and defaults, same float32 arithmetic, same timesteps).
//!
//! A pipeline asks [`build`] for a [`Scheduler`], visits [`Scheduler::timesteps`] in order, scales the
//! UNet input with [`Scheduler::scale_model_input`], and hands the UNet output to [`Scheduler::step`].
//! For img2img the initial latents are noised with [`Scheduler::add_noise`] at the first visited timestep.

pub mod betas;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod lcm;

use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::config::SchedulerConfig;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

use betas::{BetaSchedule, NoiseSchedule};

/// The sampler interface the pipelines use.
pub trait Scheduler: Send {
    /// Timesteps in the order they are visited (f64: Euler's may be fractional).
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise (1 for LCM/DDIM/DPM++; for Euler, as diffusers: σ_max with
    /// `linspace`/`trailing` spacing, sqrt(σ_max²+1) with `leading`).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Input scaling before the UNet (identity except Euler: x / sqrt(σ²+1)).
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step: returns the previous (less noisy) sample. LCM draws its injected noise from `rng`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor>;
    /// Forward diffusion q(x_t | x_0) at `timestep` (img2img).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
    /// The model's estimate of the clean sample x̂₀ from the last [`Scheduler::step`], where the
    /// scheduler computes one (LCM: the boundary-condition `denoised`; DDIM/Euler: `pred_original_sample`;
    /// DPM-Solver++: the converted model output).
    fn denoised(&self) -> Option<&Tensor> {
        None
    }
    /// Euler and DPM-Solver++: σ of every timestep of the full schedule, then the final σ (diffusers'
    /// `scheduler.sigmas`, float32).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// The samplers fewstep offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `LCMScheduler` (Latent Consistency Models, multistep consistency sampling).
    Lcm,
    /// `DDIMScheduler` with η = 0 (deterministic DDIM).
    Ddim,
    /// `EulerDiscreteScheduler` (Karras et al.'s Euler method on σ, no churn).
    Euler,
    /// `DPMSolverMultistepScheduler` with `dpmsolver++`, order 2 ("DPM++ 2M").
    DpmSolverPlusPlus,
}

impl SchedulerKind {
    /// The name used on the command line and in [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::DpmSolverPlusPlus => "dpm++",
        }
    }

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::DpmSolverPlusPlus => "DPMSolverMultistepScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lcm" => Ok(SchedulerKind::Lcm),
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler" => Ok(SchedulerKind::Euler),
            "dpm++" | "dpmsolver++" | "dpm" => Ok(SchedulerKind::DpmSolverPlusPlus),
            other => Err(Error::invalid(
                "scheduler",
                format!("unknown scheduler `{other}` (expected lcm, ddim, euler or dpm++)"),
            )),
        }
    }
}

/// What the pipeline asks of the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRequest {
    /// Number of inference steps (for LCM: the number of UNet calls; for the others: the schedule's
    /// length before `strength` removes its first steps, as in diffusers' img2img pipelines).
    pub steps: usize,
    /// img2img strength in (0, 1]; 1 for text-to-image.
    pub strength: f64,
    /// LCM only: overrides the config's `original_inference_steps`.
    pub original_inference_steps: Option<usize>,
    /// LCM only: explicit timesteps (descending), replacing `steps`.
    pub custom_timesteps: Option<Vec<usize>>,
}

impl ScheduleRequest {
    /// `steps` steps of text-to-image (strength 1).
    pub fn new(steps: usize) -> Self {
        Self {
            steps,
            strength: 1.0,
            original_inference_steps: None,
            custom_timesteps: None,
        }
    }
}

/// How the model output is parameterised (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The model predicts the noise ε.
    Epsilon,
    /// The model predicts v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022).
    VPrediction,
    /// The model predicts x₀ directly.
    Sample,
}

impl PredictionType {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(Error::invalid(
                "prediction_type",
                format!("unknown value `{other}` (expected epsilon, v_prediction or sample)"),
            )),
        }
    }
}

/// How the inference timesteps are placed on the training schedule (`timestep_spacing`, Lin et al.
/// 2023, Table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::invalid(
                "timestep_spacing",
                format!("unknown value `{other}` (expected linspace, leading or trailing)"),
            )),
        }
    }
}

/// A scheduler config with every key resolved: the file's value where present, the diffusers class's
/// default otherwise (what `XScheduler.from_config(file_config)` does).
#[derive(Clone, Debug)]
pub struct ResolvedConfig {
    pub kind: SchedulerKind,
    pub noise: NoiseSchedule,
    pub prediction_type: PredictionType,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub timestep_spacing: TimestepSpacing,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub solver_order: usize,
    pub solver_type_heun: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// `final_sigmas_type == "sigma_min"` (otherwise `"zero"`).
    pub final_sigma_min: bool,
    /// Euler / DPM-Solver++: σs spaced as Karras et al. 2022 (`use_karras_sigmas`).
    pub use_karras_sigmas: bool,
}

impl ResolvedConfig {
    /// Resolves `config` for `kind` with the class defaults of diffusers 0.42.1 and validates it.
    pub fn resolve(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Self> {
        use SchedulerKind::*;
        let lcm = kind == Lcm;
        let beta_schedule =
            BetaSchedule::parse(config.beta_schedule.as_deref().unwrap_or(if lcm {
                "scaled_linear"
            } else {
                "linear"
            }))?;
        let noise = NoiseSchedule {
            num_train_timesteps: config.num_train_timesteps.unwrap_or(1000),
            beta_start: config
                .beta_start
                .unwrap_or(if lcm { 0.00085 } else { 0.0001 }),
            beta_end: config.beta_end.unwrap_or(if lcm { 0.012 } else { 0.02 }),
            beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr.unwrap_or(false),
        };
        if noise.num_train_timesteps == 0 {
            return Err(Error::invalid("num_train_timesteps", "must be at least 1"));
        }
        let prediction_type =
            PredictionType::parse(config.prediction_type.as_deref().unwrap_or("epsilon"))?;
        let timestep_spacing =
            TimestepSpacing::parse(config.timestep_spacing.as_deref().unwrap_or(match kind {
                Lcm | Ddim => "leading",
                Euler | DpmSolverPlusPlus => "linspace",
            }))?;
        let timestep_scaling = config.timestep_scaling.unwrap_or(10.0);
        if !timestep_scaling.is_finite() {
            return Err(Error::invalid("timestep_scaling", "must be finite"));
        }
        let clip_sample_range = config.clip_sample_range.unwrap_or(1.0);
        if clip_sample_range.is_nan() {
            return Err(Error::invalid("clip_sample_range", "is NaN"));
        }
        if config.thresholding == Some(true) && matches!(kind, Lcm | Ddim | DpmSolverPlusPlus) {
            return Err(Error::invalid(
                "thresholding",
                "dynamic thresholding is not supported (it is meant for pixel-space models)",
            ));
        }
        if kind == Euler {
            if let Some(it) = config.interpolation_type.as_deref() {
                if it != "linear" {
                    return Err(Error::invalid(
                        "interpolation_type",
                        format!("`{it}` is not supported (only linear)"),
                    ));
                }
            }
        }
        let solver_order = config.solver_order.unwrap_or(2);
        let mut solver_type_heun = false;
        if kind == DpmSolverPlusPlus {
            if !(1..=3).contains(&solver_order) {
                return Err(Error::invalid(
                    "solver_order",
                    format!("must be 1, 2 or 3, got {solver_order}"),
                ));
            }
            let alg = config.algorithm_type.as_deref().unwrap_or("dpmsolver++");
            if alg != "dpmsolver++" && alg != "deis" {
                return Err(Error::invalid(
                    "algorithm_type",
                    format!("`{alg}` is not supported (only dpmsolver++)"),
                ));
            }
            solver_type_heun = match config.solver_type.as_deref().unwrap_or("midpoint") {
                "midpoint" | "logrho" | "bh1" | "bh2" => false,
                "heun" => true,
                other => {
                    return Err(Error::invalid(
                        "solver_type",
                        format!("unknown value `{other}` (expected midpoint or heun)"),
                    ))
                }
            };
        }
        let final_sigma_min = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(Error::invalid(
                    "final_sigmas_type",
                    format!("unknown value `{other}` (expected zero or sigma_min)"),
                ))
            }
        };
        Ok(Self {
            kind,
            noise,
            prediction_type,
            set_alpha_to_one: config.set_alpha_to_one.unwrap_or(true),
            steps_offset: config.steps_offset.unwrap_or(0),
            timestep_spacing,
            original_inference_steps: config.original_inference_steps.unwrap_or(50),
            timestep_scaling,
            clip_sample: config.clip_sample.unwrap_or(kind == Ddim),
            clip_sample_range,
            solver_order,
            solver_type_heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_min,
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
        })
    }
}

/// Builds the scheduler `kind` from a model's `scheduler_config.json` (as `from_config`) and sets its
/// timesteps for `req` (steps, img2img strength, LCM's original steps / custom timesteps).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    req: &ScheduleRequest,
) -> Result<Box<dyn Scheduler>> {
    if req.steps == 0 && req.custom_timesteps.is_none() {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    betas::check_strength(req.strength)?;
    if kind != SchedulerKind::Lcm {
        if req.custom_timesteps.is_some() {
            return Err(Error::invalid(
                "custom_timesteps",
                format!("only the lcm scheduler accepts custom timesteps, not {kind}"),
            ));
        }
        if req.original_inference_steps.is_some() {
            return Err(Error::invalid(
                "original_inference_steps",
                format!("only the lcm scheduler uses original_inference_steps, not {kind}"),
            ));
        }
    }
    let cfg = ResolvedConfig::resolve(kind, config)?;
    if req.steps > cfg.noise.num_train_timesteps {
        return Err(Error::invalid(
            "steps",
            format!(
                "{} is more than num_train_timesteps ({})",
                req.steps, cfg.noise.num_train_timesteps
            ),
        ));
    }
    Ok(match kind {
        SchedulerKind::Lcm => Box::new(lcm::LcmScheduler::new(&cfg, req)?),
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(&cfg, req)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(&cfg, req)?),
        SchedulerKind::DpmSolverPlusPlus => {
            Box::new(dpm_solver::DpmSolverScheduler::new(&cfg, req)?)
        }
    })
}

// ---- small tensor helpers: float32 scalar arithmetic like torch's 0-d float32 tensors ----

/// `t · s` with `s` a float32 scalar (computed in `t`'s dtype).
pub(crate) fn mul_s(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.affine(s as f64, 0.0)?)
}

/// `t / s` as a true division by the float32 scalar `s`.
pub(crate) fn div_s(t: &Tensor, s: f32) -> Result<Tensor> {
    let d = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&d)?)
}

/// The working dtype: float32 for half types (diffusers upcasts samples), else the tensor's own.
pub(crate) fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// Rejects a timestep that is not a finite number.
pub(crate) fn check_timestep(t: f64) -> Result<()> {
    if !t.is_finite() {
        return Err(Error::invalid(
            "timestep",
            format!("must be finite, got {t}"),
        ));
    }
    Ok(())
}

/// Index of `timestep` in `schedule`, as diffusers' `index_for_timestep`: the second match when the
/// timestep occurs twice, the first otherwise, `None` when absent.
pub(crate) fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let hits: Vec<usize> = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i)
        .collect();
    match hits.len() {
        0 => None,
        1 => Some(hits[0]),
        _ => Some(hits[1]),
    }
}
