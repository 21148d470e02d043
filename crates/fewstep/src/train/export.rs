//! Writing a trained model as a diffusers folder, the layout `StableDiffusionPipeline.save_pretrained`
//! writes and [`crate::pipeline::StableDiffusion::load_dir`] reads.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use serde_json::{json, Value};

use super::diffusion::{Stage, Trainer};
use crate::files::write_atomic;
use crate::weights::safetensors::write_safetensors;
use crate::{Error, Result};

/// The LCM-LoRA file an `lcm-lora` run writes in its output folder (diffusers' name).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// diffusers version the configs claim (the pinned reference).
const DIFFUSERS_VERSION: &str = "0.42.1";

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap() + "\n";
    write_atomic(path, |w| w.write_all(text.as_bytes()))
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// `{"_class_name": class, "_diffusers_version": …, …config}`.
fn diffusers_config(class: &str, config: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(config).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.insert("_class_name".into(), json!(class));
    obj.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    v
}

/// SD1.5's scheduler config (PNDM, scaled-linear β 0.00085 … 0.012, 1000 steps), with the prediction type
/// and timestep spacing written out.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "clip_sample": false
    })
}

/// LCMScheduler's config over SD's schedule (diffusers' LCM defaults: 50 original steps, timestep
/// scaling 10).
fn lcm_scheduler_config() -> Value {
    json!({
        "_class_name": "LCMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "set_alpha_to_one": true,
        "steps_offset": 1,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

fn model_index(scheduler: &str) -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

fn copy_dir_files(from: &Path, to: &Path) -> Result<()> {
    mkdir(to)?;
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(from, e))?;
        let p = e.path();
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            let dest = to.join(e.file_name());
            write_atomic(&dest, |w| w.write_all(&bytes))?;
        }
    }
    Ok(())
}

/// Writes the f32 weights of one component (the keys under `prefix`, without it) to `path`: the
/// exponential moving average where the run keeps one ([`Trainer::ema`]), else the parameters.
fn save_trained(trainer: &Trainer, prefix: &str, path: &Path) -> Result<()> {
    if trainer.ema.is_empty() {
        return trainer.params.save_component(prefix, path, DType::F32);
    }
    let tensors: Vec<(String, candle_core::Tensor)> = trainer
        .ema
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.clone())))
        .collect();
    write_safetensors(
        path,
        &tensors,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// See [`Trainer::export`].
pub fn export(trainer: &Trainer, out: &Path) -> Result<()> {
    mkdir(out)?;
    let cfg = &trainer.config;
    match cfg.stage {
        Stage::Vae => {
            let mut vae_cfg = cfg.vae.clone();
            vae_cfg.scaling_factor = trainer.measure_scaling_factor()?;
            tracing::info!(
                scaling_factor = vae_cfg.scaling_factor,
                "latent scaling factor measured"
            );
            let dir = out.join("vae");
            mkdir(&dir)?;
            write_json(
                &dir.join("config.json"),
                &diffusers_config("AutoencoderKL", &vae_cfg),
            )?;
            trainer.params.save_component(
                "vae.",
                &dir.join("diffusion_pytorch_model.safetensors"),
                DType::F32,
            )?;
        }
        Stage::Unet => {
            let unet_dir = out.join("unet");
            mkdir(&unet_dir)?;
            let unet_cfg = cfg.unet.as_ref().unwrap();
            write_json(
                &unet_dir.join("config.json"),
                &diffusers_config("UNet2DConditionModel", unet_cfg),
            )?;
            save_trained(
                trainer,
                "unet.",
                &unet_dir.join("diffusion_pytorch_model.safetensors"),
            )?;
            let te_dir = out.join("text_encoder");
            match trainer.frozen_text_encoder_dir() {
                Some(dir) => copy_dir_files(dir, &te_dir)?,
                None => {
                    mkdir(&te_dir)?;
                    let te = cfg.text_encoder.as_ref().unwrap();
                    let mut te_cfg = serde_json::to_value(te).unwrap();
                    let obj = te_cfg.as_object_mut().unwrap();
                    obj.insert("architectures".into(), json!(["CLIPTextModel"]));
                    obj.insert("model_type".into(), json!("clip_text_model"));
                    obj.insert("torch_dtype".into(), json!("float32"));
                    write_json(&te_dir.join("config.json"), &te_cfg)?;
                    save_trained(trainer, "text_encoder.", &te_dir.join("model.safetensors"))?;
                }
            }
            if let Some(tok) = trainer.tokenizer_dir() {
                copy_dir_files(tok, &out.join("tokenizer"))?;
            }
            if let Some(vae) = trainer.frozen_vae_dir() {
                copy_dir_files(vae, &out.join("vae"))?;
            }
            let sched = out.join("scheduler");
            mkdir(&sched)?;
            write_json(&sched.join("scheduler_config.json"), &scheduler_config())?;
            write_json(&out.join("model_index.json"), &model_index("PNDMScheduler"))?;
        }
        Stage::Lcm => {
            // The target network (EMA), as the LCM scripts publish it, in the teacher's pipeline.
            let state = trainer.distill.as_ref().unwrap();
            let unet_dir = out.join("unet");
            mkdir(&unet_dir)?;
            write_json(
                &unet_dir.join("config.json"),
                &diffusers_config("UNet2DConditionModel", cfg.unet.as_ref().unwrap()),
            )?;
            save_trained(
                trainer,
                "unet.",
                &unet_dir.join("diffusion_pytorch_model.safetensors"),
            )?;
            for part in ["text_encoder", "tokenizer", "vae"] {
                copy_dir_files(&state.teacher_dir.join(part), &out.join(part))?;
            }
            let sched = out.join("scheduler");
            mkdir(&sched)?;
            write_json(
                &sched.join("scheduler_config.json"),
                &lcm_scheduler_config(),
            )?;
            write_json(&out.join("model_index.json"), &model_index("LCMScheduler"))?;
        }
        Stage::LcmLora => {
            let state = trainer.distill.as_ref().unwrap();
            super::distill::export_lora_kohya(
                &trainer.params,
                &state.lora_modules,
                cfg.distill.as_ref().unwrap(),
                &out.join(LORA_FILE),
            )?;
        }
    }
    Ok(())
}
