//! The parts of a Stable Diffusion model, read but not yet built: each component's config and its
//! [`Weights`] view. Loaders (a diffusers folder, a single-file checkpoint) produce them; LoRAs rewrite
//! the views; [`crate::pipeline::StableDiffusion::from_parts`] builds the models.

use candle_core::{DType, Device};

use super::diffusers::DiffusersFolder;
use super::Weights;
use crate::config::{
    load_json, AutoencoderKLConfig, ClipTextConfig, SchedulerConfig, UNet2DConditionConfig,
};
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
    pub scheduler_config: SchedulerConfig,
}

impl ModelParts {
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
            scheduler_config: load_json(&folder.scheduler_config()?)?,
        })
    }
}
