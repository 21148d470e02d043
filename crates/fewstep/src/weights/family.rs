//! The model families fewstep runs — SD1.x, SD2.x, SDXL — told apart from a UNet config (folders) or
//! from a single file's keys ([`super::single_file::detect`]).

use crate::config::UNet2DConditionConfig;

/// A Stable Diffusion model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H text encoder under `cond_stage_model.model.`.
    Sd2,
    /// SDXL base: two text encoders under `conditioner.embedders.0/1.`.
    Sdxl,
    /// SDXL refiner: one OpenCLIP encoder under `conditioner.embedders.0.model.`.
    SdxlRefiner,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
        })
    }
}

impl Family {
    /// The family a UNet config describes: SDXL's `addition_embed_type: "text_time"`; SD2.x's 1024-wide
    /// context (OpenCLIP ViT-H) or, for other widths, its linear projections with upcast attention; SD1.x
    /// otherwise.
    pub fn of_unet(c: &UNet2DConditionConfig) -> Family {
        if c.addition_embed_type.as_deref() == Some("text_time") {
            return Family::Sdxl;
        }
        match c.cross_attention_dim.get(0) {
            1024 => Family::Sd2,
            768 => Family::Sd1,
            _ if c.use_linear_projection && c.upcast_attention => Family::Sd2,
            _ => Family::Sd1,
        }
    }
}
