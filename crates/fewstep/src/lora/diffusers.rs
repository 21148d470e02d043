//! The older diffusers LoRA names, which diffusers 0.42.1 still loads: `X.lora.down.weight` /
//! `X.lora.up.weight` (what `convert_state_dict_to_diffusers` writes for UNet layers), the attention-
//! processor names `X[.processor].to_q_lora.down.weight` (`to_k_lora`, `to_v_lora`, `to_out_lora`), and the
//! text encoder's `X.lora_linear_layer.down.weight`. Prefixes (`unet.`, `text_encoder.`) are handled by
//! [`super::peft`], which reads both this layout and PEFT's.

use super::{Role, Target};

/// The attention-processor LoRA names and the projection each adapts (UNet, text encoder).
const PROCESSOR: [(&str, &str, &str); 4] = [
    ("to_q_lora", "to_q", "q_proj"),
    ("to_k_lora", "to_k", "k_proj"),
    ("to_v_lora", "to_v", "v_proj"),
    ("to_out_lora", "to_out.0", "out_proj"),
];

/// A key's module path (before target-specific renaming) and role, if it is in this layout.
pub fn classify(key: &str) -> Option<(String, Role)> {
    for (suffix, role) in [
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return Some((m.to_string(), role));
        }
    }
    for (name, _, _) in PROCESSOR {
        for (suffix, role) in [(".down.weight", Role::Down), (".up.weight", Role::Up)] {
            if let Some(m) = key.strip_suffix(&format!(".{name}{suffix}")) {
                return Some((format!("{m}.{name}"), role));
            }
        }
    }
    None
}

/// The module path of a classified key for `target`: `.processor` levels dropped, `X.to_q_lora` →
/// `X.to_q` (UNet) or `X.q_proj` (text encoders).
pub fn module_path(path: &str, target: Target) -> String {
    let path = path.replace(".processor.", ".");
    let path = path.strip_suffix(".processor").unwrap_or(&path).to_string();
    for (name, unet, te) in PROCESSOR {
        if let Some(m) = path.strip_suffix(name) {
            let proj = if target == Target::Unet { unet } else { te };
            let m = m.strip_suffix("processor.").unwrap_or(m);
            return format!("{m}{proj}");
        }
    }
    path
}
