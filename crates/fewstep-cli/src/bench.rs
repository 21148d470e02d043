//! `fewstep bench`: the time of each stage of a text-to-image generation on this machine — text
//! encoding, one UNet step, VAE decode, TAESD decode, a whole LCM 4-step picture — at several sizes and
//! dtypes, as the median of repeated runs after a warm-up, with the operations each stage performs
//! ([`fewstep::flops`]), the GFLOP/s achieved, their share of the machine's measured matrix-product
//! rate, and the peak resident memory of the process while the stage ran.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::ValueEnum;
use fewstep::kernels::matmul;
use fewstep::models::taesd::AutoencoderTiny;
use fewstep::pipeline::StableDiffusion;
use fewstep::schedulers::SchedulerKind;
use fewstep::weights::parts::ModelParts;
use serde::Serialize;

use crate::generate::DTypeArg;

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The text encoder on one prompt.
    Text,
    /// One UNet step, batch 1 (LCM-LoRA's guidance 1: no unconditional pass).
    Unet,
    /// The VAE decoder on one latent.
    Vae,
    /// The TAESD decoder on one latent (needs --taesd).
    Taesd,
    /// A whole LCM 4-step picture, guidance 1, decoded by the VAE.
    Image,
    /// The same picture decoded by the TAESD (needs --taesd).
    ImageTaesd,
}

#[derive(clap::Args)]
pub struct Args {
    /// The model: a diffusers folder, a hub id or a single-file checkpoint.
    pub model: String,
    /// A TAESD (diffusers `AutoencoderTiny` or the original decoder file) for the TAESD stages.
    #[arg(long)]
    pub taesd: Option<PathBuf>,
    /// Picture sizes (square), repeatable.
    #[arg(long = "size", default_values_t = [256, 512])]
    pub sizes: Vec<usize>,
    /// Compute dtypes, repeatable.
    #[arg(long = "dtype", value_enum, default_values_t = [DTypeArg::F32, DTypeArg::Bf16])]
    pub dtypes: Vec<DTypeArg>,
    /// Stages to time (default: all, the TAESD ones only with --taesd).
    #[arg(long = "stage", value_enum)]
    pub stages: Vec<Stage>,
    /// Timed runs after the warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Side of the square matrix product that measures the machine's rate (0: skip).
    #[arg(long, default_value_t = 4096)]
    pub matmul_size: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// One measured stage.
#[derive(Serialize)]
struct Timing {
    stage: Stage,
    size: usize,
    dtype: String,
    median_s: f64,
    times_s: Vec<f64>,
    gflop: f64,
    gflop_per_s: f64,
    /// `gflop_per_s` over the matrix-product rate of the same dtype measured in the same run.
    share_of_matmul_peak: Option<f64>,
    /// Peak resident memory of the process while the stage ran (weights included).
    peak_rss_mib: Option<f64>,
}

/// The matrix-product rate of this machine through candle, one dtype.
#[derive(Serialize)]
struct MatmulRate {
    dtype: String,
    n: usize,
    median_s: f64,
    gflop_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    cpu: String,
    matmul: Vec<MatmulRate>,
    stages: Vec<Timing>,
}

/// The median of a non-empty list.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Resets the process's peak resident set (Linux `clear_refs` 5); false where it cannot.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident set since the last reset, MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs `f` once to warm up (and count its operations), then `repeats` times, timed.
fn measure(
    repeats: usize,
    mut f: impl FnMut() -> fewstep::Result<()>,
) -> Result<(Vec<f64>, u64, Option<f64>)> {
    let (warm_up, flops) = fewstep::flops::counted(&mut f);
    warm_up?;
    let peak_ok = reset_peak_rss();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((times, flops, peak_ok.then(peak_rss_mib).flatten()))
}

/// `n×n · n×n` in `dtype` as the models multiply: by fewstep's kernel where the CPU has one for the
/// dtype (bf16: AMX or AVX-512 BF16; f32: AVX-512F), otherwise through candle. Seconds (median) and GFLOP/s.
fn matmul_rate(n: usize, dtype: DType, repeats: usize) -> Result<MatmulRate> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    let (times, _, _) = measure(repeats, || {
        match matmul::available(&a) {
            true => matmul::matmul(&a, &b, 1.0, dtype)?,
            false => a.matmul(&b)?,
        };
        Ok(())
    })?;
    let median_s = median(&times);
    Ok(MatmulRate {
        dtype: format!("{dtype:?}").to_lowercase(),
        n,
        median_s,
        gflop_per_s: fewstep::flops::matmul(n, n, n) as f64 / median_s / 1e9,
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.repeats == 0 {
        bail!("invalid repeats: must be at least 1");
    }
    let stages: Vec<Stage> = if args.stages.is_empty() {
        let mut all = vec![Stage::Text, Stage::Unet, Stage::Vae, Stage::Image];
        if args.taesd.is_some() {
            all.extend([Stage::Taesd, Stage::ImageTaesd]);
        }
        all
    } else {
        args.stages.clone()
    };
    if args.taesd.is_none()
        && stages
            .iter()
            .any(|s| matches!(s, Stage::Taesd | Stage::ImageTaesd))
    {
        bail!("invalid stage: the TAESD stages need --taesd FILE");
    }
    for &s in &args.sizes {
        if s == 0 || s % 8 != 0 {
            bail!("invalid size: {s} is not a positive multiple of 8");
        }
    }
    let mut report = Report {
        model: args.model.clone(),
        threads: candle_core::utils::get_num_threads(),
        cpu: cpu_name(),
        matmul: Vec::new(),
        stages: Vec::new(),
    };
    if args.matmul_size > 0 {
        for &d in &args.dtypes {
            let r = matmul_rate(args.matmul_size, DType::from(d), args.repeats)?;
            eprintln!(
                "matmul {n}³ {:>4}: {:.3} s, {:.1} GFLOP/s",
                r.dtype,
                r.median_s,
                r.gflop_per_s,
                n = r.n
            );
            report.matmul.push(r);
        }
    }
    for &d in &args.dtypes {
        let dtype = DType::from(d);
        // A stage's share is of the matrix-product rate of its own dtype.
        let peak = report
            .matmul
            .iter()
            .find(|r| r.dtype == format!("{dtype:?}").to_lowercase())
            .map(|r| r.gflop_per_s);
        // The parts (and the memory maps of their files) are dropped once the models are built: the
        // peak memory is that of the models. The TAESD is built on its own and lent to the model for
        // the TAESD stages only.
        let parts = ModelParts::open(&args.model, dtype, &Device::Cpu)
            .with_context(|| format!("loading {}", args.model))?;
        let mut model = StableDiffusion::from_parts(&parts, &Device::Cpu)?;
        let mut tiny = match &args.taesd {
            Some(path) => match &parts.clone().with_vae_file(path)?.taesd {
                Some((w, layout)) => Some(AutoencoderTiny::from_layout(w, *layout)?),
                None => bail!("invalid taesd: {} is not a TAESD", path.display()),
            },
            None => None,
        };
        drop(parts);
        for &size in &args.sizes {
            for &stage in &stages {
                let taesd_stage = matches!(stage, Stage::Taesd | Stage::ImageTaesd);
                if taesd_stage {
                    model.taesd = tiny.take();
                }
                let timed = time_stage(&model, stage, size, args.repeats);
                if taesd_stage {
                    tiny = model.taesd.take();
                }
                let (times, flops, peak_rss) = timed?;
                let median_s = median(&times);
                let rate = flops as f64 / median_s / 1e9;
                let t = Timing {
                    stage,
                    size,
                    dtype: format!("{dtype:?}").to_lowercase(),
                    median_s,
                    times_s: times,
                    gflop: flops as f64 / 1e9,
                    gflop_per_s: rate,
                    share_of_matmul_peak: peak.map(|p| rate / p),
                    peak_rss_mib: peak_rss,
                };
                println!(
                    "{:<12} {size:>4}² {:<4} {:>8.3} s {:>8.1} GFLOP {:>6.1} GFLOP/s {:>5} peak {:>7} MiB",
                    stage
                        .to_possible_value()
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default(),
                    t.dtype,
                    t.median_s,
                    t.gflop,
                    t.gflop_per_s,
                    t.share_of_matmul_peak
                        .map(|s| format!("{:.0}%", 100.0 * s))
                        .unwrap_or_default(),
                    t.peak_rss_mib
                        .map(|m| format!("{m:.0}"))
                        .unwrap_or_default(),
                );
                report.stages.push(t);
            }
        }
    }
    if let Some(path) = &args.output {
        let json = serde_json::to_string_pretty(&report)?;
        fewstep::files::write_atomic(path, |w| w.write_all(json.as_bytes()))?;
    }
    Ok(())
}

/// Times one stage at one size (the TAESD stages with `model.taesd` set): the inputs are made once,
/// outside the timed runs.
fn time_stage(
    model: &StableDiffusion,
    stage: Stage,
    size: usize,
    repeats: usize,
) -> Result<(Vec<f64>, u64, Option<f64>)> {
    let dev = model.device();
    let f = model.vae_scale_factor();
    let channels = model.unet.config().in_channels;
    let latents = Tensor::randn(0f32, 1.0, (1, channels, size / f, size / f), dev)?;
    let prompt = "a photograph of an astronaut riding a horse";
    match stage {
        Stage::Text => measure(repeats, || model.encode_prompt(prompt, None).map(drop)),
        Stage::Unet => {
            let embeds = model.encode_prompt(prompt, None)?;
            let added = model.added_cond(&embeds, size, size)?;
            let context = embeds.context;
            let cond = model
                .unet
                .config()
                .time_cond_proj_dim
                .map(|d| Tensor::zeros((1, d), model.dtype(), dev))
                .transpose()?;
            measure(repeats, || {
                model
                    .unet
                    .forward(&latents, 999.0, &context, cond.as_ref(), added.as_ref())
                    .map(drop)
            })
        }
        Stage::Vae => measure(repeats, || {
            model
                .vae
                .decode(&latents.to_dtype(model.dtype())?)
                .map(drop)
        }),
        // The model decodes with its TAESD when it has been lent one (the TAESD stages).
        Stage::Taesd => measure(repeats, || model.decode(&latents).map(drop)),
        Stage::Image | Stage::ImageTaesd => {
            let mut req = model.request(prompt, 0);
            req.scheduler = SchedulerKind::Lcm;
            req.steps = 4;
            req.guidance = 1.0;
            req.width = size;
            req.height = size;
            measure(repeats, || model.generate(&req, &mut |_, _| {}).map(drop))
        }
    }
}
