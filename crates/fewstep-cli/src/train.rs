//! `fewstep train`: trains the VAE, or the text encoder and UNet, on the toy world, with a progress bar,
//! checkpoints that resume exactly, and a diffusers folder as the result.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::ValueEnum;
use fewstep::train::checkpoint::{load_checkpoint, save_checkpoint};
use fewstep::train::diffusion::ReconLoss;
use fewstep::train::{Preset, Sources, Stage, TrainConfig, Trainer, WorldStyle, CHECKPOINT_FILE};
use indicatif::{ProgressBar, ProgressStyle};

/// The CLIP tokenizer used when `--tokenizer` is not given (the real CLIP vocabulary, from the fixtures).
pub const DEFAULT_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny-sd/tokenizer"
);

#[derive(Clone, Copy, ValueEnum)]
pub enum StageArg {
    /// The autoencoder (reconstruction + KL); writes OUT/vae/ with the measured scaling factor.
    Vae,
    /// The text encoder and UNet (epsilon objective, 10% empty captions); needs --vae; writes a full
    /// diffusers folder.
    Unet,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    /// Test-sized models, 16×16 images.
    Tiny,
    /// The proposed shipped size, 32×32 images (see docs/training.md).
    Small,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReconLossArg {
    L1,
    L2,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StyleArg {
    Filled,
    Outline,
}

impl From<StyleArg> for WorldStyle {
    fn from(s: StyleArg) -> Self {
        match s {
            StyleArg::Filled => WorldStyle::Filled,
            StyleArg::Outline => WorldStyle::Outline,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    /// Only in a build with a CUDA feature (this build has none yet).
    Cuda,
}

/// The options every training run has (`train` and `distill`).
#[derive(clap::Args)]
pub struct RunArgs {
    /// Output folder: the checkpoint and, at the end, the result (a model folder or a LoRA file).
    #[arg(long)]
    pub out: PathBuf,
    /// Total optimisation steps (a resumed run may raise it).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Linear learning-rate warm-up over this many steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Seeds the dataset, the initial weights and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of world images.
    #[arg(long, default_value_t = 1000)]
    dataset_size: usize,
    #[arg(long, value_enum, default_value = "filled")]
    style: StyleArg,
    /// Write OUT/checkpoint.safetensors every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.safetensors (same configuration; --steps may be larger).
    #[arg(long)]
    pub resume: bool,
    /// cpu; cuda needs a build with a CUDA feature, which this build does not have.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

impl RunArgs {
    /// Sets these options in a run's configuration.
    pub fn apply(&self, c: &mut TrainConfig) {
        c.steps = self.steps;
        c.batch_size = self.batch_size;
        c.optim.lr = self.lr;
        c.optim.warmup_steps = self.warmup_steps;
        c.seed = self.seed;
        c.dataset_size = self.dataset_size;
        c.style = self.style.into();
        c.checkpoint_every = self.checkpoint_every;
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    stage: StageArg,
    #[command(flatten)]
    run: RunArgs,
    #[arg(long, value_enum, default_value = "small")]
    preset: PresetArg,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// Clip the gradients' global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// VAE stage: weight of the KL term.
    #[arg(long, default_value_t = 1e-6)]
    kl_weight: f64,
    /// VAE stage: the reconstruction term, l1 (LDM's) or l2.
    #[arg(long, value_enum, default_value = "l1")]
    recon_loss: ReconLossArg,
    /// UNet stage: share of empty captions (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// UNet stage: export an exponential moving average of the weights with this decay (diffusers'
    /// --use_ema; the decay ramps up as min(decay, (1+step)/(10+step))).
    #[arg(long)]
    ema_decay: Option<f64>,
    /// UNet stage: Min-SNR-γ loss weighting (diffusers' --snr_gamma; 5 is the paper's choice).
    #[arg(long)]
    snr_gamma: Option<f64>,
    /// UNet stage: the trained VAE (the vae stage's --out folder).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// UNet stage: fine-tune this trained model (a folder the unet stage wrote): its text encoder and UNet
    /// are the starting weights, its configs the run's, its VAE the default --vae.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// With --init-from: train the UNet alone, keeping the model's text encoder unchanged.
    #[arg(long, requires = "init_from")]
    freeze_text_encoder: bool,
    /// UNet stage: a CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json).
    #[arg(long, default_value = DEFAULT_TOKENIZER)]
    tokenizer: PathBuf,
}

fn config(args: &Args) -> Result<TrainConfig> {
    let stage = match args.stage {
        StageArg::Vae => Stage::Vae,
        StageArg::Unet => Stage::Unet,
    };
    let preset = match args.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Small => Preset::Small,
    };
    let mut c = TrainConfig::preset(stage, preset);
    args.run.apply(&mut c);
    c.optim.weight_decay = args.weight_decay;
    c.optim.max_grad_norm = (args.max_grad_norm > 0.0).then_some(args.max_grad_norm);
    c.kl_weight = args.kl_weight;
    c.recon_loss = match args.recon_loss {
        ReconLossArg::L1 => ReconLoss::L1,
        ReconLossArg::L2 => ReconLoss::L2,
    };
    c.caption_dropout = args.caption_dropout;
    c.freeze_text_encoder = args.freeze_text_encoder;
    c.ema_decay = args.ema_decay;
    c.snr_gamma = args.snr_gamma;
    if stage == Stage::Unet {
        if let Some(init) = &args.init_from {
            c.unet = Some(fewstep::config::load_json(&init.join("unet/config.json"))?);
            c.text_encoder = Some(fewstep::config::load_json(
                &init.join("text_encoder/config.json"),
            )?);
        }
        let Some(vae) = args.vae.as_ref().or(args.init_from.as_ref()) else {
            bail!("invalid vae: the unet stage needs --vae DIR (the folder the vae stage wrote)");
        };
        // The UNet works on this VAE's latents: take its config (and measured scaling factor).
        let dir = fewstep::train::diffusion::vae_component_dir(vae);
        c.vae = fewstep::config::load_json(&dir.join("config.json"))?;
    }
    c.validate()?;
    Ok(c)
}

pub fn run(args: Args) -> Result<()> {
    let device = device(args.run.device)?;
    let cfg = config(&args)?;
    let sources = Sources {
        tokenizer_dir: Some(args.tokenizer.clone()),
        vae_dir: args.vae.clone().or_else(|| args.init_from.clone()),
        init_from: args.init_from.clone(),
        teacher: None,
    };
    run_to_end(cfg, &sources, &args.run.out, args.run.resume, &device)
}

/// The `--device` choice as a candle device.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            bail!("invalid device: cuda needs a build with a CUDA feature, and this build has none; use --device cpu")
        }
    }
}

/// Runs (or, with `resume`, continues) a training run to its last step with a progress bar, writing
/// `out/checkpoint.safetensors` every `checkpoint_every` steps and at the end, then exports the result
/// into `out`.
pub fn run_to_end(
    cfg: TrainConfig,
    sources: &Sources,
    out: &std::path::Path,
    resume: bool,
    device: &Device,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let ckpt = out.join(CHECKPOINT_FILE);
    let mut trainer = if resume {
        if !ckpt.is_file() {
            bail!("{}: no checkpoint to resume from", ckpt.display());
        }
        let t = load_checkpoint(&ckpt, cfg, sources, device)?;
        tracing::info!(step = t.step, "resumed");
        t
    } else {
        Trainer::new(cfg, sources, device)?
    };
    let total = trainer.config.steps;
    tracing::info!(
        params = trainer.params.num_scalars(),
        tensors = trainer.params.len(),
        "training {:?} for {total} steps",
        trainer.config.stage
    );
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] loss {msg} {elapsed} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    let start = Instant::now();
    let first = trainer.step;
    let mut ema: Option<f32> = None;
    while trainer.step < total {
        let loss = trainer.train_step()?;
        let e = ema.map_or(loss, |e| 0.95 * e + 0.05 * loss);
        ema = Some(e);
        bar.set_message(format!("{loss:.4} (avg {e:.4})"));
        bar.set_position(trainer.step as u64);
        tracing::debug!(step = trainer.step, loss, "step");
        let every = trainer.config.checkpoint_every;
        if every > 0 && trainer.step % every == 0 && trainer.step < total {
            save_checkpoint(&trainer, &ckpt)?;
            tracing::info!(step = trainer.step, loss_avg = e, "checkpoint written");
        }
    }
    bar.finish();
    let done = trainer.step - first;
    if done > 0 {
        let per_step = start.elapsed().as_secs_f64() / done as f64;
        tracing::info!(steps = done, seconds_per_step = per_step, "trained");
        eprintln!(
            "{done} steps in {:.1} s ({:.3} s/step), last loss avg {:.4}",
            start.elapsed().as_secs_f64(),
            per_step,
            ema.unwrap_or(f32::NAN)
        );
    }
    save_checkpoint(&trainer, &ckpt)?;
    trainer.export(out)?;
    println!("{}", out.display());
    Ok(())
}
