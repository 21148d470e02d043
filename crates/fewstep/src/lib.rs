//! fewstep: text-to-image and image-to-image in 1–8 steps with Latent Consistency Models (LCM) and
//! LCM-LoRA, with diffusers' semantics. See `DESIGN.md` for how the pieces fit.

pub mod allocator;
pub mod config;
pub mod error;
pub mod eval;
pub mod files;
pub mod flops;
pub mod image;
pub mod kernels;
pub mod lora;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;
pub mod train;
pub mod weights;
pub mod world;

pub use error::{Error, Result};
