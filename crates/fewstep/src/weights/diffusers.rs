//! The diffusers folder layout: `model_index.json` at the root and one sub-folder per component
//! (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), each with its `config.json` and its
//! weights (`diffusion_pytorch_model[.fp16].safetensors` or `model[.fp16].safetensors`, possibly sharded
//! with a `.safetensors.index.json`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::load_json;
use crate::weights::refuse_pickle;
use crate::{Error, Result};

/// A diffusers model folder, checked to have a `model_index.json`.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
}

/// The files of one component: its config and its weight shards.
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ComponentFiles {
    /// The `config.json` and weight files of one component folder (e.g. a standalone VAE such as
    /// `madebyollin/sdxl-vae-fp16-fix`), with the same file choice as [`DiffusersFolder::component`].
    pub fn in_dir(dir: &Path, prefer_variant: Option<&str>) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                what: "config.json".into(),
            });
        }
        let weights = find_weights(dir, prefer_variant)?;
        Ok(Self { config, weights })
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// The keys of `model_index.json` the loader reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// `["transformers", "CLIPTextModelWithProjection"]`, or `[null, null]` where absent.
    pub text_encoder_2: Option<serde_json::Value>,
}

impl ModelIndex {
    /// An SDXL pipeline: its class names one (`StableDiffusionXL…`) or it lists a `text_encoder_2`.
    pub fn is_sdxl(&self) -> bool {
        self.class_name
            .as_deref()
            .is_some_and(|c| c.starts_with("StableDiffusionXL"))
            || self
                .text_encoder_2
                .as_ref()
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.iter().any(|x| !x.is_null()))
    }
}

/// The weight-file stems diffusers and transformers use.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

impl DiffusersFolder {
    /// Opens `root`; it must hold `model_index.json`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if root.is_file() {
            refuse_pickle(
                &root,
                "give a diffusers folder holding .safetensors weights instead",
            )?;
        }
        if !root.join("model_index.json").is_file() {
            return Err(Error::Missing {
                path: root,
                what: "model_index.json (expected a diffusers model folder)".into(),
            });
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of component `name`, which must exist.
    pub fn component_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: self.root.clone(),
                what: format!("the `{name}/` folder"),
            });
        }
        Ok(dir)
    }

    /// The config and weights of component `name`. With `prefer_variant` (e.g. `"fp16"`) the variant's files
    /// are taken where present; otherwise the plain files, falling back to any variant the folder has.
    pub fn component(&self, name: &str, prefer_variant: Option<&str>) -> Result<ComponentFiles> {
        ComponentFiles::in_dir(&self.component_dir(name)?, prefer_variant)
    }

    /// The parsed `model_index.json`.
    pub fn model_index(&self) -> Result<ModelIndex> {
        load_json(&self.root.join("model_index.json"))
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> Result<PathBuf> {
        let path = self
            .component_dir("scheduler")?
            .join("scheduler_config.json");
        if !path.is_file() {
            return Err(Error::Missing {
                path: self.root.join("scheduler"),
                what: "scheduler_config.json".into(),
            });
        }
        Ok(path)
    }
}

/// Picks the safetensors weights of a component folder. Variants are named `STEM.VARIANT.safetensors`.
fn find_weights(dir: &Path, prefer_variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let names: BTreeSet<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let variants: BTreeSet<&str> = names
        .iter()
        .filter_map(|n| {
            let rest = n.strip_suffix(".safetensors")?;
            STEMS
                .iter()
                .find_map(|s| rest.strip_prefix(s)?.strip_prefix('.'))
        })
        .filter(|v| !v.contains('-')) // shards look like `model-00001-of-00002`
        .collect();
    let mut order: Vec<Option<&str>> = Vec::new();
    if let Some(v) = prefer_variant {
        order.push(Some(v));
    }
    order.push(None);
    order.extend(variants.iter().map(|v| Some(*v)));
    for variant in order {
        for stem in STEMS {
            let base = match variant {
                Some(v) => format!("{stem}.{v}.safetensors"),
                None => format!("{stem}.safetensors"),
            };
            if names.contains(&base) {
                return Ok(vec![dir.join(base)]);
            }
            let index = format!("{base}.index.json");
            if names.contains(&index) {
                let idx: ShardIndex = load_json(&dir.join(&index))?;
                let shards: BTreeSet<&String> = idx.weight_map.values().collect();
                return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
            }
        }
    }
    if let Some(pickle) = names
        .iter()
        .find(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt"))
    {
        return Err(Error::Pickle {
            path: dir.join(pickle),
            hint: format!(
                "put `{}` (the safetensors weights of the same model) in {}",
                pickle
                    .replace(".bin", ".safetensors")
                    .replace(".ckpt", ".safetensors")
                    .replace(".pt", ".safetensors"),
                dir.display()
            ),
        });
    }
    Err(Error::Missing {
        path: dir.to_path_buf(),
        what: "weights (diffusion_pytorch_model.safetensors or model.safetensors)".into(),
    })
}
