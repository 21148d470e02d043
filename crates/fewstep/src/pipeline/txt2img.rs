//! Text-to-image: the initial latents are pure noise.

use candle_core::{DType, Tensor};

use super::{Request, StableDiffusion};
use crate::rng::TorchGenerator;
use crate::schedulers::Scheduler;
use crate::Result;

/// `x_T = ε · init_noise_sigma`, `ε ~ N(0, I)` of shape `[B, C, H/8, W/8]` drawn in one call from the
/// generator (diffusers' `prepare_latents`).
pub fn initial_latents(
    model: &StableDiffusion,
    req: &Request,
    batch: usize,
    scheduler: &dyn Scheduler,
    rng: &mut TorchGenerator,
) -> Result<Tensor> {
    let f = model.vae_scale_factor();
    let shape = [
        batch,
        model.unet.config().in_channels,
        req.height / f,
        req.width / f,
    ];
    let noise = rng.randn_tensor(&shape, DType::F32, model.device())?;
    Ok((noise * scheduler.init_noise_sigma())?)
}
