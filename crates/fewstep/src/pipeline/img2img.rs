//! Image-to-image. The strength sets where on the schedule the image enters: for LCM through the
//! scheduler's own `strength` (as `LatentConsistencyModelImg2ImgPipeline`), so `steps` is the number of
//! UNet calls; for the other schedulers by skipping the first steps (as `StableDiffusionImg2ImgPipeline`).

use candle_core::{DType, Tensor};

use super::StableDiffusion;
use crate::image::{images_to_tensor, RgbImage};
use crate::rng::TorchGenerator;
use crate::schedulers::Scheduler;
use crate::Result;

/// `z_0 = scaling · (μ + σ·ε₁ − shift)` from the VAE posterior of the image (one draw) — or, with a TAESD
/// that has an encoder, `z_0 = taesd_encoder(image in [0, 1])` and no draw, as diffusers'
/// `AutoencoderTiny` — repeated to the batch, then `x_t = add_noise(z_0, ε₂, t_0)` at the first timestep,
/// `ε₂` drawn for the whole batch: diffusers' draw order.
pub fn initial_latents(
    model: &StableDiffusion,
    image: &RgbImage,
    batch: usize,
    scheduler: &dyn Scheduler,
    rng: &mut TorchGenerator,
) -> Result<Tensor> {
    let x = images_to_tensor(std::slice::from_ref(image), model.dtype(), model.device())?;
    let z0 = match model.taesd.as_ref().and_then(|t| t.encoder.as_ref()) {
        Some(encoder) => encoder
            .forward(&((x + 1.0)? / 2.0)?)?
            .to_dtype(DType::F32)?,
        None => vae_latents(model, &x, rng)?,
    };
    let z0 = z0.repeat((batch, 1, 1, 1))?;
    let noise = rng.randn_tensor(z0.dims(), DType::F32, model.device())?;
    let t0 = scheduler.timesteps()[0];
    scheduler.add_noise(&z0, &noise, t0)
}

/// `scaling · (μ + σ·ε − shift)`: one draw from the KL VAE's posterior of images in [−1, 1].
fn vae_latents(model: &StableDiffusion, x: &Tensor, rng: &mut TorchGenerator) -> Result<Tensor> {
    let posterior = model.vae.encode(&x.to_dtype(model.vae.dtype())?)?;
    let mean = posterior.mean.to_dtype(DType::F32)?;
    let std = posterior.std.to_dtype(DType::F32)?;
    let eps = rng.randn_tensor(mean.dims(), DType::F32, model.device())?;
    let sample = (mean + (std * eps)?)?;
    let cfg = model.vae.config();
    Ok(((sample - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
}
