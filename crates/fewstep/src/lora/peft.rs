//! PEFT keys, as diffusers' `save_lora_weights` writes them: `unet.X.lora_A.weight` (down) and
//! `unet.X.lora_B.weight` (up), `text_encoder.X…`, `text_encoder_2.X…`; without a prefix the keys are the
//! UNet's (what `unet.save_lora_adapter` writes), or a text encoder's when they start with `text_model.`.
//!
//! The scale is `lora_alpha / r` from the `lora_adapter_metadata` JSON diffusers stores in the safetensors
//! header (`"unet.lora_alpha"`, `"unet.alpha_pattern"`, `"unet.use_rslora"` …), as diffusers builds its
//! `LoraConfig` from it; without metadata diffusers sets `lora_alpha = r`, i.e. scale 1. The older diffusers
//! names of [`super::diffusers`] are read here too, with the same prefixes.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::Value;

use super::{diffusers, group_modules, LoraModule, ModuleRef, Role, Target};

/// The target of a key and the rest of it.
fn split_target(key: &str) -> (Target, &str) {
    for (p, t) in [
        ("unet.", Target::Unet),
        ("text_encoder_2.", Target::TextEncoder2),
        ("text_encoder.", Target::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(p) {
            return (t, rest);
        }
    }
    if key.starts_with("text_model.") {
        return (Target::TextEncoder, key);
    }
    (Target::Unet, key)
}

/// Module paths of text encoders are kept without transformers' `text_model.` level.
fn canonical(path: &str, target: Target) -> String {
    match target {
        Target::Unet => path.to_string(),
        _ => path.strip_prefix("text_model.").unwrap_or(path).to_string(),
    }
}

fn classify(key: &str) -> Option<(Target, ModuleRef, Role)> {
    let (target, rest) = split_target(key);
    for (suffix, role) in [(".lora_A.weight", Role::Down), (".lora_B.weight", Role::Up)] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Some((target, ModuleRef::Path(canonical(m, target)), role));
        }
    }
    let (m, role) = diffusers::classify(rest)?;
    let m = diffusers::module_path(&m, target);
    Some((target, ModuleRef::Path(canonical(&m, target)), role))
}

/// The `LoraConfig` fields that set the scale, per target.
#[derive(Debug, Default)]
struct AdapterConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
    use_dora: bool,
}

fn adapter_config(meta: &HashMap<String, Value>, target: Target) -> AdapterConfig {
    let get = |field: &str| {
        meta.get(&format!("{}.{field}", target.name()))
            .or_else(|| meta.get(field))
    };
    AdapterConfig {
        lora_alpha: get("lora_alpha").and_then(Value::as_f64),
        alpha_pattern: get("alpha_pattern")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default(),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        use_dora: get("use_dora").and_then(Value::as_bool).unwrap_or(false),
    }
}

/// PEFT's pattern match: `^P` matches the whole name, `P` the name or a `.`-separated suffix of it.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    match pattern.strip_prefix('^') {
        Some(p) => module == p,
        None => module == pattern || module.ends_with(&format!(".{pattern}")),
    }
}

/// Groups a PEFT (or older diffusers) file's tensors into modules and sets their scales from the
/// adapter metadata.
pub fn parse(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> std::result::Result<Vec<LoraModule>, String> {
    let mut modules = group_modules(tensors, classify)?;
    let Some(json) = metadata.get("lora_adapter_metadata") else {
        return Ok(modules);
    };
    let meta: HashMap<String, Value> = serde_json::from_str(json)
        .map_err(|e| format!("`lora_adapter_metadata` is not a JSON object: {e}"))?;
    let mut configs = HashMap::new();
    for m in &mut modules {
        let cfg = configs
            .entry(m.target)
            .or_insert_with(|| adapter_config(&meta, m.target));
        if cfg.use_dora {
            return Err(format!(
                "{} adapter: DoRA (`use_dora`) is not supported",
                m.target.name()
            ));
        }
        let path = m.module.to_string();
        let alpha = cfg
            .alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, &path))
            .map(|(_, a)| *a)
            .or(cfg.lora_alpha);
        if let Some(a) = alpha {
            let r = m.rank() as f64;
            m.alpha = Some(a);
            m.scale = if cfg.use_rslora { a / r.sqrt() } else { a / r };
        }
    }
    Ok(modules)
}
