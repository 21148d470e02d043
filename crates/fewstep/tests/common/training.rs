//! Tiny training runs shared by the training and distillation tests.

use std::path::{Path, PathBuf};

use candle_core::Device;
use fewstep::train::{Preset, Sources, Stage, TrainConfig, Trainer};

pub fn tokenizer_dir() -> PathBuf {
    super::fixture("tiny-sd/tokenizer")
}

pub fn vae_config(steps: usize) -> TrainConfig {
    let mut c = TrainConfig::preset(Stage::Vae, Preset::Tiny);
    c.steps = steps;
    c.batch_size = 4;
    c.dataset_size = 32;
    c.optim.lr = 5e-3;
    c.seed = 7;
    c
}

pub fn unet_config(steps: usize) -> TrainConfig {
    let mut c = TrainConfig::preset(Stage::Unet, Preset::Tiny);
    c.steps = steps;
    c.batch_size = 4;
    c.dataset_size = 32;
    c.optim.lr = 1e-3;
    c.seed = 11;
    c
}

/// A tiny VAE trained for `steps` steps, exported to `dir`; returns the config the UNet stage must use.
pub fn tiny_vae(dir: &Path, steps: usize) -> TrainConfig {
    let mut t = Trainer::new(vae_config(steps), &Sources::default(), &Device::Cpu).unwrap();
    for _ in 0..steps {
        t.train_step().unwrap();
    }
    t.export(dir).unwrap();
    let vae: fewstep::config::AutoencoderKLConfig =
        fewstep::config::load_json(&dir.join("vae/config.json")).unwrap();
    let mut c = unet_config(0);
    c.vae = vae;
    c
}

pub fn unet_sources(vae_dir: &Path) -> Sources {
    Sources {
        tokenizer_dir: Some(tokenizer_dir()),
        vae_dir: Some(vae_dir.to_path_buf()),
        ..Sources::default()
    }
}

pub fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

/// A tiny trained pipeline folder in `dir` (`dir/vae` then `dir/model`): a VAE of 10 steps and a text
/// encoder + UNet of `steps` steps — a teacher for the distillation tests.
pub fn tiny_teacher(dir: &Path, steps: usize) -> PathBuf {
    let vae_dir = dir.join("vae-run");
    let mut cfg = tiny_vae(&vae_dir, 10);
    cfg.steps = steps;
    let mut t = Trainer::new(cfg, &unet_sources(&vae_dir), &Device::Cpu).unwrap();
    for _ in 0..steps {
        t.train_step().unwrap();
    }
    let model = dir.join("model");
    t.export(&model).unwrap();
    model
}
