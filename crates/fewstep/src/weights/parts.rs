//! The parts of a Stable Diffusion model, read but not yet built: each component's config and its
//! [`Weights`] view. Loaders (a diffusers folder, a single-file checkpoint) produce them; LoRAs rewrite
//! the views; [`crate::pipeline::StableDiffusion::from_parts`] builds the models.

use candle_core::{DType, Device};

use super::diffusers::DiffusersFolder;
use super::Weights;
use crate::config::{
    load_json, AutoencoderKLConfig, ClipTextConfig, SchedulerConfig, UNet2DConditionConfig,
};
use crate::models::taesd::TaesdLayout;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// Configs and weight views of a model's components.
#[derive(Clone)]
pub struct ModelParts {
    pub tokenizer: ClipTokenizer,
    pub text_encoder_config: ClipTextConfig,
    pub text_encoder: Weights,
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

    /// Replaces the VAE with the one in `path`: a TAESD (either layout, [`TaesdLayout::detect`]) or a
    /// KL autoencoder (see [`super::single_file::load_vae_file_like`]; the current VAE's config supplies
    /// what the shapes cannot tell).
    pub fn with_vae_file(mut self, path: &std::path::Path) -> Result<Self> {
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

    /// Reads a diffusers folder. With `dtype` f16 the `fp16` variant files are preferred where present.
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
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&folder.component_dir("tokenizer")?)?,
            text_encoder_config: load_json(&te_cfg)?,
            text_encoder,
            unet_config: load_json(&unet_cfg)?,
            unet,
            vae_config: load_json(&vae_cfg)?,
            vae,
            taesd: None,
            scheduler_config: load_json(&folder.scheduler_config()?)?,
        })
    }
}
