//! The parts of a Stable Diffusion model, read but not yet built: each component's config and its
//! [`Weights`] view. Loaders (a diffusers folder, a single-file checkpoint) produce them; LoRAs rewrite
//! the views; [`crate::pipeline::StableDiffusion::from_parts`] builds the models.

use candle_core::{DType, Device};

use super::diffusers::DiffusersFolder;
use super::family::Family;
use super::Weights;
use crate::config::{
    load_json, AutoencoderKLConfig, ClipTextConfig, SchedulerConfig, UNet2DConditionConfig,
};
use crate::models::taesd::TaesdLayout;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// SDXL's second text encoder (`text_encoder_2/`, transformers' `CLIPTextModelWithProjection`) and its
/// tokenizer (`tokenizer_2/`, padding with `!`).
#[derive(Clone)]
pub struct TextEncoder2Parts {
    pub tokenizer: ClipTokenizer,
    pub config: ClipTextConfig,
    pub weights: Weights,
}

/// Configs and weight views of a model's components.
#[derive(Clone)]
pub struct ModelParts {
    pub tokenizer: ClipTokenizer,
    pub text_encoder_config: ClipTextConfig,
    pub text_encoder: Weights,
    /// SDXL's second text encoder; `None` for SD1.x/SD2.x.
    pub text_encoder_2: Option<TextEncoder2Parts>,
    /// diffusers' `force_zeros_for_empty_prompt` (`model_index.json`; SDXL's default true): with
    /// classifier-free guidance and no negative prompt, the negative embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
    pub unet_config: UNet2DConditionConfig,
    pub unet: Weights,
    pub vae_config: AutoencoderKLConfig,
    pub vae: Weights,
    /// A TAESD given with `--vae`, with its key layout: it decodes (and, where it has an encoder, encodes)
    /// in place of the VAE.
    pub taesd: Option<(Weights, TaesdLayout)>,
    pub scheduler_config: SchedulerConfig,
}

impl ModelParts {
    /// Opens `--model`'s value: a `.safetensors` single-file checkpoint (original Stable Diffusion layout,
    /// see [`super::single_file`]), a diffusers folder, or a Hugging Face repo id. PyTorch pickles
    /// (`.ckpt`, `.pt`, `.bin`) are refused, naming the file.
    pub fn open(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        let path = std::path::Path::new(spec);
        super::refuse_pickle(
            path,
            "use the .safetensors version of this checkpoint (most models publish one beside the .ckpt)",
        )?;
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if is_safetensors || path.is_file() {
            return super::single_file::load_single_file(path, dtype, device);
        }
        let dir = super::hub::resolve_model(spec, dtype == DType::F16)?;
        Self::from_folder(&DiffusersFolder::open(dir)?, dtype, device)
    }

    /// Replaces the VAE with the one in `path`: a diffusers `AutoencoderKL` folder (`config.json` and
    /// weights, e.g. SDXL's fp16-fix VAE, whose `force_upcast: false` lets f16 pipelines decode in f16), a
    /// TAESD (either layout, [`TaesdLayout::detect`]) or a KL autoencoder file (see
    /// [`super::single_file::load_vae_file_like`]; the current VAE's config supplies what the shapes
    /// cannot tell).
    pub fn with_vae_file(mut self, path: &std::path::Path) -> Result<Self> {
        if path.is_dir() {
            let variant = (self.vae.dtype() == DType::F16).then_some("fp16");
            let files = super::diffusers::ComponentFiles::in_dir(path, variant)?;
            self.vae_config = load_json(&files.config)?;
            self.vae = Weights::from_files(&files.weights, self.vae.dtype(), self.vae.device())?;
            return Ok(self);
        }
        let layout = TaesdLayout::detect(super::SafetensorsFile::open(path)?.tensors().keys());
        if let Some(layout) = layout {
            let w = Weights::from_files(&[path], self.vae.dtype(), self.vae.device())?;
            self.taesd = Some((w, layout));
            return Ok(self);
        }
        let (config, weights) = super::single_file::load_vae_file_like(
            path,
            Some(&self.vae_config),
            self.vae.dtype(),
            self.vae.device(),
        )?;
        self.vae_config = config;
        self.vae = weights;
        Ok(self)
    }

    /// The model family, from the UNet's config (see [`Family::of_unet`]).
    pub fn family(&self) -> Family {
        Family::of_unet(&self.unet_config)
    }

    /// Checks that the components belong together: an SDXL UNet has its second text encoder, and its
    /// context width is the two encoders' widths side by side; an SD1.x/SD2.x UNet has no second encoder.
    pub fn check_family(&self) -> Result<()> {
        let family = self.family();
        let width = self.text_encoder_config.hidden_size
            + self
                .text_encoder_2
                .as_ref()
                .map_or(0, |t| t.config.hidden_size);
        match (&self.text_encoder_2, family) {
            (None, Family::Sdxl) => {
                return Err(Error::invalid(
                    "text_encoder_2",
                    "the UNet is an SDXL UNet (addition_embed_type \"text_time\"), but the model has no \
                     second text encoder (`text_encoder_2/` with `tokenizer_2/`)",
                ))
            }
            (Some(_), f) if f != Family::Sdxl => {
                return Err(Error::invalid(
                    "unet",
                    format!(
                        "the model has a second text encoder (SDXL), but its UNet is {f}'s (no \
                         addition_embed_type \"text_time\")"
                    ),
                ))
            }
            _ => {}
        }
        let context = self.unet_config.cross_attention_dim.get(0);
        if context != width {
            return Err(Error::invalid(
                "unet config `cross_attention_dim`",
                format!(
                    "{context}, but the text encoder{} {width} wide ({family})",
                    if self.text_encoder_2.is_some() {
                        "s together are"
                    } else {
                        " is"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Reads a diffusers folder. With `dtype` f16 the `fp16` variant files are preferred where present.
    /// `model_index.json` decides whether the model has a second text encoder (an SDXL pipeline class
    /// or a `text_encoder_2` entry); its UNet config must then be SDXL's, and the other way round.
    pub fn from_folder(folder: &DiffusersFolder, dtype: DType, device: &Device) -> Result<Self> {
        let variant = (dtype == DType::F16).then_some("fp16");
        let component = |name: &str| -> Result<(std::path::PathBuf, Weights)> {
            let files = folder.component(name, variant)?;
            Ok((
                files.config,
                Weights::from_files(&files.weights, dtype, device)?,
            ))
        };
        let (te_cfg, text_encoder) = component("text_encoder")?;
        let (unet_cfg, unet) = component("unet")?;
        let (vae_cfg, vae) = component("vae")?;
        let index = folder.model_index()?;
        let unet_config: UNet2DConditionConfig = load_json(&unet_cfg)?;
        let found = Family::of_unet(&unet_config);
        if index.is_sdxl() && found != Family::Sdxl {
            return Err(Error::invalid(
                format!("model {}", folder.root().display()),
                format!(
                    "model_index.json names {}, but unet/config.json is {found}'s UNet (no \
                     addition_embed_type \"text_time\"): these are not SDXL weights",
                    index.class_name.as_deref().unwrap_or("an SDXL pipeline")
                ),
            ));
        }
        let text_encoder_2 = if index.is_sdxl() || found == Family::Sdxl {
            let (cfg, weights) = component("text_encoder_2")?;
            Some(TextEncoder2Parts {
                tokenizer: ClipTokenizer::from_dir(&folder.component_dir("tokenizer_2")?)?,
                config: load_json(&cfg)?,
                weights,
            })
        } else {
            None
        };
        let parts = Self {
            tokenizer: ClipTokenizer::from_dir(&folder.component_dir("tokenizer")?)?,
            text_encoder_config: load_json(&te_cfg)?,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: index
                .force_zeros_for_empty_prompt
                .unwrap_or(found == Family::Sdxl),
            unet_config,
            unet,
            vae_config: load_json(&vae_cfg)?,
            vae,
            taesd: None,
            scheduler_config: load_json(&folder.scheduler_config()?)?,
        };
        parts.check_family()?;
        Ok(parts)
    }
}
