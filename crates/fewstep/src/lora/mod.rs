//! LoRA adapters: reading every published layout, and applying several at once with a weight each.
//!
//! A [`LoraFile`] is the parsed file: per target module a `down` (`[r, in]` or `[r, in, kh, kw]`) and an
//! `up` (`[out, r]` or `[out, r, 1, 1]`) factor and a scale (`alpha / r`, 1 where the file has no alpha),
//! so that the module's weight update is `ΔW = scale · up · down` (reshaped to the weight's shape). The
//! layout is detected from the keys, never from the file name:
//!
//! - [`kohya`]: `lora_unet_…`, `lora_te_…`/`lora_te1_…`, `lora_te2_…` with `.lora_down.weight`,
//!   `.lora_up.weight` and `.alpha`, over diffusers module paths (the published LCM-LoRA files) or over
//!   the original LDM UNet names (A1111/civitai LoRAs);
//! - [`peft`]: `unet.X.lora_A.weight`/`lora_B.weight` (with or without `unet.`), `text_encoder.`,
//!   `text_encoder_2.`, alpha from the `lora_adapter_metadata` diffusers writes;
//! - [`diffusers`]: the older `X.lora.down.weight`/`lora.up.weight`, attention-processor `to_q_lora`…
//!   and text-encoder `lora_linear_layer` names.
//!
//! [`apply`] fuses LoRAs into a model's weights or attaches them as runtime branches.

pub mod apply;
pub mod diffusers;
pub mod kohya;
pub mod peft;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::weights::SafetensorsFile;
use crate::{Error, Result};

pub use apply::{fuse, runtime, FuseReport, LoraReport};

/// The model a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    TextEncoder2,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Unet => "unet",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How a LoRA names its target module.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleRef {
    /// A diffusers module path (`down_blocks.0.attentions.0.proj_in`; text encoders without a leading
    /// `text_model.`).
    Path(String),
    /// kohya's flattened name (every `.` replaced by `_`, `down_blocks_0_attentions_0_proj_in`), of a
    /// diffusers module path or of an original LDM UNet name (`input_blocks_1_1_proj_in`); resolved against
    /// the model's own module names flattened the same way.
    Flat(String),
}

impl std::fmt::Display for ModuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleRef::Path(p) | ModuleRef::Flat(p) => f.write_str(p),
        }
    }
}

/// The layout a file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// kohya-ss `lora_unet_…`/`lora_te…_` keys.
    Kohya,
    /// PEFT `lora_A`/`lora_B` keys.
    Peft,
    /// Older diffusers `lora.down`/`lora.up`, `to_q_lora`, `lora_linear_layer` keys.
    DiffusersOld,
}

/// One adapted module: `ΔW = scale · up · down`.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub target: Target,
    pub module: ModuleRef,
    /// The file's keys of the two factors (for messages).
    pub down_key: String,
    pub up_key: String,
    /// `[r, in]` or `[r, in, kh, kw]`, f32.
    pub down: Tensor,
    /// `[out, r]` or `[out, r, 1, 1]`, f32.
    pub up: Tensor,
    pub alpha: Option<f64>,
    /// `alpha / r` (kohya, PEFT metadata), 1 where the file gives no alpha.
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// The shape of the weight update: `[out, in]` or `[out, in, kh, kw]`.
    pub fn delta_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.dims()[0]];
        s.extend_from_slice(&self.down.dims()[1..]);
        s
    }
}

/// A LoRA branch attached to a layer for the runtime (unfused) mode: the layer adds
/// `scale · up(down(x))` to its output (`scale` = the user's weight × the file's `alpha / r`).
#[derive(Clone, Debug)]
pub struct LoraBranch {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub layout: Layout,
    /// Sorted by target, then by the file's key.
    pub modules: Vec<LoraModule>,
}

impl LoraFile {
    /// Reads and validates a `.safetensors` LoRA: every tensor a float without NaN or ±inf, every key
    /// part of one layout, each down with its up of the same rank.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        let err = |reason: String| Error::Lora {
            path: path.to_path_buf(),
            reason,
        };
        let mut keys: Vec<&String> = file.tensors().keys().collect();
        keys.sort();
        if keys.is_empty() {
            return Err(err("the file holds no tensors".into()));
        }
        for k in &keys {
            let dtype = file.tensors()[*k].dtype;
            if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
                return Err(err(format!(
                    "tensor `{k}` is {dtype:?}, not a floating-point number"
                )));
            }
        }
        let layout = detect_layout(&keys).map_err(err)?;
        let mut tensors = HashMap::with_capacity(keys.len());
        for k in &keys {
            let t = file.load(k, &Device::Cpu)?.to_dtype(DType::F32)?;
            // 0·x is NaN exactly where x is NaN or ±inf.
            let probe = (&t * 0.0)?.sum_all()?.to_scalar::<f32>()?;
            if !probe.is_finite() {
                return Err(err(format!("tensor `{k}` holds NaN or infinite values")));
            }
            tensors.insert((*k).clone(), t);
        }
        let mut modules = match layout {
            Layout::Kohya => kohya::parse(&tensors),
            Layout::Peft | Layout::DiffusersOld => peft::parse(&tensors, file.metadata()),
        }
        .map_err(err)?;
        modules.sort_by(|a, b| (a.target, &a.down_key).cmp(&(b.target, &b.down_key)));
        Ok(Self {
            path: path.to_path_buf(),
            layout,
            modules,
        })
    }

    /// The file name without `.safetensors`, as the prompt syntax and the PNG parameters name it.
    pub fn name(&self) -> String {
        lora_name(&self.path)
    }

    /// Number of modules per target.
    pub fn count(&self, target: Target) -> usize {
        self.modules.iter().filter(|m| m.target == target).count()
    }

    /// Number of parameters (both factors of every module).
    pub fn num_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.down.elem_count() + m.up.elem_count())
            .sum()
    }
}

/// The file name of `path` without its `.safetensors` extension.
pub fn lora_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".safetensors")
        .map(str::to_string)
        .unwrap_or(name)
}

/// Keys a LoRA layout this crate does not apply, with what they are.
const UNSUPPORTED: [(&str, &str); 6] = [
    (".hada_", "LyCORIS LoHa"),
    (".lokr_", "LyCORIS LoKr"),
    (
        ".lora_mid.",
        "LyCORIS LoCon with a Tucker `lora_mid` factor",
    ),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".lora_B.bias", "PEFT `lora_bias`"),
];

/// Which layout the keys are in.
fn detect_layout(keys: &[&String]) -> std::result::Result<Layout, String> {
    for k in keys {
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(pat, _)| k.contains(pat)) {
            return Err(format!("`{k}`: {what} adapters are not supported"));
        }
    }
    const KOHYA: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];
    if keys.iter().any(|k| KOHYA.iter().any(|p| k.starts_with(p))) {
        return Ok(Layout::Kohya);
    }
    if keys
        .iter()
        .any(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
    {
        return Ok(Layout::Peft);
    }
    if keys.iter().any(|k| diffusers::classify(k).is_some()) {
        return Ok(Layout::DiffusersOld);
    }
    Err(format!(
        "no key is in a known LoRA layout (kohya `lora_unet_….lora_down.weight`, PEFT `….lora_A.weight`, \
         diffusers `….lora.down.weight`); first keys: {}",
        first_ten(keys.iter().map(|k| k.as_str()))
    ))
}

/// `a, b, … (N in all)`, for messages listing keys.
pub(crate) fn first_ten<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = items.collect();
    let mut s = all
        .iter()
        .take(10)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > 10 {
        s.push_str(&format!(", … ({} in all)", all.len()));
    }
    s
}

/// What a key of a LoRA file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Down,
    Up,
    Alpha,
}

#[derive(Default)]
struct Group {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Groups the keys into modules with `classify` (key → target, module, role). Keys it does not recognise
/// are an error listing the first ten; so is a down without its up, or factors of different ranks.
/// The scale is `alpha / r`, or 1 without alpha.
pub(crate) fn group_modules(
    tensors: &HashMap<String, Tensor>,
    classify: impl Fn(&str) -> Option<(Target, ModuleRef, Role)>,
) -> std::result::Result<Vec<LoraModule>, String> {
    let mut groups: BTreeMap<(Target, ModuleRef), Group> = BTreeMap::new();
    let mut unknown: Vec<&str> = Vec::new();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for k in keys {
        let Some((target, module, role)) = classify(k) else {
            unknown.push(k);
            continue;
        };
        let g = groups.entry((target, module)).or_default();
        let slot = match role {
            Role::Down => &mut g.down,
            Role::Up => &mut g.up,
            Role::Alpha => &mut g.alpha,
        };
        if let Some(prev) = slot {
            return Err(format!("`{prev}` and `{k}` name the same LoRA factor"));
        }
        *slot = Some(k.clone());
    }
    if !unknown.is_empty() {
        return Err(format!(
            "keys that are not part of the LoRA layout: {}",
            first_ten(unknown.into_iter())
        ));
    }
    let mut modules = Vec::with_capacity(groups.len());
    for ((target, module), g) in groups {
        let (down_key, up_key) = match (g.down, g.up) {
            (Some(d), Some(u)) => (d, u),
            (Some(k), None) | (None, Some(k)) => {
                return Err(format!("`{k}` has no matching up/down factor"))
            }
            (None, None) => {
                let k = g.alpha.unwrap_or_default();
                return Err(format!("`{k}` belongs to no LoRA factors"));
            }
        };
        let down = tensors[&down_key].clone();
        let up = tensors[&up_key].clone();
        let (dd, ud) = (down.dims(), up.dims());
        let down_ok = matches!(dd.len(), 2 | 4) && dd[0] > 0;
        let up_ok = ud.len() == 2 || (ud.len() == 4 && ud[2] == 1 && ud[3] == 1);
        if !down_ok || !up_ok || ud.len() < 2 || ud[1] != dd[0] {
            return Err(format!(
                "`{down_key}` {dd:?} and `{up_key}` {ud:?} are not LoRA factors (down [r, in] or \
                 [r, in, kh, kw], up [out, r] or [out, r, 1, 1] of the same rank)"
            ));
        }
        let alpha = match &g.alpha {
            Some(k) => {
                let t = &tensors[k];
                if t.elem_count() != 1 {
                    return Err(format!(
                        "`{k}` has shape {:?}, expected one number",
                        t.dims()
                    ));
                }
                Some(
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| e.to_string())?[0] as f64,
                )
            }
            None => None,
        };
        let r = dd[0] as f64;
        modules.push(LoraModule {
            target,
            module,
            down_key,
            up_key,
            down,
            up,
            alpha,
            scale: alpha.map_or(1.0, |a| a / r),
        });
    }
    Ok(modules)
}

/// A LoRA to apply: its file and its weight (1.0 by default).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl LoraSpec {
    /// Parses `PATH[:WEIGHT]`. The weight is the part after the last `:` when it is a number; a path
    /// that itself contains `:` stays whole. A weight that is not a finite number is an error when the
    /// part before it names an existing file (`style.safetensors:strong`).
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid("lora", reason);
        if let Some((head, tail)) = s.rsplit_once(':') {
            if let Ok(w) = tail.trim().parse::<f64>() {
                if !w.is_finite() {
                    return Err(invalid(format!(
                        "weight `{tail}` of `{s}` is not a finite number"
                    )));
                }
                if head.is_empty() {
                    return Err(invalid(format!("`{s}` names no file")));
                }
                return Ok(Self {
                    path: PathBuf::from(head),
                    weight: w,
                });
            }
            if !Path::new(s).exists() && Path::new(head).is_file() {
                return Err(invalid(format!(
                    "weight `{tail}` of `{s}` is not a number (expected PATH[:WEIGHT], e.g. {head}:0.8)"
                )));
            }
        }
        if s.is_empty() {
            return Err(invalid("empty LoRA path".into()));
        }
        Ok(Self {
            path: PathBuf::from(s),
            weight: 1.0,
        })
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Removes the `<lora:NAME:WEIGHT>` (or `<lora:NAME>`, weight 1) tags of A1111 and stable-diffusion.cpp
/// from `prompt`, resolving each NAME to `NAME.safetensors` in `lora_dir`. Returns the prompt without the
/// tags (spaces around a removed tag collapsed, ends trimmed) and the LoRAs in the order of the tags.
pub fn extract_prompt_loras(prompt: &str, lora_dir: &Path) -> Result<(String, Vec<LoraSpec>)> {
    let (rest, tags) = split_prompt_tags(prompt)?;
    let mut specs = Vec::with_capacity(tags.len());
    for (name, weight) in tags {
        let file = if name.ends_with(".safetensors") {
            name.clone()
        } else {
            format!("{name}.safetensors")
        };
        let path = lora_dir.join(&file);
        if !path.is_file() {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "<lora:{name}:…> names {}, which does not exist",
                    path.display()
                ),
            ));
        }
        specs.push(LoraSpec { path, weight });
    }
    Ok((rest, specs))
}

/// The prompt without its `<lora:…>` tags, and each tag's (NAME, WEIGHT).
pub fn split_prompt_tags(prompt: &str) -> Result<(String, Vec<(String, f64)>)> {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            return Err(Error::invalid(
                "prompt",
                format!("`{}` has no closing `>`", &rest[start..]),
            ));
        };
        let body = &after[..end];
        let (name, weight) = match body.rsplit_once(':') {
            Some((n, w)) => match w.trim().parse::<f64>() {
                Ok(w) if w.is_finite() => (n, w),
                _ => {
                    return Err(Error::invalid(
                        "prompt",
                        format!("<lora:{body}>: weight `{w}` is not a finite number"),
                    ))
                }
            },
            None => (body, 1.0),
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(Error::invalid(
                "prompt",
                format!("<lora:{body}> names no LoRA"),
            ));
        }
        tags.push((name.to_string(), weight));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    let cleaned = out
        .split(' ')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((cleaned, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_weight_after_last_colon() {
        let s = LoraSpec::parse("a/b.safetensors:0.8").unwrap();
        assert_eq!(s.path, PathBuf::from("a/b.safetensors"));
        assert_eq!(s.weight, 0.8);
        let s = LoraSpec::parse("dir:with:colons/x.safetensors").unwrap();
        assert_eq!(s.path, PathBuf::from("dir:with:colons/x.safetensors"));
        assert_eq!(s.weight, 1.0);
        let s = LoraSpec::parse("dir:x/y.safetensors:-1.5").unwrap();
        assert_eq!(s.path, PathBuf::from("dir:x/y.safetensors"));
        assert_eq!(s.weight, -1.5);
        assert!(LoraSpec::parse("x.safetensors:inf").is_err());
        assert!(LoraSpec::parse("x.safetensors:nan").is_err());
        assert!(LoraSpec::parse(":1").is_err());
    }

    #[test]
    fn prompt_tags() {
        let (p, t) = split_prompt_tags("a cat <lora:lcm:1> in a hat, <lora:style:0.8>").unwrap();
        assert_eq!(p, "a cat in a hat,");
        assert_eq!(
            t,
            vec![("lcm".to_string(), 1.0), ("style".to_string(), 0.8)]
        );
        let (p, t) = split_prompt_tags("<lora:x>plain").unwrap();
        assert_eq!(p, "plain");
        assert_eq!(t, vec![("x".to_string(), 1.0)]);
        assert!(split_prompt_tags("a <lora:x:big>").is_err());
        assert!(split_prompt_tags("a <lora:x:1").is_err());
        let (p, t) = split_prompt_tags("no tags here").unwrap();
        assert_eq!(p, "no tags here");
        assert!(t.is_empty());
    }
}
