//! The pipeline owns the denoising loop and nothing else: it encodes the prompt, asks the scheduler for
//! timesteps, calls the UNet, hands its output back to the scheduler, and decodes the final latents.
//! Semantics follow diffusers' `StableDiffusionPipeline`, `LatentConsistencyModelPipeline` and
//! `LatentConsistencyModelImg2ImgPipeline`, and for SDXL `StableDiffusionXLPipeline`, including the
//! order of random draws, so a seed gives diffusers' picture.

pub mod conditioning;
pub mod guidance;
pub mod img2img;
pub mod txt2img;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::SchedulerConfig;
use crate::image::RgbImage;
use crate::models::clip::ClipTextModel;
use crate::models::taesd::AutoencoderTiny;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::{AutoencoderKL, VaeTiling};
use crate::rng::TorchGenerator;
use crate::schedulers::{self, ScheduleRequest, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::weights::diffusers::DiffusersFolder;
use crate::weights::parts::ModelParts;
use crate::{Error, Result};

pub use conditioning::PromptEmbeds;
pub use guidance::Guidance;

/// A Stable Diffusion model (SD1.x, SD2.x or SDXL) built from its parts.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second tokenizer and text encoder (`CLIPTextModelWithProjection`).
    pub text_encoder_2: Option<(ClipTokenizer, ClipTextModel)>,
    /// With CFG and no negative prompt, SDXL's negative embeddings are zeros (`model_index.json`).
    pub force_zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// A TAESD that decodes (and encodes, where it has an encoder) in place of `vae`.
    pub taesd: Option<AutoencoderTiny>,
    /// Decode with the VAE tile by tile (diffusers' `enable_vae_tiling`); off by default.
    pub vae_tiling: Option<VaeTiling>,
    pub scheduler_config: SchedulerConfig,
    dtype: DType,
    device: Device,
}

/// What to generate. Defaults are those of the CLI contract (see [`StableDiffusion::request`]).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
    pub num_images: usize,
    pub clip_skip: Option<usize>,
    pub original_inference_steps: Option<usize>,
    /// img2img: the initial image (RGB, `width`×`height`) and the strength in (0, 1].
    pub init_image: Option<RgbImage>,
    pub strength: f64,
}

/// The result of a generation.
pub struct Output {
    /// The VAE's output `[B, 3, H, W]` f32, nominally in [-1, 1]; [`crate::image::tensor_to_images`]
    /// turns it into pictures as diffusers' postprocessing does.
    pub decoded: Tensor,
    /// The final latents before decoding, `[B, C, H/8, W/8]` f32.
    pub latents: Tensor,
}

impl StableDiffusion {
    /// Builds the models from their parts, for inference: on a CPU with a product kernel for the
    /// dtype, the layers keep their weights packed for it
    /// ([`crate::weights::Weights::for_cpu_inference`]).
    pub fn from_parts(parts: &ModelParts, device: &Device) -> Result<Self> {
        parts.check_family()?;
        let dtype = parts.unet.dtype();
        let taesd = parts
            .taesd
            .as_ref()
            .map(|(w, layout)| AutoencoderTiny::from_layout(w, *layout))
            .transpose()?;
        let latent = parts.unet_config.in_channels;
        if let Some(d) = taesd.as_ref().and_then(|t| t.decoder.as_ref()) {
            if d.latent_channels() != latent {
                return Err(Error::invalid(
                    "vae",
                    format!(
                        "the TAESD decodes {} latent channels, the UNet makes {latent}",
                        d.latent_channels()
                    ),
                ));
            }
        }
        let text_encoder_2 = parts
            .text_encoder_2
            .as_ref()
            .map(|t| {
                Ok::<_, Error>((
                    t.tokenizer.clone(),
                    ClipTextModel::with_projection(&t.config, &t.weights.for_cpu_inference())?,
                ))
            })
            .transpose()?;
        // diffusers' SDXL pipelines decode in f32 when the VAE is f16 and its config asks (`force_upcast`:
        // SDXL's VAE overflows in f16); SD1.x/SD2.x pipelines do not.
        let upcast_vae = parts.text_encoder_2.is_some()
            && parts.vae.dtype() == DType::F16
            && parts.vae_config.force_upcast;
        // The VAE's weights are not packed at load: its convolutions' products are wide (a 512² image
        // has 262,144 columns), so packing a weight at each call costs little, and the packed-at-load
        // decoder measured 6 % slower in bf16 (docs/performance.md).
        let vae_weights = if upcast_vae {
            parts.vae.with_dtype(DType::F32)
        } else {
            parts.vae.clone()
        };
        let model = Self {
            tokenizer: parts.tokenizer.clone(),
            text_encoder: ClipTextModel::new(
                &parts.text_encoder_config,
                &parts.text_encoder.for_cpu_inference(),
            )?,
            text_encoder_2,
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            unet: UNet2DConditionModel::new(&parts.unet_config, &parts.unet.for_cpu_inference())?,
            vae: AutoencoderKL::new(&parts.vae_config, &vae_weights)?,
            taesd,
            vae_tiling: None,
            scheduler_config: parts.scheduler_config.clone(),
            dtype,
            device: device.clone(),
        };
        tracing::info!(unet = %parts.unet.label(), ?dtype, "model built");
        Ok(model)
    }

    /// Loads the tokenizer, text encoder, UNet, VAE and scheduler config of a diffusers folder.
    pub fn load(folder: &DiffusersFolder, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_parts(&ModelParts::from_folder(folder, dtype, device)?, device)
    }

    /// Opens `path` as a diffusers folder and loads it.
    pub fn load_dir(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(&DiffusersFolder::open(path)?, dtype, device)
    }

    /// A full LCM model carries the guidance embedding (`time_cond_proj_dim`).
    pub fn is_full_lcm(&self) -> bool {
        self.unet.config().time_cond_proj_dim.is_some()
    }

    /// Pixels per latent along a side (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The native image size: `unet.sample_size × vae_scale_factor` (512 for SD1.5).
    pub fn native_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// Whether this is an SDXL model (two text encoders, micro-conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// The default guidance scale: 8.5 for a full LCM model (through the w-embedding), 1.0 (no CFG) for
    /// the LCM-LoRA recipe, for the non-distilled schedulers 7.5 (SDXL: 5.0, its pipeline's default).
    pub fn default_guidance(&self, scheduler: SchedulerKind) -> f64 {
        if self.is_full_lcm() {
            8.5
        } else if scheduler == SchedulerKind::Lcm {
            1.0
        } else if self.is_sdxl() {
            5.0
        } else {
            7.5
        }
    }

    /// A request with the defaults of the CLI: LCM, 4 steps, the model's guidance and native size.
    pub fn request(&self, prompt: &str, seed: u64) -> Request {
        let size = self.native_size();
        Request {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 4,
            guidance: self.default_guidance(SchedulerKind::Lcm),
            seed,
            width: size,
            height: size,
            scheduler: SchedulerKind::Lcm,
            num_images: 1,
            clip_skip: None,
            original_inference_steps: None,
            init_image: None,
            strength: 1.0,
        }
    }

    /// Checks a request before any work: sizes divisible by the VAE factor, finite guidance, a batch of at
    /// least one, strength in (0, 1], an init image of the requested size.
    pub fn validate(&self, req: &Request) -> Result<()> {
        let f = self.vae_scale_factor();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a positive multiple of {f}"),
                ));
            }
        }
        if !req.guidance.is_finite() {
            return Err(Error::invalid(
                "guidance",
                format!("expected a finite number, got {}", req.guidance),
            ));
        }
        if req.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if req.num_images == 0 {
            return Err(Error::invalid("num-images", "must be at least 1"));
        }
        if !(req.strength > 0.0 && req.strength <= 1.0) {
            return Err(Error::invalid(
                "strength",
                format!("expected a number in (0, 1], got {}", req.strength),
            ));
        }
        if let Some(img) = &req.init_image {
            if (img.width, img.height) != (req.width, req.height) {
                return Err(Error::invalid(
                    "init-image",
                    format!(
                        "the image is {}x{}, the request {}x{}",
                        img.width, img.height, req.width, req.height
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs one generation. `on_step(i, n)` is called after each of the `n` UNet steps.
    pub fn generate(&self, req: &Request, on_step: &mut dyn FnMut(usize, usize)) -> Result<Output> {
        self.generate_prompts(std::slice::from_ref(&req.prompt), req, on_step)
    }

    /// Runs one batched generation of several prompts, as diffusers' pipelines do with a list of
    /// prompts: the batch is `prompts.len() × num_images`, prompt `p`'s images are rows
    /// `p·num_images ..`, the negative prompt is shared, and the initial noise of the whole batch is
    /// drawn in one call from the generator seeded with `req.seed` (`req.prompt` is not used).
    pub fn generate_prompts(
        &self,
        prompts: &[String],
        req: &Request,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Output> {
        self.validate(req)?;
        if prompts.is_empty() {
            return Err(Error::invalid("prompts", "give at least one prompt"));
        }
        let strength = if req.init_image.is_some() {
            req.strength
        } else {
            1.0
        };
        let mut scheduler = schedulers::build(
            req.scheduler,
            &self.scheduler_config,
            &ScheduleRequest {
                steps: req.steps,
                strength,
                original_inference_steps: req.original_inference_steps,
                custom_timesteps: None,
            },
        )?;
        let guidance = Guidance::for_model(req.guidance, self.unet.config().time_cond_proj_dim);
        let batch = prompts.len() * req.num_images;
        let conds = prompts
            .iter()
            .map(|p| Ok((self.encode_prompt(p, req.clip_skip)?, req.num_images)))
            .collect::<Result<Vec<_>>>()?;
        let mut rows = Vec::with_capacity(conds.len() + 1);
        if guidance.is_cfg() {
            rows.push((
                self.encode_negative(&req.negative_prompt, &conds[0].0)?,
                batch,
            ));
        }
        rows.extend(conds);
        let embeds = PromptEmbeds::batch(&rows)?;
        let context = embeds.context.clone();
        let added = self.added_cond(&embeds, req.height, req.width)?;
        let mut rng = TorchGenerator::new(req.seed);
        let mut latents = match &req.init_image {
            None => txt2img::initial_latents(self, req, batch, scheduler.as_ref(), &mut rng)?,
            Some(image) => {
                img2img::initial_latents(self, image, batch, scheduler.as_ref(), &mut rng)?
            }
        };
        let timestep_cond = guidance.timestep_cond(batch, self.dtype, &self.device)?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guidance.is_cfg() {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler
                .scale_model_input(&input, t)?
                .to_dtype(self.dtype)?;
            let pred =
                self.unet
                    .forward(&input, t, &context, timestep_cond.as_ref(), added.as_ref())?;
            let pred = guidance.combine(pred.to_dtype(DType::F32)?)?;
            latents = scheduler.step(&pred, t, &latents, &mut rng)?;
            on_step(i + 1, timesteps.len());
        }
        let decoded = self.decode(&latents)?;
        Ok(Output { decoded, latents })
    }

    /// Latents → image in [-1, 1]: `vae.decode(z / scaling_factor + shift_factor)` (tiled with
    /// `vae_tiling`), in f32; with a TAESD,
    /// `2·taesd(z) − 1` (TAESD works on the UNet's latents as they are, diffusers' `AutoencoderTiny` with
    /// scaling factor 1, and returns [0, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        if let Some(d) = self.taesd.as_ref().and_then(|t| t.decoder.as_ref()) {
            let x = d
                .forward(&latents.to_dtype(self.dtype)?)?
                .to_dtype(DType::F32)?;
            return Ok(((x * 2.0)? - 1.0)?);
        }
        let cfg = self.vae.config();
        let z = ((latents / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
        let z = z.to_dtype(self.vae.dtype())?;
        let x = match &self.vae_tiling {
            Some(tiling) => self.vae.decode_tiled(&z, tiling)?,
            None => self.vae.decode(&z)?,
        };
        Ok(x.to_dtype(DType::F32)?)
    }

    /// The A1111-style `parameters` text that reproduces a generation.
    pub fn parameters_text(&self, req: &Request, model: &str) -> String {
        let mut s = req.prompt.clone();
        if !req.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, RNG: torch",
            req.steps, req.scheduler, req.guidance, req.seed, req.width, req.height, model
        ));
        if req.init_image.is_some() {
            s.push_str(&format!(", Denoising strength: {}", req.strength));
        }
        if let Some(k) = req.clip_skip {
            s.push_str(&format!(", Clip skip: {}", k + 1));
        }
        s
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}
