//! How the guidance scale reaches the model, as diffusers' Stable Diffusion and LCM pipelines decide it.

use candle_core::{DType, Device, Tensor};

use crate::models::unet::guidance_scale_embedding;
use crate::Result;

/// The guidance mode of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// A single conditional UNet call per step (guidance ≤ 1, e.g. the LCM-LoRA recipe).
    Off,
    /// Classifier-free guidance (Ho & Salimans 2022): a batch of (unconditional, conditional) and
    /// `ε = ε_u + s·(ε_c − ε_u)`.
    Classifier { scale: f64 },
    /// Full LCM models (Luo et al. 2023): the scale enters the UNet as a sinusoidal embedding of
    /// `w = s − 1` (`time_cond_proj_dim`), with no unconditional batch.
    Embedding { w: f64, dim: usize },
}

impl Guidance {
    /// diffusers' rule: CFG when `scale > 1` and the UNet has no `time_cond_proj_dim`; the w-embedding
    /// whenever it has one.
    pub fn for_model(scale: f64, time_cond_proj_dim: Option<usize>) -> Self {
        match time_cond_proj_dim {
            Some(dim) => Guidance::Embedding {
                w: scale - 1.0,
                dim,
            },
            None if scale > 1.0 => Guidance::Classifier { scale },
            None => Guidance::Off,
        }
    }

    /// Whether each UNet call carries the unconditional half of the batch.
    pub fn is_cfg(&self) -> bool {
        matches!(self, Guidance::Classifier { .. })
    }

    /// The `timestep_cond` for a batch of `batch`, if this mode has one.
    pub fn timestep_cond(
        &self,
        batch: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        match *self {
            Guidance::Embedding { w, dim } => Ok(Some(guidance_scale_embedding(
                &vec![w; batch],
                dim,
                dtype,
                device,
            )?)),
            _ => Ok(None),
        }
    }

    /// Combines the UNet's prediction: for CFG the batch is `[uncond; cond]` and the result
    /// `ε_u + s·(ε_c − ε_u)`; otherwise the prediction is returned unchanged.
    pub fn combine(&self, pred: Tensor) -> Result<Tensor> {
        match *self {
            Guidance::Classifier { scale } => {
                let half = pred.dim(0)? / 2;
                let uncond = pred.narrow(0, 0, half)?;
                let cond = pred.narrow(0, half, half)?;
                Ok((&uncond + ((cond - &uncond)? * scale)?)?)
            }
            _ => Ok(pred),
        }
    }
}
