//! A trainable parameter store: diffusers key → candle [`Var`], initialised as PyTorch initialises a
//! freshly constructed diffusers/transformers module, seen by the models through an ordinary
//! [`Weights`] view (so the inference model code trains unchanged), and saved as `.safetensors`.
//!
//! The names and shapes a model needs are discovered from the model constructor itself (see
//! [`discover_shapes`]), so nothing here restates the architectures.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::data::TrainRng;
use crate::config::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig};
use crate::models::clip::ClipTextModel;
use crate::models::{AutoencoderKL, UNet2DConditionModel};
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
/// - CLIP's token and position embeddings: `N(0, 0.02²)` (transformers' `initializer_range`).
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

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other:?} cannot be written to .safetensors here"),
            ))
        }
    })
}

/// The little-endian bytes of a tensor.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other:?} cannot be written to .safetensors here"),
            ))
        }
    })
}

/// The temporary file a write of `path` goes through: `path` + `.tmp`, in the same folder (so the final
/// rename stays on one filesystem).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `bytes` to `path` atomically: to [`temp_path`] first, flushed and synced, then renamed over
/// `path`. On any failure (disk full, read-only or missing folder) the temporary file is removed and a
/// previous `path` is left untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        {
            let mut w = std::io::BufWriter::new(&mut f);
            write(&mut w)?;
            w.flush()?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes tensors as a `.safetensors` file (header keys sorted, data in that order, header padded with
/// spaces to a multiple of 8 bytes), atomically through [`write_atomic`].
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    let mut blobs = Vec::with_capacity(sorted.len());
    let mut offset = 0usize;
    for (name, t) in sorted {
        let bytes = tensor_bytes(t)?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(t.dtype())?,
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut head = serde_json::to_string(&header).unwrap().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for b in &blobs {
            w.write_all(b)?;
        }
        Ok(())
    })
}

/// The `__metadata__` of a `.safetensors` file (empty if it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let bad = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut head = vec![0u8; len as usize];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&head).map_err(|e| bad(format!("header: {e}")))?;
    match v.get("__metadata__") {
        None => Ok(BTreeMap::new()),
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| bad(format!("metadata: {e}"))),
    }
}
