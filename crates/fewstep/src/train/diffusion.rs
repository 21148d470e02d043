//! Teacher training, the two stages of Stable Diffusion:
//!
//! - **VAE** (`Stage::Vae`): `AutoencoderKL` on world images, `loss = mean|x − D(z)| + kl_weight · KL`
//!   (or `mean (x − D(z))²` with [`ReconLoss::L2`]),
//!   `z ~ q(z|x) = N(μ, σ²)` drawn by reparameterisation, `KL = Σ ½(μ² + σ² − 1 − log σ²) / (B·3·H·W)`
//!   (LDM's `sum / batch` losses with both terms divided by the same pixel count, so `kl_weight` keeps LDM's
//!   meaning; its default 1e-6 is LDM's). When the VAE is saved its `scaling_factor` is measured from the
//!   data as SD did: `1 / std(z)` over latents drawn for (up to) 256 dataset images.
//! - **UNet** (`Stage::Unet`): the text encoder and the UNet trained together with diffusers'
//!   `train_text_to_image.py` epsilon objective on the frozen VAE's latents:
//!   `z₀ = scaling_factor · (μ + σ ε')`, `t ~ U{0..999}` per sample, `ε ~ N(0, I)`,
//!   `z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε` with SD's scaled-linear β schedule (0.00085 … 0.012, 1000 steps),
//!   `loss = mean (ε̂(z_t, t, text(c)) − ε)²`; captions are replaced by "" with probability
//!   `caption_dropout` (10%) so classifier-free guidance works. The VAE's posterior `(μ, σ)` of every
//!   dataset image is computed once (the same distribution diffusers samples each step).
//!
//! Both run AdamW ([`super::optim`]) and checkpoint through [`super::checkpoint`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{TrainRng, WorldData};
use super::distill::{
    lora_branches, lora_modules, lora_param_names, student_unet_config, DistillBatch,
    DistillConfig, Teacher,
};
use super::lcd::per_sample;
use super::optim::{AdamW, AdamWConfig};
use super::params::{text_encoder_shapes, unet_shapes, vae_shapes, ParamStore};
use crate::config::{
    load_json, AutoencoderKLConfig, ClipTextConfig, OneOrMany, UNet2DConditionConfig,
};
use crate::models::clip::ClipTextModel;
use crate::models::{AutoencoderKL, UNet2DConditionModel};
use crate::schedulers::betas::{alphas_cumprod, BetaSchedule, NoiseSchedule};
use crate::tokenizer::ClipTokenizer;
use crate::weights::Weights;
use crate::world::Style;
use crate::{Error, Result};

/// Which model a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Vae,
    Unet,
    /// Consistency distillation into a full LCM (see [`super::distill`]).
    Lcm,
    /// Consistency distillation into an LCM-LoRA.
    #[serde(rename = "lcm-lora")]
    LcmLora,
}

impl Stage {
    /// The two distillation stages.
    pub fn is_distillation(self) -> bool {
        matches!(self, Stage::Lcm | Stage::LcmLora)
    }
}

/// The VAE's reconstruction term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconLoss {
    /// `mean|x − D(z)|`, LDM's pixel term.
    #[default]
    L1,
    /// `mean (x − D(z))²`: a wrong colour over a small shape costs far more than a slightly-off
    /// background, so small shapes are learnt first rather than last.
    L2,
}

impl ReconLoss {
    fn is_l1(&self) -> bool {
        *self == ReconLoss::L1
    }
}

/// The world's drawing style, as a config value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorldStyle {
    Filled,
    Outline,
}

impl From<WorldStyle> for Style {
    fn from(s: WorldStyle) -> Self {
        match s {
            WorldStyle::Filled => Style::Filled,
            WorldStyle::Outline => Style::Outline,
        }
    }
}

/// Everything that determines a training run. A checkpoint stores it; a resume must give the same values
/// (except `steps` and `checkpoint_every`, which may change between runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    /// Seeds the dataset, the initial weights and the run's random stream.
    pub seed: u64,
    /// Total optimisation steps.
    pub steps: usize,
    pub batch_size: usize,
    pub dataset_size: usize,
    /// Image side in pixels.
    pub image_size: usize,
    pub style: WorldStyle,
    pub optim: AdamWConfig,
    /// VAE stage: weight of the KL term.
    pub kl_weight: f64,
    /// VAE stage: the reconstruction term (absolute or squared error; L1 when absent, as LDM).
    #[serde(default, skip_serializing_if = "ReconLoss::is_l1")]
    pub recon_loss: ReconLoss,
    /// UNet stage: probability of an empty caption.
    pub caption_dropout: f64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    pub vae: AutoencoderKLConfig,
    /// UNet stage: the UNet trained; distillation: the student's (the teacher's for LCM-LoRA, with
    /// `time_cond_proj_dim` for the full LCM).
    pub unet: Option<UNet2DConditionConfig>,
    /// UNet and distillation stages (for distillation: the teacher's).
    pub text_encoder: Option<ClipTextConfig>,
    /// Distillation stages only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// UNet stage fine-tuning ([`Sources::init_from`]): keep the text encoder as it is and train the UNet
    /// alone (the fine-tune then shares the base's text encoder file).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_text_encoder: bool,
    /// UNet stage: keep an exponential moving average of the trained weights with this decay (diffusers'
    /// `--use_ema`, see [`ema_decay_at`]); the exported model is the average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    /// UNet stage: Min-SNR-γ loss weighting (Hang et al. 2023, diffusers' `--snr_gamma`), see
    /// [`min_snr_weights`]; none: the plain mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_gamma: Option<f64>,
}

/// Named model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// For tests: 16×16 images, a 2-level VAE ([8, 16], 8×8×4 latents), a [16, 32] UNet, a 1-layer
    /// 16-wide text encoder — a step takes milliseconds.
    Tiny,
    /// The proposal for the shipped model under the 60-minute CPU budget: 32×32 images, VAE
    /// [32, 64, 64] (8×8×4 latents), UNet [64, 128] with one cross-attention level, text encoder 2 layers ×
    /// 64 wide. See `docs/training.md` for the measured step times.
    Small,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            other => Err(Error::invalid(
                "preset",
                format!("unknown `{other}` (tiny, small)"),
            )),
        }
    }

    pub fn image_size(self) -> usize {
        match self {
            Preset::Tiny => 16,
            Preset::Small => 32,
        }
    }

    pub fn vae(self) -> AutoencoderKLConfig {
        let ch = match self {
            Preset::Tiny => vec![8, 16],
            Preset::Small => vec![32, 64, 64],
        };
        let n = ch.len();
        AutoencoderKLConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            block_out_channels: ch,
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: match self {
                Preset::Tiny => 4,
                Preset::Small => 16,
            },
            sample_size: self.image_size(),
            scaling_factor: 1.0,
            ..AutoencoderKLConfig::default()
        }
    }

    pub fn unet(self) -> UNet2DConditionConfig {
        let (ch, heads, cross, groups) = match self {
            Preset::Tiny => (vec![16, 32], 2, 16, 8),
            Preset::Small => (vec![64, 128], 4, 64, 32),
        };
        let latent = self.image_size() / self.vae().scale_factor();
        UNet2DConditionConfig {
            sample_size: Some(latent),
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            block_out_channels: ch,
            layers_per_block: OneOrMany::One(1),
            cross_attention_dim: OneOrMany::One(cross),
            attention_head_dim: OneOrMany::One(heads),
            norm_num_groups: Some(groups),
            ..UNet2DConditionConfig::default()
        }
    }

    pub fn text_encoder(self) -> ClipTextConfig {
        let (d, layers, heads) = match self {
            Preset::Tiny => (16, 1, 2),
            Preset::Small => (64, 2, 4),
        };
        ClipTextConfig {
            hidden_size: d,
            intermediate_size: 4 * d,
            projection_dim: d,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            ..ClipTextConfig::default()
        }
    }
}

impl TrainConfig {
    /// A config of `stage` with the preset's model sizes and default hyper-parameters: lr 1e-4, batch 8,
    /// 1000 images, KL weight 1e-6, caption dropout 0.1.
    pub fn preset(stage: Stage, preset: Preset) -> Self {
        Self {
            stage,
            seed: 0,
            steps: 1000,
            batch_size: 8,
            dataset_size: 1000,
            image_size: preset.image_size(),
            style: WorldStyle::Filled,
            optim: AdamWConfig::default(),
            kl_weight: 1e-6,
            recon_loss: ReconLoss::L1,
            caption_dropout: 0.1,
            checkpoint_every: 0,
            vae: preset.vae(),
            unet: (stage == Stage::Unet).then(|| preset.unet()),
            text_encoder: (stage == Stage::Unet).then(|| preset.text_encoder()),
            distill: None,
            freeze_text_encoder: false,
            ema_decay: None,
            snr_gamma: None,
        }
    }

    /// Checks the values a user gives; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.dataset_size == 0 {
            return Err(Error::invalid("dataset size", "must be at least 1 (got 0)"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch size", "must be at least 1 (got 0)"));
        }
        self.optim.validate()?;
        if !self.kl_weight.is_finite() || self.kl_weight < 0.0 {
            return Err(Error::invalid(
                "kl weight",
                format!("must be a finite number >= 0 (got {})", self.kl_weight),
            ));
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return Err(Error::invalid(
                "caption dropout",
                format!("must be in [0, 1] (got {})", self.caption_dropout),
            ));
        }
        let f = self.vae.scale_factor();
        if self.image_size == 0 || !self.image_size.is_multiple_of(f) {
            return Err(Error::invalid(
                "image size",
                format!(
                    "{} is not a positive multiple of the VAE's factor {f}",
                    self.image_size
                ),
            ));
        }
        if self.stage != Stage::Vae && (self.unet.is_none() || self.text_encoder.is_none()) {
            return Err(Error::invalid(
                "config",
                "the unet and distillation stages need unet and text_encoder configs",
            ));
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return Err(Error::invalid(
                    "ema decay",
                    format!("must be in [0, 1) (got {d})"),
                ));
            }
        }
        if let Some(g) = self.snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::invalid(
                    "snr gamma",
                    format!("must be a finite number > 0 (got {g})"),
                ));
            }
        }
        if (self.ema_decay.is_some() || self.snr_gamma.is_some()) && self.stage != Stage::Unet {
            return Err(Error::invalid(
                "config",
                "ema decay and snr gamma belong to the unet stage",
            ));
        }
        match (&self.distill, self.stage.is_distillation()) {
            (Some(d), true) => d.validate()?,
            (None, true) => {
                return Err(Error::invalid(
                    "config",
                    "a distillation stage needs its distill settings",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Files a run reads besides its config.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A CLIP tokenizer folder (UNet stage).
    pub tokenizer_dir: Option<PathBuf>,
    /// The trained VAE (UNet stage): a diffusers folder with `vae/`, or a `vae/` folder itself.
    pub vae_dir: Option<PathBuf>,
    /// UNet stage: a trained pipeline folder whose text encoder and UNet are the starting weights instead
    /// of a fresh initialisation (a fine-tune); its configs must equal the run's.
    pub init_from: Option<PathBuf>,
    /// Distillation stages: the teacher, a trained pipeline folder (its UNet, and its frozen text encoder
    /// and VAE).
    pub teacher: Option<PathBuf>,
}

/// `dir/vae` if it holds a `config.json`, else `dir`.
pub fn vae_component_dir(dir: &Path) -> PathBuf {
    let sub = dir.join("vae");
    if sub.join("config.json").is_file() {
        sub
    } else {
        dir.to_path_buf()
    }
}

/// The frozen VAE of the UNet stage: its folder, its config and the posterior of every dataset image.
struct FrozenVae {
    dir: PathBuf,
    mean: Tensor,
    std: Tensor,
}

/// The frozen side of a distillation run.
pub struct DistillState {
    pub teacher: Teacher,
    /// The teacher's folder (its text encoder, tokenizer and VAE are copied into an exported LCM).
    pub teacher_dir: PathBuf,
    /// The teacher's UNet weights (the frozen base of LCM-LoRA).
    pub teacher_unet: Weights,
    /// LCM-LoRA: the modules carrying a LoRA, with their down/up shapes.
    pub lora_modules: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
}

/// One training run: parameters, optimiser, random stream, data.
pub struct Trainer {
    pub config: TrainConfig,
    pub params: ParamStore,
    pub opt: AdamW,
    /// Steps done.
    pub step: usize,
    pub rng: TrainRng,
    pub data: WorldData,
    tokenizer: Option<ClipTokenizer>,
    tokenizer_dir: Option<PathBuf>,
    vae: Option<FrozenVae>,
    /// Distillation stages: the frozen teacher.
    pub distill: Option<DistillState>,
    /// An exponential moving average of the parameters (keys as theirs): the full LCM's target network
    /// θ⁻, or the UNet stage's averaged weights with [`TrainConfig::ema_decay`]; empty otherwise.
    pub ema: BTreeMap<String, Tensor>,
    /// A fine-tune with [`TrainConfig::freeze_text_encoder`]: the frozen text encoder and its folder.
    frozen_text_encoder: Option<(ClipTextModel, PathBuf)>,
    alphas_cumprod: Vec<f32>,
    device: Device,
}

/// SD's noise schedule (`scaled_linear`, 0.00085 … 0.012, 1000 steps).
pub fn sd_noise_schedule() -> NoiseSchedule {
    NoiseSchedule {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        trained_betas: None,
        rescale_betas_zero_snr: false,
    }
}

/// Min-SNR-γ weights of the epsilon objective (Hang et al. 2023, "Efficient Diffusion Training via
/// Min-SNR Weighting Strategy"; diffusers' `compute_snr` and `mse_loss_weights`): with the signal-to-noise
/// ratio `SNR(t) = ᾱ_t / (1 − ᾱ_t)`, the weight of a sample is `min(SNR(t), γ) / SNR(t)`, so the
/// low-noise timesteps, whose ε is easy to predict and whose gradients dominate, count less.
pub fn min_snr_weights(alphas: &[f32], gamma: f64) -> Vec<f32> {
    alphas
        .iter()
        .map(|&a| {
            let snr = a as f64 / (1.0 - a as f64);
            (snr.min(gamma) / snr) as f32
        })
        .collect()
}

/// The EMA decay used after `step` optimisation steps (0-based) for a configured `decay`: diffusers'
/// `EMAModel.get_decay` without warm-up power, `min(decay, (1 + step) / (10 + step))`, so the average
/// follows the fast-moving early weights and settles at `decay`.
pub fn ema_decay_at(decay: f64, step: usize) -> f64 {
    let s = step as f64;
    decay.min((1.0 + s) / (10.0 + s))
}

/// The forward diffusion `z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε` per sample, `alphas` the `ᾱ_t` of each sample
/// (diffusers' `add_noise` with a timestep per sample).
pub fn add_noise(z0: &Tensor, noise: &Tensor, alphas: &[f32]) -> Result<Tensor> {
    let dev = z0.device();
    let sa = per_sample(alphas.iter().map(|a| a.sqrt()).collect(), dev)?;
    let sb = per_sample(alphas.iter().map(|a| (1.0 - a).sqrt()).collect(), dev)?;
    Ok((z0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
}

/// Every trainable tensor of a run, with its component prefix (`vae.`, `text_encoder.`, `unet.`).
pub fn expected_shapes(
    config: &TrainConfig,
) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    config.validate()?;
    fn prefixed(
        p: &'static str,
        m: std::collections::BTreeMap<String, Vec<usize>>,
    ) -> impl Iterator<Item = (String, Vec<usize>)> {
        m.into_iter().map(move |(k, s)| (format!("{p}{k}"), s))
    }
    Ok(match config.stage {
        Stage::Vae => prefixed("vae.", vae_shapes(&config.vae)?).collect(),
        Stage::Unet => {
            let te = if config.freeze_text_encoder {
                std::collections::BTreeMap::new()
            } else {
                text_encoder_shapes(config.text_encoder.as_ref().unwrap())?
            };
            prefixed("text_encoder.", te)
                .chain(prefixed(
                    "unet.",
                    unet_shapes(config.unet.as_ref().unwrap())?,
                ))
                .collect()
        }
        Stage::Lcm => prefixed("unet.", unet_shapes(config.unet.as_ref().unwrap())?).collect(),
        Stage::LcmLora => {
            let rank = config.distill.as_ref().unwrap().lora_rank;
            lora_modules(&unet_shapes(config.unet.as_ref().unwrap())?, rank)
                .into_iter()
                .flat_map(|(m, (down, up))| {
                    let (d, u) = lora_param_names(&m);
                    [(d, down), (u, up)]
                })
                .collect()
        }
    })
}

/// Sub-seeds of a run's seed: the dataset uses the seed itself.
fn init_seed(seed: u64, what: u64) -> u64 {
    seed ^ (0xA076_1D64_78BD_642F_u64.wrapping_mul(what + 1))
}

/// A trained pipeline folder's parts, in f32.
fn pretrained(dir: &Path, device: &Device) -> Result<crate::weights::parts::ModelParts> {
    crate::weights::parts::ModelParts::from_folder(
        &crate::weights::diffusers::DiffusersFolder::open(dir)?,
        DType::F32,
        device,
    )
}

/// The distillation teacher's folder.
fn teacher_dir(sources: &Sources) -> Result<&Path> {
    sources.teacher.as_deref().ok_or_else(|| {
        Error::invalid(
            "teacher",
            "distillation needs the teacher, a trained model folder",
        )
    })
}

/// Checks a config of this run (`ours`, the component `name`) equals the one read from `dir` (`theirs`);
/// the error names `what`, the folder and the first differing field with both values.
fn ensure_same_config(
    what: &str,
    name: &str,
    ours: &impl Serialize,
    theirs: &impl Serialize,
    dir: &Path,
) -> Result<()> {
    let (ours, theirs) = (
        serde_json::to_value(ours).unwrap(),
        serde_json::to_value(theirs).unwrap(),
    );
    match first_difference(&ours, &theirs, name) {
        Some((field, a, b)) => Err(Error::invalid(
            what,
            format!(
                "{}: `{field}` is {b} there but {a} in this run's config",
                dir.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Checks the run's text encoder config equals the folder's and its UNet config equals `unet` (the
/// folder's, or the student made from it).
fn check_configs(
    config: &TrainConfig,
    parts: &crate::weights::parts::ModelParts,
    unet: Option<&UNet2DConditionConfig>,
    what: &str,
    dir: &Path,
) -> Result<()> {
    ensure_same_config(what, "unet", &config.unet, &unet, dir)?;
    ensure_same_config(
        what,
        "text_encoder",
        &config.text_encoder,
        &Some(&parts.text_encoder_config),
        dir,
    )
}

impl Trainer {
    /// A fresh run: validates the config, renders the dataset, initialises the parameters (or, for the UNet
    /// stage with [`Sources::init_from`], loads them from a trained model).
    pub fn new(config: TrainConfig, sources: &Sources, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut params = ParamStore::new(device);
        match config.stage {
            Stage::Vae => {
                params.add_init("vae.", &vae_shapes(&config.vae)?, init_seed(config.seed, 1))?;
            }
            Stage::Unet if sources.init_from.is_some() => {
                let dir = sources.init_from.as_deref().unwrap();
                let parts = pretrained(dir, device)?;
                check_configs(&config, &parts, config.unet.as_ref(), "init-from", dir)?;
                if !config.freeze_text_encoder {
                    params.add_from_weights(
                        "text_encoder.",
                        &text_encoder_shapes(config.text_encoder.as_ref().unwrap())?,
                        &parts.text_encoder,
                    )?;
                }
                params.add_from_weights(
                    "unet.",
                    &unet_shapes(config.unet.as_ref().unwrap())?,
                    &parts.unet,
                )?;
            }
            Stage::Lcm | Stage::LcmLora => {
                let dir = teacher_dir(sources)?;
                let parts = pretrained(dir, device)?;
                let d = config.distill.as_ref().unwrap();
                let student =
                    student_unet_config(&parts.unet_config, config.stage == Stage::Lcm, d);
                check_configs(&config, &parts, Some(&student), "teacher", dir)?;
                let shapes = expected_shapes(&config)?;
                if config.stage == Stage::Lcm {
                    // The teacher's weights, and a fresh guidance embedding (`cond_proj`).
                    let (known, new): (BTreeMap<_, _>, BTreeMap<_, _>) = shapes
                        .into_iter()
                        .map(|(k, v)| (k.strip_prefix("unet.").unwrap().to_string(), v))
                        .partition(|(k, _)| parts.unet.contains(k));
                    params.add_from_weights("unet.", &known, &parts.unet)?;
                    params.add_init("unet.", &new, init_seed(config.seed, 6))?;
                } else {
                    params.add_init("", &shapes, init_seed(config.seed, 6))?;
                }
            }
            Stage::Unet if config.freeze_text_encoder => {
                return Err(Error::invalid(
                    "freeze text encoder",
                    "only a fine-tune (--init-from) can keep its text encoder frozen",
                ))
            }
            Stage::Unet => {
                let (te, unet) = (config.text_encoder.as_ref(), config.unet.as_ref());
                params.add_init(
                    "text_encoder.",
                    &text_encoder_shapes(te.unwrap())?,
                    init_seed(config.seed, 2),
                )?;
                params.add_init(
                    "unet.",
                    &unet_shapes(unet.unwrap())?,
                    init_seed(config.seed, 3),
                )?;
            }
        }
        Self::with_params(config, sources, params, device)
    }

    /// A run over given parameters (fresh, resumed, or a pretrained model to fine-tune).
    pub fn with_params(
        config: TrainConfig,
        sources: &Sources,
        params: ParamStore,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let (tokenizer, tokenizer_dir) = match config.stage {
            Stage::Vae => (None, None),
            Stage::Unet | Stage::Lcm | Stage::LcmLora => {
                let dir = match (&sources.tokenizer_dir, config.stage) {
                    (Some(d), _) => d.clone(),
                    (None, Stage::Unet) => {
                        return Err(Error::invalid(
                            "tokenizer",
                            "the unet stage needs a CLIP tokenizer folder",
                        ))
                    }
                    (None, _) => teacher_dir(sources)?.join("tokenizer"),
                };
                (Some(ClipTokenizer::from_dir(&dir)?), Some(dir))
            }
        };
        let data = WorldData::new(
            config.seed,
            config.dataset_size,
            config.image_size,
            config.style.into(),
            tokenizer.as_ref(),
            device,
        )?;
        let vae = match config.stage {
            Stage::Vae => None,
            Stage::Unet => {
                let dir = sources.vae_dir.as_ref().ok_or_else(|| {
                    Error::invalid(
                        "vae",
                        "the unet stage needs the trained VAE (a folder written by the vae stage)",
                    )
                })?;
                Some(Self::frozen_vae(&config, dir, &data, device)?)
            }
            Stage::Lcm | Stage::LcmLora => {
                let dir = sources.vae_dir.as_deref().unwrap_or(teacher_dir(sources)?);
                Some(Self::frozen_vae(&config, dir, &data, device)?)
            }
        };
        let distill = match config.stage {
            Stage::Lcm | Stage::LcmLora => Some(Self::distill_state(
                &config,
                teacher_dir(sources)?,
                &data,
                device,
            )?),
            _ => None,
        };
        // The average starts as the initial parameters (the full LCM's target network as the student).
        let ema = if config.stage == Stage::Lcm || config.ema_decay.is_some() {
            params
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
                .collect::<Result<BTreeMap<_, _>>>()?
        } else {
            BTreeMap::new()
        };
        let frozen_text_encoder = match (config.freeze_text_encoder, &sources.init_from) {
            (false, _) => None,
            (true, Some(dir)) => {
                let parts = pretrained(dir, device)?;
                let te = ClipTextModel::new(&parts.text_encoder_config, &parts.text_encoder)?;
                Some((te, dir.join("text_encoder")))
            }
            (true, None) => {
                return Err(Error::invalid(
                    "freeze text encoder",
                    "only a fine-tune (--init-from) can keep its text encoder frozen",
                ))
            }
        };
        let opt = AdamW::new(config.optim.clone(), &params)?;
        Ok(Self {
            rng: TrainRng::new(init_seed(config.seed, 4)),
            config,
            params,
            opt,
            step: 0,
            data,
            tokenizer,
            tokenizer_dir,
            vae,
            distill,
            ema,
            frozen_text_encoder,
            alphas_cumprod: alphas_cumprod(&sd_noise_schedule())?,
            device: device.clone(),
        })
    }

    /// Loads the VAE of `dir`, checks it matches the config's, and encodes every dataset image once.
    fn frozen_vae(
        config: &TrainConfig,
        dir: &Path,
        data: &WorldData,
        device: &Device,
    ) -> Result<FrozenVae> {
        let dir = vae_component_dir(dir);
        let cfg: AutoencoderKLConfig = load_json(&dir.join("config.json"))?;
        ensure_same_config("vae", "vae", &config.vae, &cfg, &dir)?;
        let files = crate::weights::diffusers::DiffusersFolder::open(dir.parent().unwrap_or(&dir))
            .ok()
            .and_then(|f| f.component("vae", None).ok())
            .map(|c| c.weights)
            .unwrap_or_else(|| vec![dir.join("diffusion_pytorch_model.safetensors")]);
        let vae = AutoencoderKL::new(&cfg, &Weights::from_files(&files, DType::F32, device)?)?;
        let (mut means, mut stds) = (Vec::new(), Vec::new());
        let n = data.len();
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let post = vae.encode(&data.images.narrow(0, start, len)?)?;
            means.push(post.mean);
            stds.push(post.std);
        }
        Ok(FrozenVae {
            dir,
            mean: Tensor::cat(&means, 0)?,
            std: Tensor::cat(&stds, 0)?,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loss of one batch drawn from the run's random stream, as a graph to differentiate.
    pub fn loss(&mut self) -> Result<Tensor> {
        match self.config.stage {
            Stage::Vae => self.vae_loss(),
            Stage::Unet => self.unet_loss(),
            Stage::Lcm | Stage::LcmLora => self.distill_loss(),
        }
    }

    fn vae_loss(&mut self) -> Result<Tensor> {
        let b = self.config.batch_size;
        let batch = self.data.batch(b, 0.0, &mut self.rng)?;
        let vae = AutoencoderKL::new(&self.config.vae, &self.params.weights().pp("vae"))?;
        let post = vae.encode(&batch.images)?;
        let noise = self.rng.randn(post.mean.dims(), &self.device)?;
        let z = post.sample(&noise)?;
        let recon = vae.decode(&z)?;
        let err = (recon - &batch.images)?;
        let rec = match self.config.recon_loss {
            ReconLoss::L1 => err.abs()?.mean_all()?,
            ReconLoss::L2 => err.sqr()?.mean_all()?,
        };
        let var = post.std.sqr()?;
        let kl_terms = ((post.mean.sqr()? + &var)? - 1.0)?.sub(&var.log()?)?;
        let pixels = batch.images.elem_count() as f64;
        let kl = (kl_terms.sum_all()? * (0.5 / pixels))?;
        Ok((rec + (kl * self.config.kl_weight)?)?)
    }

    fn unet_loss(&mut self) -> Result<Tensor> {
        let b = self.config.batch_size;
        let batch = self
            .data
            .batch(b, self.config.caption_dropout, &mut self.rng)?;
        let z0 = self.sample_latents(&batch.index)?;
        let shape = z0.dims().to_vec();
        let noise = self.rng.randn(&shape, &self.device)?;
        let timesteps: Vec<usize> = (0..b).map(|_| self.rng.below(1000)).collect();
        let alphas: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t]).collect();
        let zt = add_noise(&z0, &noise, &alphas)?;
        let w = self.params.weights();
        let trained_te;
        let te = match &self.frozen_text_encoder {
            Some((te, _)) => te,
            None => {
                trained_te = ClipTextModel::new(
                    self.config.text_encoder.as_ref().unwrap(),
                    &w.pp("text_encoder"),
                )?;
                &trained_te
            }
        };
        let unet = UNet2DConditionModel::new(self.config.unet.as_ref().unwrap(), &w.pp("unet"))?;
        let context = te.encode(&batch.ids, None)?;
        let ts: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let pred = unet.forward_timesteps(&zt, &ts, &context, None, None)?;
        let se = (pred - noise)?.sqr()?;
        match self.config.snr_gamma {
            None => Ok(se.mean_all()?),
            Some(gamma) => {
                // Per-sample means, weighted, then the batch mean (diffusers' `mse_loss_weights`).
                let per_sample = se.flatten_from(1)?.mean(1)?;
                let w = Tensor::from_vec(min_snr_weights(&alphas, gamma), b, &self.device)?;
                Ok((per_sample * w)?.mean_all()?)
            }
        }
    }

    /// `z₀ = scaling_factor · (μ + σ ε')` for the dataset rows `idx`, from the frozen VAE's posteriors.
    fn sample_latents(&mut self, idx: &Tensor) -> Result<Tensor> {
        let frozen = self.vae.as_ref().expect("this stage has a frozen VAE");
        let mean = frozen.mean.index_select(idx, 0)?;
        let std = frozen.std.index_select(idx, 0)?;
        let post_noise = self.rng.randn(mean.dims(), &self.device)?;
        Ok(((mean + (std * post_noise)?)? * self.config.vae.scaling_factor)?)
    }

    /// The frozen teacher of a distillation run (its UNet, the dataset's prompt embeddings, the solver).
    fn distill_state(
        config: &TrainConfig,
        dir: &Path,
        data: &WorldData,
        device: &Device,
    ) -> Result<DistillState> {
        let parts = pretrained(dir, device)?;
        let d = config.distill.as_ref().unwrap();
        let teacher = Teacher::new(&parts, data, d.num_ddim_timesteps, device)?;
        let lora_modules = match config.stage {
            Stage::LcmLora => lora_modules(&unet_shapes(&parts.unet_config)?, d.lora_rank),
            _ => BTreeMap::new(),
        };
        Ok(DistillState {
            teacher,
            teacher_dir: dir.to_path_buf(),
            teacher_unet: parts.unet,
            lora_modules,
        })
    }

    /// The LCD loss of one batch (see [`super::distill`]). The draws, in order: the batch rows, the
    /// posterior noise, per sample the solver index and `w`, then the forward noise.
    fn distill_loss(&mut self) -> Result<Tensor> {
        let b = self.config.batch_size;
        let batch = self.data.batch(b, 0.0, &mut self.rng)?;
        let z0 = self.sample_latents(&batch.index)?;
        let d = self.config.distill.clone().unwrap();
        let state = self.distill.as_ref().unwrap();
        let n = state.teacher.solver.timesteps.len();
        let mut index = Vec::with_capacity(b);
        let mut w = Vec::with_capacity(b);
        for _ in 0..b {
            index.push(self.rng.below(n));
            w.push((d.w_min + (d.w_max - d.w_min) * self.rng.uniform()) as f32);
        }
        let noise = self.rng.randn(z0.dims(), &self.device)?;
        let unet_cfg = self.config.unet.as_ref().unwrap();
        let (student, target, w_dim) = match self.config.stage {
            Stage::Lcm => {
                let student =
                    UNet2DConditionModel::new(unet_cfg, &self.params.weights().pp("unet"))?;
                let index = self
                    .ema
                    .iter()
                    .map(|(k, t)| {
                        (
                            k.strip_prefix("unet.").unwrap_or(k).to_string(),
                            crate::weights::TensorSource::Owned(t.clone()),
                        )
                    })
                    .collect();
                let ema = Weights::from_sources(Vec::new(), index, DType::F32, &self.device);
                let target = UNet2DConditionModel::new(unet_cfg, &ema)?;
                (student, target, unet_cfg.time_cond_proj_dim)
            }
            _ => {
                let with = |detach| -> Result<UNet2DConditionModel> {
                    let branches = lora_branches(&self.params, &state.lora_modules, &d, detach)?;
                    UNet2DConditionModel::new(
                        unet_cfg,
                        &state.teacher_unet.with_lora_branches(branches),
                    )
                };
                (with(false)?, with(true)?, None)
            }
        };
        DistillBatch {
            teacher: &state.teacher,
            cfg: &d,
            z0,
            rows: batch.index,
            index,
            w,
            noise,
        }
        .loss(&student, &target, w_dim)
    }

    /// One optimisation step: a batch, the loss, its gradients, an AdamW update. Returns the loss. A loss
    /// that is not finite stops the run with an error (nothing is updated).
    pub fn train_step(&mut self) -> Result<f32> {
        let loss = self.loss()?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::invalid(
                "loss",
                format!(
                    "is {value} at step {} (lower the learning rate)",
                    self.step + 1
                ),
            ));
        }
        let grads = loss.backward()?;
        self.opt.step(&self.params, &grads)?;
        let decay = match (self.config.stage, self.config.ema_decay) {
            (Stage::Lcm, _) => Some(self.config.distill.as_ref().unwrap().ema_decay),
            (_, Some(d)) => Some(ema_decay_at(d, self.step)),
            _ => None,
        };
        if let Some(decay) = decay {
            super::distill::ema_update(&mut self.ema, &self.params, decay)?;
        }
        self.step += 1;
        Ok(value)
    }

    /// The latent scaling factor measured as SD did: `1 / std(z)` of latents `z ~ q(z|x)` drawn for the
    /// first (up to) 256 dataset images, with a generator of its own (the run's stream is untouched).
    pub fn measure_scaling_factor(&self) -> Result<f64> {
        let vae = AutoencoderKL::new(&self.config.vae, &self.params.weights().pp("vae"))?;
        let n = self.data.len().min(256);
        let mut rng = TrainRng::new(init_seed(self.config.seed, 5));
        let mut zs = Vec::new();
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let post = vae.encode(&self.data.images.narrow(0, start, len)?)?;
            let noise = rng.randn(post.mean.dims(), &self.device)?;
            zs.push(post.sample(&noise)?.detach().flatten_all()?);
        }
        let z = Tensor::cat(&zs, 0)?.to_dtype(DType::F64)?;
        let mean = z.mean_all()?.to_scalar::<f64>()?;
        let var = (z - mean)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
        let std = var.sqrt();
        if !(std.is_finite() && std > 0.0) {
            return Err(Error::invalid(
                "scaling factor",
                format!("the latents' std is {std}"),
            ));
        }
        Ok(1.0 / std)
    }

    /// Writes the trained model as a diffusers folder: the VAE stage a `vae/` folder (config with the
    /// measured `scaling_factor`, weights); the UNet stage a whole pipeline folder (`model_index.json`,
    /// `scheduler/`, `text_encoder/`, `tokenizer/`, `unet/`, and the VAE copied from its source) that
    /// [`crate::pipeline::StableDiffusion::load_dir`] and diffusers read.
    pub fn export(&self, out: &Path) -> Result<()> {
        super::export::export(self, out)
    }

    pub(crate) fn tokenizer_dir(&self) -> Option<&Path> {
        self.tokenizer_dir.as_deref()
    }

    /// The frozen text encoder's folder of a fine-tune that keeps it.
    pub(crate) fn frozen_text_encoder_dir(&self) -> Option<&Path> {
        self.frozen_text_encoder.as_ref().map(|(_, d)| d.as_path())
    }

    pub(crate) fn frozen_vae_dir(&self) -> Option<&Path> {
        self.vae.as_ref().map(|v| v.dir.as_path())
    }

    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.tokenizer.as_ref()
    }
}

/// The first leaf where two JSON values differ: `(path, ours, theirs)`, paths like `optim.lr` or
/// `unet.block_out_channels[1]`.
pub fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: &str,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                if let Some(d) = first_difference(va, vb, &join(k)) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some((path.to_string(), a.to_string(), b.to_string())),
    }
}
