//! kohya-ss keys: `lora_unet_{module}.lora_down.weight`, `.lora_up.weight` and `.alpha` (a 0-d tensor),
//! `lora_te_`/`lora_te1_` for the (first) text encoder and `lora_te2_` for SDXL's second, where `{module}`
//! is a module path with every `.` replaced by `_`. The published LCM-LoRA files flatten diffusers'
//! paths (`lora_unet_down_blocks_0_attentions_0_proj_in`); A1111/civitai LoRAs flatten the original LDM
//! UNet names (`lora_unet_input_blocks_1_1_proj_in`, `middle_block_…`, `output_blocks_…`).
//!
//! Since the flattening cannot be undone by rule (`to_out_0`, `transformer_blocks`), a name is resolved
//! against the target model's own module names flattened the same way — and, for LDM names, against the
//! single-file loader's map of each UNet module's LDM name.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{group_modules, LoraModule, ModuleRef, Role, Target};
use crate::config::UNet2DConditionConfig;
use crate::Result;

/// kohya's name prefixes and their targets.
const PREFIXES: [(&str, Target); 4] = [
    ("lora_unet_", Target::Unet),
    ("lora_te1_", Target::TextEncoder),
    ("lora_te2_", Target::TextEncoder2),
    ("lora_te_", Target::TextEncoder),
];

/// Key → (target, flattened module name, role).
fn classify(key: &str) -> Option<(Target, ModuleRef, Role)> {
    let (name, suffix) = key.split_once('.')?;
    let role = match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        _ => return None,
    };
    let (target, flat) = PREFIXES
        .iter()
        .find_map(|(p, t)| name.strip_prefix(p).map(|rest| (*t, rest)))?;
    let flat = match target {
        // Text encoders are named without transformers' `text_model.` level.
        Target::TextEncoder | Target::TextEncoder2 => {
            flat.strip_prefix("text_model_").unwrap_or(flat)
        }
        Target::Unet => flat,
    };
    if flat.is_empty() {
        return None;
    }
    Some((target, ModuleRef::Flat(flat.to_string()), role))
}

/// Groups a kohya file's tensors into modules (scale `alpha / r`, 1 without `.alpha`).
pub fn parse(tensors: &HashMap<String, Tensor>) -> std::result::Result<Vec<LoraModule>, String> {
    group_modules(tensors, classify)
}

/// A module path flattened as kohya does.
pub fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

/// Whether a flattened UNet name is an original LDM name.
pub fn is_ldm_name(flat: &str) -> bool {
    ["input_blocks_", "middle_block_", "output_blocks_"]
        .iter()
        .any(|p| flat.starts_with(p))
        || flat.starts_with("time_embed_")
        || flat.starts_with("out_")
        || flat.starts_with("label_emb_")
}

/// Each UNet leaf module's (diffusers path, original LDM path), from the single-file loader's map.
pub fn ldm_module_map(cfg: &UNet2DConditionConfig) -> Result<Vec<(String, String)>> {
    crate::weights::single_file::unet_module_map(cfg)
}
