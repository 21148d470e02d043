//! `fewstep generate`: the stable CLI contract of text-to-image and image-to-image.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;
use fewstep::image::{read_png, tensor_to_images, write_png};
use fewstep::lora::apply::apply_specs;
use fewstep::lora::{extract_prompt_loras, LoraSpec};
use fewstep::models::vae::VaeTiling;
use fewstep::pipeline::StableDiffusion;
use fewstep::schedulers::SchedulerKind;
use fewstep::weights::parts::ModelParts;
use indicatif::{ProgressBar, ProgressStyle};

/// The model used when `--model` is not given: fewstep's own base model, trained on the toy world
/// (docs/training.md).
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/default/base");

/// `--model` and `--lora` of the commands that score or show a model (`eval`, `grid`).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// The model folder (default: fewstep's own base model).
    #[arg(long)]
    model: Option<String>,
    /// A LoRA to apply, PATH[:WEIGHT]; repeatable.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
}

impl ModelArgs {
    /// The model (f32, LoRAs fused), its spec as given (or the default's path) and the LoRAs applied
    /// (`NAME:WEIGHT`).
    pub fn load(&self) -> Result<(StableDiffusion, String, Vec<String>)> {
        let specs = self
            .loras
            .iter()
            .map(|s| LoraSpec::parse(s))
            .collect::<fewstep::Result<Vec<_>>>()?;
        let spec = self
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let (model, loras) = load_model(&spec, None, &specs, false, DType::F32)?;
        Ok((model, spec, loras))
    }
}

/// The LCM-LoRA distilled from the default model (docs/quality.md), applied to it unless `--no-lcm`.
pub const DEFAULT_LCM_LORA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/default/lcm-lora/pytorch_lora_weights.safetensors"
);

/// The default model's guidance scale without its LCM-LoRA: its pictures are best at 2–4
/// (docs/training.md); 7.5 washes them out.
const DEFAULT_MODEL_GUIDANCE: f64 = 3.0;

#[derive(Clone, Copy, ValueEnum)]
pub enum SchedulerArg {
    Lcm,
    Ddim,
    Euler,
    #[value(name = "dpm++")]
    DpmPlusPlus,
}

impl From<SchedulerArg> for SchedulerKind {
    fn from(s: SchedulerArg) -> Self {
        match s {
            SchedulerArg::Lcm => SchedulerKind::Lcm,
            SchedulerArg::Ddim => SchedulerKind::Ddim,
            SchedulerArg::Euler => SchedulerKind::Euler,
            SchedulerArg::DpmPlusPlus => SchedulerKind::DpmSolverPlusPlus,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoraModeArg {
    Fuse,
    Runtime,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RngArg {
    /// torch's CPU generator: the same seed gives diffusers' picture.
    Torch,
}

#[derive(clap::Args)]
pub struct Args {
    /// The prompt (or give it with --prompt).
    #[arg(conflicts_with = "prompt_flag")]
    prompt: Option<String>,
    #[arg(long = "prompt", id = "prompt_flag")]
    prompt_flag: Option<String>,
    /// A diffusers model folder (SD1.x, SD2.x, SDXL), a Hugging Face repo id (owner/name), or a
    /// single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors in the original Stable Diffusion layout).
    #[arg(long)]
    model: Option<String>,
    /// A VAE replacing the model's: a diffusers VAE folder (config.json + weights, e.g. SDXL's
    /// fp16-fix VAE), a .safetensors file (original layout as sd-vae-ft-mse, or diffusers'), or a TAESD (diffusers' AutoencoderTiny file, or the original taesd_decoder.safetensors): a fast
    /// decoder of the same latents.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Decode with the VAE tile by tile (diffusers' `enable_vae_tiling`: 512-pixel tiles blended over 128
    /// pixels for SD), for pictures too large to decode whole in memory.
    #[arg(long)]
    vae_tiling: bool,
    /// A LoRA to apply, PATH[:WEIGHT] (weight 1 by default); repeatable. Any published layout (kohya,
    /// PEFT, diffusers), detected from its keys.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Folder in which `<lora:NAME:WEIGHT>` tags of the prompt find NAME.safetensors.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// fuse: LoRAs added into the weights at load (no per-step cost); runtime: computed beside them.
    #[arg(long, value_enum, default_value = "fuse")]
    lora_mode: LoraModeArg,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// The default model without its LCM-LoRA: the teacher, DDIM 25 steps, guidance 3.
    #[arg(long, conflicts_with = "model")]
    no_lcm: bool,
    /// Number of UNet calls (default 4 for LCM, 25 for the other schedulers).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default 1.0 for LCM, 8.5 for a full LCM model, 7.5 for the other schedulers; 3.0
    /// for the default model with --no-lcm).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed (random and printed when not given).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Default lcm; ddim for the default model with --no-lcm.
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "torch")]
    rng: RngArg,
    /// Use the penultimate (k = 1) or an earlier CLIP layer, as diffusers' `clip_skip`.
    #[arg(long)]
    clip_skip: Option<usize>,
    /// img2img: the initial image (PNG).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much of the schedule to run, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    strength: f64,
    /// Output PNG; with --num-images K > 1, `NAME-0.png` … `NAME-{K-1}.png`.
    #[arg(long, short)]
    output: PathBuf,
}

fn output_paths(output: &Path, k: usize) -> Vec<PathBuf> {
    if k == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("image");
    (0..k)
        .map(|i| output.with_file_name(format!("{stem}-{i}.png")))
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    let RngArg::Torch = args.rng;
    let Some(prompt) = args.prompt.or(args.prompt_flag) else {
        bail!("invalid prompt: give one, as `fewstep generate \"a red circle\"` or with --prompt");
    };
    let (prompt, mut lora_specs) = match &args.lora_dir {
        Some(dir) => extract_prompt_loras(&prompt, dir)?,
        None if prompt.contains("<lora:") => {
            bail!("invalid prompt: it has <lora:NAME:WEIGHT> tags; give --lora-dir DIR holding NAME.safetensors")
        }
        None => (prompt, Vec::new()),
    };
    for s in &args.loras {
        lora_specs.push(LoraSpec::parse(s)?);
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "invalid output: the folder {} does not exist",
                dir.display()
            );
        }
    }
    let dtype = DType::from(args.dtype);
    // The default model runs with its LCM-LoRA (LCM, 4 steps, guidance 1) unless --no-lcm asks for the
    // teacher (DDIM 25, guidance 3).
    let teacher_default = args.model.is_none() && args.no_lcm;
    if args.model.is_none() && !args.no_lcm {
        lora_specs.insert(
            0,
            LoraSpec {
                path: PathBuf::from(DEFAULT_LCM_LORA),
                weight: 1.0,
            },
        );
    }
    let default_scheduler = match teacher_default {
        false => SchedulerArg::Lcm,
        true => SchedulerArg::Ddim,
    };
    let model_spec = args.model.unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let (mut model, lora_list) = load_model(
        &model_spec,
        args.vae.as_deref(),
        &lora_specs,
        args.lora_mode == LoraModeArg::Runtime,
        dtype,
    )?;

    if args.vae_tiling {
        model.vae_tiling = Some(VaeTiling::for_config(model.vae.config()));
    }
    let scheduler: SchedulerKind = args.scheduler.unwrap_or(default_scheduler).into();
    let seed = args.seed.unwrap_or_else(rand_seed);
    let mut req = model.request(&prompt, seed);
    req.negative_prompt = args.negative_prompt;
    req.scheduler = scheduler;
    req.steps = args.steps.unwrap_or(if scheduler == SchedulerKind::Lcm {
        4
    } else {
        25
    });
    req.guidance = args.guidance.unwrap_or_else(|| match teacher_default {
        true => DEFAULT_MODEL_GUIDANCE,
        false => model.default_guidance(scheduler),
    });
    req.num_images = args.num_images;
    req.clip_skip = args.clip_skip;
    if let Some(path) = &args.init_image {
        let img = read_png(path)?;
        req.width = img.width;
        req.height = img.height;
        req.init_image = Some(img);
        req.strength = args.strength;
    }
    req.width = args.width.unwrap_or(req.width);
    req.height = args.height.unwrap_or(req.height);
    model.validate(&req)?;
    eprintln!("seed: {seed}");

    let bar = ProgressBar::new(req.steps as u64).with_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed} eta {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let out = model.generate(&req, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();

    let images = tensor_to_images(&out.decoded)?;
    let mut params = model.parameters_text(&req, &model_spec);
    if !lora_list.is_empty() {
        // A1111-style: the LoRAs as `<lora:name:w>` in the prompt line, and a `LoRA: name:w, …` field.
        let tags: String = lora_list.iter().map(|nw| format!(" <lora:{nw}>")).collect();
        let lora_text = lora_list.join(" ");
        params = match params.split_once('\n') {
            Some((first, rest)) => format!("{first}{tags}\n{rest}, LoRA: {lora_text}"),
            None => format!("{params}{tags}, LoRA: {lora_text}"),
        };
    }
    for (img, path) in images.iter().zip(output_paths(&args.output, images.len())) {
        write_png(&path, img, Some(&params))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Loads a model (folder, hub id or single file) on the CPU with an optional replacement VAE and LoRAs
/// applied (fused, or beside the weights with `runtime`); returns it with the LoRAs as `name:weight`.
pub fn load_model(
    spec: &str,
    vae: Option<&Path>,
    loras: &[LoraSpec],
    runtime: bool,
    dtype: DType,
) -> Result<(StableDiffusion, Vec<String>)> {
    let mut parts = ModelParts::open(spec, dtype, &Device::Cpu)?;
    if let Some(vae) = vae {
        parts = parts.with_vae_file(vae)?;
    }
    let mut lora_list: Vec<String> = Vec::new();
    if !loras.is_empty() {
        let (with_loras, report) = apply_specs(&parts, loras, runtime)?;
        parts = with_loras;
        for r in &report.loras {
            let te2 = if r.text_encoder_2 > 0 {
                format!(" and {} second-text-encoder", r.text_encoder_2)
            } else {
                String::new()
            };
            eprintln!(
                "lora {}: weight {}, {} UNet and {} text-encoder{te2} modules",
                r.name, r.weight, r.unet, r.text_encoder
            );
        }
        lora_list = report
            .loras
            .iter()
            .map(|r| format!("{}:{}", r.name, r.weight))
            .collect();
    }
    Ok((
        StableDiffusion::from_parts(&parts, &Device::Cpu)?,
        lora_list,
    ))
}

/// A seed from the clock and the process id, for runs that give none.
fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ ((std::process::id() as u64) << 32)) % (1 << 53)
}
