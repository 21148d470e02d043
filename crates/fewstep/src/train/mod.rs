//! Training: the parameter store that makes the inference models trainable ([`params`]), the world's
//! data ([`data`]), AdamW ([`optim`]), the two teacher stages of Stable Diffusion ([`diffusion`]),
//! checkpoints that resume exactly ([`checkpoint`]), the diffusers-folder export ([`export`]) and the
//! latent consistency distillation objective ([`lcd`]).

pub mod checkpoint;
pub mod data;
pub mod diffusion;
pub mod distill;
pub mod export;
pub mod lcd;
pub mod optim;
pub mod params;

pub use checkpoint::{load_checkpoint, save_checkpoint, CHECKPOINT_FILE};
pub use data::{Batch, TrainRng, WorldData};
pub use diffusion::{Preset, Sources, Stage, TrainConfig, Trainer, WorldStyle};
pub use optim::{AdamW, AdamWConfig};
pub use params::ParamStore;
