//! `fewstep train-classifier` and `fewstep eval`: the world classifier, and a generator's FID, prompt
//! adherence and style measured with it (`fewstep::eval`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use fewstep::eval::classifier::{
    Accuracy, ClassifierConfig, ClassifierTrainer, Labels, WorldClassifier,
};
use fewstep::eval::score::{classify, score, Reference, Scores};
use fewstep::files::write_atomic;
use fewstep::image::{grid, tensor_to_images, RgbImage};
use fewstep::schedulers::SchedulerKind;
use fewstep::world::{scenes, Style};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::generate::{ModelArgs, SchedulerArg};
use crate::train::StyleArg;

/// Seed of the held-out scenes on which `train-classifier` reports its accuracy.
const HELD_OUT_SEED: u64 = 4321;

#[derive(clap::Args)]
pub struct ClassifierArgs {
    /// Where to write the classifier (.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 4000)]
    images_per_style: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    side: usize,
    #[arg(long, default_value_t = 99)]
    seed: u64,
}

fn bar(len: usize, what: &str) -> Result<ProgressBar> {
    Ok(ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] {{msg}} {{elapsed}} eta {{eta}}"
        ))
        .context("progress bar template")?
        .progress_chars("=> "),
    ))
}

/// Trains the classifier on both styles, writes it, and prints its per-head accuracy on 500 held-out
/// scenes of each style.
pub fn train_classifier(args: ClassifierArgs) -> Result<()> {
    let device = Device::Cpu;
    let mut cfg = ClassifierConfig {
        seed: args.seed,
        images_per_style: args.images_per_style,
        side: args.side,
        steps: args.steps,
        batch_size: args.batch_size,
        ..ClassifierConfig::default()
    };
    cfg.optim.lr = args.lr;
    let mut trainer = ClassifierTrainer::new(cfg, &device)?;
    let bar = bar(args.steps, "step")?;
    let mut ema = None;
    for _ in 0..args.steps {
        let loss = trainer.step()?;
        let e = ema.map_or(loss, |e: f32| 0.98 * e + 0.02 * loss);
        ema = Some(e);
        bar.inc(1);
        bar.set_message(format!("loss {e:.4}"));
    }
    bar.finish_and_clear();
    let net = trainer.classifier()?;
    let held_out: Vec<_> = [Style::Filled, Style::Outline]
        .iter()
        .flat_map(|&s| scenes(HELD_OUT_SEED, 500, s))
        .collect();
    let images: Vec<RgbImage> = held_out.iter().map(|s| s.render(args.side)).collect();
    let (_, predicted) = classify(&net, &images, &device)?;
    let truth: Vec<Labels> = held_out.iter().map(Labels::of).collect();
    let acc = Accuracy::of(&truth, &predicted);
    trainer.save(&args.out)?;
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({
            "classifier": args.out,
            "loss": ema,
            "held_out_accuracy": acc,
        }))?
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum)]
    scheduler: SchedulerArg,
    #[arg(long)]
    steps: usize,
    #[arg(long)]
    guidance: f64,
    /// The world classifier written by `fewstep train-classifier`.
    #[arg(long)]
    classifier: PathBuf,
    /// Generated pictures: the captions of `world::scenes(prompt-seed, count, style)`.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Pictures per batched generation; batch j draws its noise from seed `seed + j`, so rows compared
    /// with one another must share --batch and --seed.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 5000)]
    prompt_seed: u64,
    /// Real pictures for the FID reference.
    #[arg(long, default_value_t = 2000)]
    real: usize,
    #[arg(long, default_value_t = 7000)]
    real_seed: u64,
    /// The style of the real reference pictures (the captions are the same in both styles).
    #[arg(long, value_enum, default_value = "filled")]
    style: StyleArg,
    /// Also write this row as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the first 64 pictures as an 8×8 grid (PNG).
    #[arg(long)]
    samples: Option<PathBuf>,
}

/// One row of the quality table.
#[derive(Serialize)]
struct Row {
    model: String,
    loras: Vec<String>,
    scheduler: String,
    steps: usize,
    guidance: f64,
    #[serde(flatten)]
    scores: Scores,
    /// Wall time of generation (encode, denoise, decode) per picture, batched.
    seconds_per_image: f64,
    real: usize,
    style: String,
}

/// Generates `count` pictures of world captions with the given sampler and scores them.
pub fn eval(args: EvalArgs) -> Result<()> {
    if args.count < 2 || args.batch == 0 {
        bail!("invalid count/batch: need at least 2 pictures and a batch of at least 1");
    }
    if !args.classifier.is_file() {
        bail!(
            "{}: no classifier there; make one with `fewstep train-classifier --out FILE`",
            args.classifier.display()
        );
    }
    let device = Device::Cpu;
    let style: Style = fewstep::train::WorldStyle::from(args.style).into();
    let classifier = WorldClassifier::load(&args.classifier, &device)?;
    let (model, model_spec, loras) = args.model.load()?;
    let side = model.native_size();
    let reference =
        Reference::measure(&classifier, style, args.real_seed, args.real, side, &device)?;
    let asked_scenes = scenes(args.prompt_seed, args.count, style);
    let scheduler: SchedulerKind = args.scheduler.into();
    let bar = bar(args.count, "picture")?;
    let mut pictures = Vec::with_capacity(args.count);
    let start = Instant::now();
    for (j, chunk) in asked_scenes.chunks(args.batch).enumerate() {
        let prompts: Vec<String> = chunk.iter().map(|s| s.caption()).collect();
        let mut req = model.request("", args.seed + j as u64);
        req.scheduler = scheduler;
        req.steps = args.steps;
        req.guidance = args.guidance;
        let out = model.generate_prompts(&prompts, &req, &mut |_, _| {})?;
        pictures.extend(tensor_to_images(&out.decoded)?);
        bar.inc(chunk.len() as u64);
    }
    let seconds_per_image = start.elapsed().as_secs_f64() / args.count as f64;
    bar.finish_and_clear();
    let asked: Vec<Labels> = asked_scenes.iter().map(Labels::of).collect();
    let scores = score(&classifier, &reference, &pictures, &asked, &device)?;
    if let Some(path) = &args.samples {
        let n = pictures.len().min(64);
        fewstep::image::write_png(path, &grid(&pictures[..n], 8)?, None)?;
    }
    let row = Row {
        model: model_spec,
        loras,
        scheduler: scheduler.to_string(),
        steps: args.steps,
        guidance: args.guidance,
        scores,
        seconds_per_image,
        real: args.real,
        style: format!("{style:?}").to_lowercase(),
    };
    let text = serde_json::to_string(&row)?;
    if let Some(path) = &args.json {
        write_json(path, &text)?;
    }
    println!("{text}");
    Ok(())
}

fn write_json(path: &Path, text: &str) -> Result<()> {
    Ok(write_atomic(path, |w| {
        w.write_all(text.as_bytes())?;
        w.write_all(b"\n")
    })?)
}
