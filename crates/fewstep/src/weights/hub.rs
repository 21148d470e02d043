//! Models by Hugging Face repo id (`owner/name`), fetched with `hf-hub` into the standard cache
//! (`~/.cache/huggingface/hub`, or `HF_HOME`/`HF_HUB_CACHE`); with `HF_HUB_OFFLINE=1` only the cache is used.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::{Error, Result};

/// The files fetched for a Stable Diffusion repo: configs, tokenizer, and one safetensors file per model.
fn wanted(files: &[String], prefer_fp16: bool) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| {
            f.as_str() == "model_index.json"
                || f.ends_with("/config.json")
                || f.ends_with("scheduler_config.json")
                || f.starts_with("tokenizer/")
        })
        .cloned()
        .collect();
    for (component, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let plain = format!("{component}/{stem}.safetensors");
        let fp16 = format!("{component}/{stem}.fp16.safetensors");
        let order = if prefer_fp16 {
            [fp16, plain]
        } else {
            [plain, fp16]
        };
        if let Some(f) = order.into_iter().find(|f| files.contains(f)) {
            out.push(f);
        }
    }
    out
}

/// Whether `spec` looks like a repo id rather than a path.
pub fn is_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphanumeric())
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !Path::new(spec).exists()
}

/// Resolves `--model`: an existing path is returned as is; a repo id is fetched (or found in the cache when
/// offline) and its snapshot folder returned.
pub fn resolve_model(spec: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    if !is_repo_id(spec) {
        return Err(Error::Missing {
            path,
            what: "model: no such file or folder, and not a Hugging Face repo id (owner/name)"
                .into(),
        });
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        let repo = Cache::from_env().repo(Repo::model(spec.to_string()));
        return repo
            .get("model_index.json")
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| {
                Error::Hub(format!(
                    "{spec}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
                ))
            });
    }
    let offline_msg = |e: &dyn std::fmt::Display| {
        Error::Hub(format!(
            "{spec}: cannot fetch from the Hugging Face Hub (offline? set HF_HUB_OFFLINE=1 to use the cache): {e}"
        ))
    };
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| offline_msg(&e))?;
    let repo = api.model(spec.to_string());
    let info = repo.info().map_err(|e| offline_msg(&e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !files.iter().any(|f| f == "model_index.json") {
        return Err(Error::Hub(format!(
            "{spec}: not a diffusers repo (no model_index.json)"
        )));
    }
    let mut root = None;
    for f in wanted(&files, prefer_fp16) {
        tracing::info!(file = %f, "fetching from {spec}");
        let local = repo.get(&f).map_err(|e| offline_msg(&e))?;
        if f == "model_index.json" {
            root = local.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::Hub(format!("{spec}: model_index.json was not fetched")))
}
