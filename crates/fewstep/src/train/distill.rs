//! Consistency distillation of a trained model (the teacher) into a few-step one, with the objective of
//! [`super::lcd`]:
//!
//! - **full LCM** ([`Stage::Lcm`](super::Stage::Lcm)): the student is the teacher's UNet plus a
//!   guidance-scale embedding (`time_cond_proj_dim`, its `cond_proj` freshly initialised), trained whole;
//!   the target network is its exponential moving average `θ⁻ ← μθ⁻ + (1−μ)θ`, which is what is exported;
//! - **LCM-LoRA** ([`Stage::LcmLora`](super::Stage::LcmLora)): the teacher's UNet stays frozen and LoRA
//!   branches of rank r on the modules the published LCM-LoRA trains are learnt; the target network is
//!   the student itself without gradient; exported in the kohya `lora_unet_*` layout with `.alpha`.
//!
//! The text encoder and the VAE are the teacher's, frozen: the prompts' embeddings and the images'
//! latent posteriors are computed once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::WorldData;
use super::diffusion::{add_noise, sd_noise_schedule};
use super::lcd::{consistency, guided, predicted_x0, DdimSolver, LcdLoss};
use super::params::ParamStore;
use crate::config::UNet2DConditionConfig;
use crate::lora::LoraBranch;
use crate::models::clip::ClipTextModel;
use crate::models::unet::embeddings::guidance_scale_embedding;
use crate::models::UNet2DConditionModel;
use crate::schedulers::betas::alphas_cumprod;
use crate::weights::parts::ModelParts;
use crate::weights::safetensors::write_safetensors;
use crate::{Error, Result};

/// The module-name endings the published LCM-LoRA trains (diffusers' `train_lcm_distill_lora_sd_wds.py`
/// target modules): attention q/k/v/out, the transformer's projections, both feed-forward linears, the
/// resnets' convolutions and time projection, and the resampling convolutions.
pub const LCM_LORA_TARGETS: [&str; 14] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];

/// The distillation hyper-parameters (defaults: the LCM-LoRA script's, except the rank, sized for
/// fewstep's small models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Guidance `w` (the scale minus one) drawn uniformly from `[w_min, w_max]` per sample.
    pub w_min: f64,
    pub w_max: f64,
    /// DDIM solver timesteps (skip k = 1000 / n).
    pub num_ddim_timesteps: usize,
    pub loss: LcdLoss,
    /// The boundary scalings' `timestep_scaling` (LCMScheduler's default, 10).
    pub timestep_scaling: f64,
    /// Full LCM: the EMA rate μ of the target network.
    pub ema_decay: f64,
    /// Full LCM: the width of the guidance-scale embedding added to the UNet.
    pub time_cond_proj_dim: usize,
    /// LCM-LoRA: rank r and alpha (scale alpha / r).
    pub lora_rank: usize,
    pub lora_alpha: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            w_min: 3.0,
            w_max: 15.0,
            num_ddim_timesteps: 50,
            loss: LcdLoss::Huber { c: 0.001 },
            timestep_scaling: 10.0,
            ema_decay: 0.95,
            time_cond_proj_dim: 256,
            lora_rank: 16,
            lora_alpha: 16.0,
        }
    }
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.w_min.is_finite() && self.w_max.is_finite() && self.w_min <= self.w_max) {
            return Err(Error::invalid(
                "guidance range",
                format!(
                    "w_min {} and w_max {} must be finite with w_min <= w_max",
                    self.w_min, self.w_max
                ),
            ));
        }
        if self.num_ddim_timesteps == 0 || self.num_ddim_timesteps > 1000 {
            return Err(Error::invalid(
                "ddim timesteps",
                format!("must be in 1..=1000 (got {})", self.num_ddim_timesteps),
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(Error::invalid(
                "ema decay",
                format!("must be in [0, 1) (got {})", self.ema_decay),
            ));
        }
        if self.lora_rank == 0 || !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::invalid(
                "lora rank",
                format!(
                    "rank {} and alpha {} must be positive",
                    self.lora_rank, self.lora_alpha
                ),
            ));
        }
        Ok(())
    }
}

/// The LoRA modules of a UNet: diffusers module path → (down shape, up shape), for every weight of
/// `unet_shapes` whose module ends in one of [`LCM_LORA_TARGETS`]: a linear `[out, in]` gets
/// `[r, in]`/`[out, r]`, a convolution `[out, in, k, k]` gets `[r, in, k, k]`/`[out, r, 1, 1]`.
pub fn lora_modules(
    unet_shapes: &BTreeMap<String, Vec<usize>>,
    rank: usize,
) -> BTreeMap<String, (Vec<usize>, Vec<usize>)> {
    unet_shapes
        .iter()
        .filter_map(|(key, shape)| {
            let module = key.strip_suffix(".weight")?;
            let targeted = LCM_LORA_TARGETS
                .iter()
                .any(|t| module == *t || module.ends_with(&format!(".{t}")));
            match shape.as_slice() {
                [o, i] if targeted => Some((module.to_string(), (vec![rank, *i], vec![*o, rank]))),
                [o, i, kh, kw] if targeted => Some((
                    module.to_string(),
                    (vec![rank, *i, *kh, *kw], vec![*o, rank, 1, 1]),
                )),
                _ => None,
            }
        })
        .collect()
}

/// The parameter-store names of a module's LoRA matrices.
pub fn lora_param_names(module: &str) -> (String, String) {
    (
        format!("lora.{module}.lora_down.weight"),
        format!("lora.{module}.lora_up.weight"),
    )
}

/// The runtime branches of the LoRA in `params` (keyed by the UNet weight they attach to), scale
/// alpha / r. With `detach`, the branches carry no gradient (the LCM-LoRA target network).
pub fn lora_branches(
    params: &ParamStore,
    modules: &BTreeMap<String, (Vec<usize>, Vec<usize>)>,
    cfg: &DistillConfig,
    detach: bool,
) -> Result<HashMap<String, Vec<LoraBranch>>> {
    let scale = cfg.lora_alpha / cfg.lora_rank as f64;
    modules
        .keys()
        .map(|m| {
            let (d, u) = lora_param_names(m);
            let get = |k: &str| -> Result<Tensor> {
                let v = params.get(k).ok_or_else(|| Error::MissingKey {
                    file: "LoRA parameters".into(),
                    key: k.to_string(),
                })?;
                Ok(if detach {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                })
            };
            Ok((
                format!("{m}.weight"),
                vec![LoraBranch {
                    down: get(&d)?,
                    up: get(&u)?,
                    scale,
                }],
            ))
        })
        .collect()
}

/// Writes the LoRA of `params` in the kohya layout of the published LCM-LoRA files:
/// `lora_unet_{module with '.' → '_'}.lora_down.weight`, `.lora_up.weight`, and `.alpha` (a scalar), f32.
pub fn export_lora_kohya(
    params: &ParamStore,
    modules: &BTreeMap<String, (Vec<usize>, Vec<usize>)>,
    cfg: &DistillConfig,
    path: &Path,
) -> Result<()> {
    let mut tensors = Vec::new();
    for m in modules.keys() {
        let stem = format!("lora_unet_{}", m.replace('.', "_"));
        let (d, u) = lora_param_names(m);
        for (name, suffix) in [(&d, "lora_down.weight"), (&u, "lora_up.weight")] {
            let v = params.get(name).ok_or_else(|| Error::MissingKey {
                file: "LoRA parameters".into(),
                key: name.clone(),
            })?;
            tensors.push((format!("{stem}.{suffix}"), v.as_tensor().clone()));
        }
        tensors.push((
            format!("{stem}.alpha"),
            Tensor::new(cfg.lora_alpha as f32, params.device())?,
        ));
    }
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ss_network_dim".to_string(), cfg.lora_rank.to_string()),
        ("ss_network_alpha".to_string(), cfg.lora_alpha.to_string()),
    ]);
    write_safetensors(path, &tensors, &meta)
}

/// The student's UNet config: the teacher's, with the guidance embedding for the full LCM.
pub fn student_unet_config(
    teacher: &UNet2DConditionConfig,
    full: bool,
    cfg: &DistillConfig,
) -> UNet2DConditionConfig {
    let mut c = teacher.clone();
    if full {
        c.time_cond_proj_dim = Some(cfg.time_cond_proj_dim);
    }
    c
}

/// `θ⁻ ← μθ⁻ + (1−μ)θ` for every tensor of `ema` (keys of `params`).
pub fn ema_update(
    ema: &mut BTreeMap<String, Tensor>,
    params: &ParamStore,
    decay: f64,
) -> Result<()> {
    for (k, t) in ema.iter_mut() {
        let p = params.get(k).ok_or_else(|| Error::MissingKey {
            file: "EMA".into(),
            key: k.clone(),
        })?;
        *t = ((&*t * decay)? + (p.as_tensor().detach() * (1.0 - decay))?)?;
    }
    Ok(())
}

/// The frozen parts of a distillation run: the teacher's UNet, the prompts' embeddings (the dataset's
/// captions and the empty prompt) and the DDIM solver.
pub struct Teacher {
    pub unet: UNet2DConditionModel,
    /// `[N, 77, D]`, one per dataset caption.
    pub contexts: Tensor,
    /// `[1, 77, D]`, the empty prompt's.
    pub uncond: Tensor,
    pub solver: DdimSolver,
    pub alphas_cumprod: Vec<f32>,
}

/// One batch of the distillation objective: everything drawn, and the loss as a graph.
pub struct DistillBatch<'a> {
    pub teacher: &'a Teacher,
    pub cfg: &'a DistillConfig,
    /// `z₀` (scaled latents) `[B, C, h, w]`, and the dataset rows they came from (u32 `[B]`).
    pub z0: Tensor,
    pub rows: Tensor,
    /// Per sample: the solver index, `w`, the noise.
    pub index: Vec<usize>,
    pub w: Vec<f32>,
    pub noise: Tensor,
}

impl DistillBatch<'_> {
    /// The LCD loss `d(f_θ(x_t, t), f_θ⁻(x_s, s))` with `student` (trainable) and `target` (no gradient);
    /// `w_embedding_dim` is the student's `time_cond_proj_dim` (full LCM) or None (LCM-LoRA).
    pub fn loss(
        &self,
        student: &UNet2DConditionModel,
        target: &UNet2DConditionModel,
        w_embedding_dim: Option<usize>,
    ) -> Result<Tensor> {
        let teacher = self.teacher;
        let dev = self.z0.device();
        let solver = &teacher.solver;
        let t: Vec<usize> = self.index.iter().map(|&i| solver.timesteps[i]).collect();
        let s: Vec<usize> = self
            .index
            .iter()
            .map(|&i| solver.target_timestep(i))
            .collect();
        let a_t: Vec<f32> = t.iter().map(|&t| teacher.alphas_cumprod[t]).collect();
        let a_s: Vec<f32> = s.iter().map(|&s| teacher.alphas_cumprod[s]).collect();
        let x_t = add_noise(&self.z0, &self.noise, &a_t)?;
        let context = teacher.contexts.index_select(&self.rows, 0)?;
        let b = self.z0.dim(0)?;
        let uncond = teacher
            .uncond
            .broadcast_as((b, teacher.uncond.dim(1)?, teacher.uncond.dim(2)?))?
            .contiguous()?;
        let tf: Vec<f64> = t.iter().map(|&t| t as f64).collect();
        let sf: Vec<f64> = s.iter().map(|&s| s as f64).collect();

        // The teacher's guided DDIM step from t to s (no gradient).
        let both = teacher.unet.forward_timesteps(
            &Tensor::cat(&[&x_t, &x_t], 0)?,
            &[tf.clone(), tf.clone()].concat(),
            &Tensor::cat(&[&context, &uncond], 0)?,
            None,
            None,
        )?;
        let (eps_c, eps_u) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
        let x0 = guided(
            &predicted_x0(&x_t, &eps_c, &a_t)?,
            &predicted_x0(&x_t, &eps_u, &a_t)?,
            &self.w,
        )?;
        let eps = guided(&eps_c, &eps_u, &self.w)?;
        let x_s = solver.step(&x0, &eps, &self.index)?.detach();

        let w_emb = match w_embedding_dim {
            Some(d) => {
                let w: Vec<f64> = self.w.iter().map(|&w| w as f64).collect();
                Some(guidance_scale_embedding(&w, d, DType::F32, dev)?)
            }
            None => None,
        };
        let pred = student.forward_timesteps(&x_t, &tf, &context, w_emb.as_ref(), None)?;
        let f_student = consistency(
            &x_t,
            &predicted_x0(&x_t, &pred, &a_t)?,
            &t,
            self.cfg.timestep_scaling,
        )?;
        let pred_target = target
            .forward_timesteps(&x_s, &sf, &context, w_emb.as_ref(), None)?
            .detach();
        let f_target = consistency(
            &x_s,
            &predicted_x0(&x_s, &pred_target, &a_s)?,
            &s,
            self.cfg.timestep_scaling,
        )?
        .detach();
        self.cfg.loss.compute(&f_student, &f_target)
    }
}

impl Teacher {
    /// The teacher of `parts` (a trained pipeline in f32): its UNet, and its frozen text encoder's
    /// embeddings of the dataset's captions `data.ids` and of the empty prompt; the solver over SD's
    /// schedule with `num_ddim_timesteps` steps.
    pub fn new(
        parts: &ModelParts,
        data: &WorldData,
        num_ddim_timesteps: usize,
        device: &Device,
    ) -> Result<Self> {
        let unet = UNet2DConditionModel::new(&parts.unet_config, &parts.unet)?;
        let te = ClipTextModel::new(&parts.text_encoder_config, &parts.text_encoder)?;
        let width = data.empty_ids.len();
        let mut contexts = Vec::new();
        for chunk in data.ids.chunks(64) {
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (chunk.len(), width), device)?;
            contexts.push(te.encode(&t, None)?.detach());
        }
        let empty = Tensor::new(data.empty_ids.as_slice(), device)?.unsqueeze(0)?;
        let uncond = te.encode(&empty, None)?.detach();
        let alphas_cumprod = alphas_cumprod(&sd_noise_schedule())?;
        Ok(Self {
            unet,
            contexts: Tensor::cat(&contexts, 0)?,
            uncond,
            solver: DdimSolver::new(&alphas_cumprod, num_ddim_timesteps),
            alphas_cumprod,
        })
    }
}
