//! A trainable parameter store: diffusers key → candle [`Var`], initialised as PyTorch initialises a
//! freshly constructed diffusers/transformers module, seen by the models through an ordinary
//! [`Weights`] view (so the inference model code trains unchanged), and saved as `.safetensors`.
//!
//! The names and shapes a model needs are discovered from the model constructor itself (see
//! [`discover_shapes`]), so nothing here restates the architectures.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::data::TrainRng;
use crate::config::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig};
use crate::models::clip::ClipTextModel;
use crate::models::{AutoencoderKL, UNet2DConditionModel};
use crate::weights::safetensors::write_safetensors;
use crate::weights::{SafetensorsFile, TensorSource, Weights};
use crate::{Error, Result};

/// The names and shapes of every tensor `build` reads from its [`Weights`] view, found by running the
/// constructor against a growing set of placeholders: a missing key gets an empty placeholder, whose
/// shape error then tells the shape the model expects. Each placeholder is a broadcast zero (no memory).
pub fn discover_shapes<F>(build: F) -> Result<BTreeMap<String, Vec<usize>>>
where
    F: Fn(&Weights) -> Result<()>,
{
    let device = Device::Cpu;
    let zero = Tensor::zeros((), DType::F32, &device)?;
    let mut index: HashMap<String, TensorSource> = HashMap::new();
    let mut shapes = BTreeMap::new();
    let mut pending: Option<String> = None;
    loop {
        let w = Weights::from_sources(Vec::new(), index.clone(), DType::F32, &device);
        match build(&w) {
            Ok(()) => return Ok(shapes),
            Err(Error::MissingKey { key, .. }) if pending.as_ref() != Some(&key) => {
                index.insert(
                    key.clone(),
                    TensorSource::Owned(Tensor::zeros(0, DType::F32, &device)?),
                );
                pending = Some(key);
            }
            Err(Error::Shape { key, expected, .. })
                if pending.as_ref() == Some(&key) && !shapes.contains_key(&key) =>
            {
                let t = zero.broadcast_as(expected.as_slice())?;
                index.insert(key.clone(), TensorSource::Owned(t));
                shapes.insert(key, expected);
                pending = None;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The tensors of a UNet with this config (diffusers names).
pub fn unet_shapes(cfg: &UNet2DConditionConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    discover_shapes(|w| UNet2DConditionModel::new(cfg, w).map(|_| ()))
}

/// The tensors of an AutoencoderKL with this config.
pub fn vae_shapes(cfg: &AutoencoderKLConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    discover_shapes(|w| AutoencoderKL::new(cfg, w).map(|_| ()))
}

/// The tensors of a CLIP text encoder, under transformers 4.x / SD1.x names (`text_model.…`).
pub fn text_encoder_shapes(cfg: &ClipTextConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    discover_shapes(|w| ClipTextModel::new(cfg, &w.pp("text_model")).map(|_| ()))
}

/// How a tensor is initialised, from its name and shape (the scheme of PyTorch's module constructors,
/// which diffusers' `from_config` keeps):
/// - matrices and kernels (`Linear`, `Conv2d` weights): kaiming-uniform with a = √5, i.e.
///   `U(−1/√fan_in, 1/√fan_in)`, `fan_in = in·k·k`;
/// - their biases: `U(−1/√fan_in, 1/√fan_in)` with the weight's `fan_in`;
/// - norm scales (1-D `weight`): 1; norm shifts (1-D `bias` without a matrix beside it): 0;
/// - CLIP's token and position embeddings: `N(0, 0.02²)` (transformers' `initializer_range`);
/// - LoRA: `lora_down` as a linear/conv weight, `lora_up` zeros (peft's default: the adapter starts as
///   the identity).
fn init_values(
    name: &str,
    shape: &[usize],
    shapes: &BTreeMap<String, Vec<usize>>,
    rng: &mut TrainRng,
) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let uniform_fan = |fan_in: usize, rng: &mut TrainRng| -> Vec<f32> {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect()
    };
    if name.ends_with("token_embedding.weight") || name.ends_with("position_embedding.weight") {
        return (0..n).map(|_| (0.02 * rng.normal()) as f32).collect();
    }
    if name.ends_with("lora_up.weight") {
        return vec![0.0; n];
    }
    if shape.len() >= 2 {
        return uniform_fan(shape[1..].iter().product(), rng);
    }
    if let Some(stem) = name.strip_suffix(".bias") {
        if let Some(ws) = shapes.get(&format!("{stem}.weight")) {
            if ws.len() >= 2 {
                return uniform_fan(ws[1..].iter().product(), rng);
            }
        }
        return vec![0.0; n];
    }
    vec![1.0; n]
}

/// Trainable parameters: full diffusers keys (a component prefix such as `unet.` where several models
/// share a store) → f32 [`Var`]s, in sorted order.
#[derive(Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl ParamStore {
    /// An empty store.
    pub fn new(device: &Device) -> Self {
        Self {
            vars: BTreeMap::new(),
            device: device.clone(),
        }
    }

    /// Adds freshly initialised parameters for `shapes`, each key prefixed by `prefix` (e.g. `"unet."`,
    /// or `""`), drawn from a generator seeded with `seed` in sorted key order.
    pub fn add_init(
        &mut self,
        prefix: &str,
        shapes: &BTreeMap<String, Vec<usize>>,
        seed: u64,
    ) -> Result<()> {
        let mut rng = TrainRng::new(seed);
        for (name, shape) in shapes {
            let values = init_values(name, shape, shapes, &mut rng);
            let t = Tensor::from_vec(values, shape.as_slice(), &self.device)?;
            self.vars
                .insert(format!("{prefix}{name}"), Var::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Adds the tensors of `w` named in `shapes` (e.g. a pretrained component to fine-tune), converted to
    /// f32, under `prefix`.
    pub fn add_from_weights(
        &mut self,
        prefix: &str,
        shapes: &BTreeMap<String, Vec<usize>>,
        w: &Weights,
    ) -> Result<()> {
        let w = w.with_dtype(DType::F32);
        for (name, shape) in shapes {
            let t = w.get(shape.as_slice(), name)?.to_device(&self.device)?;
            self.vars
                .insert(format!("{prefix}{name}"), Var::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Adds a parameter (replacing one of the same name).
    pub fn insert(&mut self, name: impl Into<String>, value: &Tensor) -> Result<()> {
        let t = value.to_dtype(DType::F32)?.to_device(&self.device)?;
        self.vars.insert(name.into(), Var::from_tensor(&t)?);
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Names and variables, in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Number of scalar parameters.
    pub fn num_scalars(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// A [`Weights`] view (f32) whose tensors are the variables themselves: a model built from it is
    /// trainable, and sees later updates only when rebuilt (candle's `Var::set` replaces storage in place,
    /// so a built model does see them). Use `.pp("unet")` etc. for one component.
    pub fn weights(&self) -> Weights {
        let index = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), TensorSource::Owned(v.as_tensor().clone())))
            .collect();
        Weights::from_sources(Vec::new(), index, DType::F32, &self.device)
    }

    /// The tensors under `prefix` with the prefix removed (e.g. `"unet."` → the UNet's own keys).
    pub fn component(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.as_tensor().clone())))
            .collect()
    }

    /// Saves the parameters under `prefix` (prefix removed) as a `.safetensors` file in `dtype`, with
    /// `{"format": "pt"}` metadata as diffusers and transformers write it; atomically (see
    /// [`write_safetensors`]).
    pub fn save_component(&self, prefix: &str, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .component(prefix)
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(path, &tensors, &meta)
    }

    /// Reads every tensor of a `.safetensors` file as a parameter (f32), keys prefixed with `prefix`.
    pub fn add_file(&mut self, prefix: &str, path: &Path) -> Result<()> {
        let file = SafetensorsFile::open(path)?;
        let mut keys: Vec<&String> = file.tensors().keys().collect();
        keys.sort();
        for k in keys {
            let t = file.load(k, &self.device)?.to_dtype(DType::F32)?;
            self.vars
                .insert(format!("{prefix}{k}"), Var::from_tensor(&t)?);
        }
        Ok(())
    }
}
