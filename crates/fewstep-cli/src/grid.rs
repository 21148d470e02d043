//! `fewstep grid`: world captions drawn by the world itself beside a model's pictures of them — the
//! README's grid, and the sheet on which a person judges how many prompts a model gets right
//! (`docs/training.md`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use fewstep::image::{grid, images_to_tensor, tensor_to_images, upscale, write_png};
use fewstep::schedulers::SchedulerKind;
use fewstep::world::{scenes, Style};

use crate::generate::{ModelArgs, SchedulerArg};
use crate::train::StyleArg;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "ddim")]
    scheduler: SchedulerArg,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 3.0)]
    guidance: f64,
    /// Prompts: the captions of `world::scenes(prompt-seed, count, style)`; prompt i is drawn with seed i.
    #[arg(long, default_value_t = 16)]
    count: usize,
    #[arg(long, default_value_t = 2026)]
    prompt_seed: u64,
    #[arg(long, value_enum, default_value = "filled")]
    style: StyleArg,
    /// Pairs (world | model) per row.
    #[arg(long, default_value_t = 4)]
    cols: usize,
    /// Each picture enlarged this many times.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Put the VAE's reconstruction of the world picture (decoder of the posterior mean) in the right
    /// cell instead of a generated picture: what the autoencoder alone can draw.
    #[arg(long)]
    autoencoder: bool,
    /// The grid (PNG); the numbered captions go to standard output.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    if args.count == 0 || args.cols == 0 || args.scale == 0 {
        bail!("invalid count/cols/scale: each must be at least 1");
    }
    let (model, _, _) = args.model.load()?;
    let side = model.native_size();
    let style: Style = fewstep::train::WorldStyle::from(args.style).into();
    let mut pictures = Vec::with_capacity(2 * args.count);
    for (i, scene) in scenes(args.prompt_seed, args.count, style)
        .iter()
        .enumerate()
    {
        let caption = scene.caption();
        let world = scene.render(side);
        let decoded = if args.autoencoder {
            let x = images_to_tensor(
                std::slice::from_ref(&world),
                model.vae.dtype(),
                model.device(),
            )?;
            model.vae.decode(&model.vae.encode(&x)?.mean)?
        } else {
            let mut req = model.request(&caption, i as u64);
            req.scheduler = SchedulerKind::from(args.scheduler);
            req.steps = args.steps;
            req.guidance = args.guidance;
            model.generate(&req, &mut |_, _| {})?.decoded
        };
        let drawn = tensor_to_images(&decoded.to_dtype(DType::F32)?)?.remove(0);
        pictures.push(upscale(&world, args.scale));
        pictures.push(upscale(&drawn, args.scale));
        println!("{}. {caption}", i + 1);
    }
    write_png(&args.output, &grid(&pictures, 2 * args.cols)?, None)?;
    Ok(())
}
