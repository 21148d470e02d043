//! The model families: CLIP text encoder, UNet, VAE. Each is built from its diffusers config and a
//! [`Weights`](crate::weights::Weights) view and knows nothing of schedulers or pipelines.

pub mod clip;
pub mod nn;
pub mod taesd;
pub mod unet;
pub mod vae;

pub use unet::UNet2DConditionModel;
pub use vae::{AutoencoderKL, DiagonalGaussian};
