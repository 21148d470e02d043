//! `fewstep distill`: latent consistency distillation of a trained model into a full LCM or an
//! LCM-LoRA, with a progress bar and checkpoints that resume exactly.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use fewstep::config::load_json;
use fewstep::train::distill::{student_unet_config, DistillConfig};
use fewstep::train::lcd::LcdLoss;
use fewstep::train::{Preset, Sources, Stage, TrainConfig};

use crate::train::{run_to_end, RunArgs};

#[derive(Clone, Copy, ValueEnum)]
pub enum VariantArg {
    /// A full LCM UNet (with the guidance embedding), written as a pipeline folder.
    Lcm,
    /// An LCM-LoRA, written as OUT/pytorch_lora_weights.safetensors (kohya layout).
    LcmLora,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LossArg {
    L2,
    Huber,
}

#[derive(clap::Args)]
pub struct Args {
    /// The teacher: a trained model folder (its UNet is distilled; its text encoder and VAE are used
    /// frozen).
    #[arg(long)]
    teacher: PathBuf,
    #[arg(long, value_enum)]
    variant: VariantArg,
    #[command(flatten)]
    run: RunArgs,
    /// Guidance w (scale − 1) drawn from [w-min, w-max].
    #[arg(long, default_value_t = 3.0)]
    w_min: f64,
    #[arg(long, default_value_t = 15.0)]
    w_max: f64,
    /// DDIM solver timesteps (skip = 1000 / n).
    #[arg(long, default_value_t = 50)]
    ddim_timesteps: usize,
    #[arg(long, value_enum, default_value = "huber")]
    loss: LossArg,
    /// The pseudo-Huber loss's c.
    #[arg(long, default_value_t = 0.001)]
    huber_c: f64,
    /// Full LCM: EMA rate of the target network.
    #[arg(long, default_value_t = 0.95)]
    ema_decay: f64,
    /// Full LCM: width of the guidance embedding.
    #[arg(long, default_value_t = 256)]
    time_cond_proj_dim: usize,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// LoRA alpha (default: the rank, scale 1).
    #[arg(long)]
    lora_alpha: Option<f64>,
}

pub fn run(args: Args) -> Result<()> {
    let device = crate::train::device(args.run.device)?;
    let stage = match args.variant {
        VariantArg::Lcm => Stage::Lcm,
        VariantArg::LcmLora => Stage::LcmLora,
    };
    let d = DistillConfig {
        w_min: args.w_min,
        w_max: args.w_max,
        num_ddim_timesteps: args.ddim_timesteps,
        loss: match args.loss {
            LossArg::L2 => LcdLoss::L2,
            LossArg::Huber => LcdLoss::Huber { c: args.huber_c },
        },
        ema_decay: args.ema_decay,
        time_cond_proj_dim: args.time_cond_proj_dim,
        lora_rank: args.lora_rank,
        lora_alpha: args.lora_alpha.unwrap_or(args.lora_rank as f64),
        ..DistillConfig::default()
    };
    let t = &args.teacher;
    let mut c = TrainConfig::preset(stage, Preset::Tiny);
    c.vae = load_json(&t.join("vae/config.json"))?;
    c.image_size = c.vae.sample_size;
    c.text_encoder = Some(load_json(&t.join("text_encoder/config.json"))?);
    let teacher_unet = load_json(&t.join("unet/config.json"))?;
    c.unet = Some(student_unet_config(&teacher_unet, stage == Stage::Lcm, &d));
    c.distill = Some(d);
    args.run.apply(&mut c);
    c.validate()?;
    let sources = Sources {
        teacher: Some(t.clone()),
        ..Sources::default()
    };
    run_to_end(c, &sources, &args.run.out, args.run.resume, &device)
}
