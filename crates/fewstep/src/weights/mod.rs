//! Model weights: validated, memory-mapped `.safetensors` files, and [`Weights`], a prefix-scoped view that
//! hands each model the tensors it asks for with the shape it expects.

pub mod convert;
pub mod diffusers;
pub mod family;
pub mod hub;
pub mod parts;
pub mod safetensors;
pub mod single_file;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};

pub use self::safetensors::{refuse_pickle, SafetensorsFile};
use crate::lora::LoraBranch;
use crate::{Error, Result};

/// Where one tensor of a [`Weights`] view comes from.
#[derive(Clone, Debug)]
pub enum TensorSource {
    /// A stored tensor: file index and its key in that file.
    Stored { file: usize, key: String },
    /// `len` entries from `start` along `dim` of a stored tensor (e.g. q, k or v of OpenCLIP's stacked
    /// `in_proj_weight`).
    Slice {
        file: usize,
        key: String,
        dim: usize,
        start: usize,
        len: usize,
    },
    /// A stored tensor with another shape of the same size (e.g. LDM's 1×1-conv attention weights read as
    /// a Linear's matrix).
    Reshaped {
        file: usize,
        key: String,
        shape: Vec<usize>,
    },
    /// The transpose of a stored matrix (OpenCLIP's `text_projection`, applied as `x · P`, read as a
    /// Linear's `[out, in]` weight `Pᵀ`).
    Transposed { file: usize, key: String },
    /// A tensor computed at load time (e.g. a weight with a LoRA fused into it).
    Owned(Tensor),
}

struct Store {
    files: Arc<Vec<SafetensorsFile>>,
    /// Tensor name (diffusers naming) → where it comes from.
    index: HashMap<String, TensorSource>,
    /// The files' names, for error messages.
    label: String,
    /// Unfused LoRA branches per weight key (`…to_q.weight`), computed beside the layer at run time.
    lora: HashMap<String, Vec<LoraBranch>>,
}

/// A view of a set of weight files under a key prefix (`down_blocks.0.resnets.1.` …), loading tensors
/// in `dtype` on `device`. Keys are diffusers' names; a view may rename, slice or replace stored tensors
/// (single-file checkpoints, fused LoRAs) without the model code knowing.
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Layers built from this view may pack their weights for the CPU kernels, in place of the
    /// tensors (inference only: no gradient reaches a packed weight).
    cpu_inference: bool,
}

/// Opens `.safetensors` files (validating each).
pub fn open_files<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<SafetensorsFile>> {
    paths.iter().map(SafetensorsFile::open).collect()
}

impl Weights {
    /// Opens the given `.safetensors` files (sharded models give several) as one set of tensors, each
    /// under its stored name.
    pub fn from_files<P: AsRef<Path>>(paths: &[P], dtype: DType, device: &Device) -> Result<Self> {
        let files = open_files(paths)?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for k in f.tensors().keys() {
                index.insert(
                    k.clone(),
                    TensorSource::Stored {
                        file: i,
                        key: k.clone(),
                    },
                );
            }
        }
        Ok(Self::from_sources(files, index, dtype, device))
    }

    /// A view whose names map to `index`'s sources in `files` (e.g. a single-file checkpoint read under
    /// diffusers' names).
    pub fn from_sources(
        files: Vec<SafetensorsFile>,
        index: HashMap<String, TensorSource>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let label = files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            store: Arc::new(Store {
                files: Arc::new(files),
                index,
                label,
                lora: HashMap::new(),
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            cpu_inference: false,
        }
    }

    /// The same files with some tensors replaced (full keys, this view's prefix ignored); the original
    /// view is unchanged, so dropping the new one gives back the original weights exactly.
    pub fn with_overrides(&self, overrides: HashMap<String, Tensor>) -> Self {
        let mut index = self.store.index.clone();
        for (k, t) in overrides {
            index.insert(k, TensorSource::Owned(t));
        }
        Self {
            store: Arc::new(Store {
                files: self.store.files.clone(),
                index,
                label: self.store.label.clone(),
                lora: self.store.lora.clone(),
            }),
            ..self.clone()
        }
    }

    /// A view of the same tensors under new names: `names` maps each new full key to an existing one;
    /// keys not mentioned are dropped.
    pub fn renamed(&self, names: HashMap<String, String>) -> Self {
        let index = names
            .into_iter()
            .filter_map(|(new, old)| Some((new, self.store.index.get(&old)?.clone())))
            .collect();
        Self {
            store: Arc::new(Store {
                files: self.store.files.clone(),
                index,
                label: self.store.label.clone(),
                lora: self.store.lora.clone(),
            }),
            ..self.clone()
        }
    }

    /// The same tensors with unfused LoRA branches attached to some layers (full weight keys, e.g.
    /// `down_blocks.0.attentions.0.proj_in.weight`): layers built from the view compute
    /// `W x + Σ scale · up(down(x))`. Branches add to those already attached.
    pub fn with_lora_branches(&self, branches: HashMap<String, Vec<LoraBranch>>) -> Self {
        let mut lora = self.store.lora.clone();
        for (k, mut b) in branches {
            lora.entry(k).or_default().append(&mut b);
        }
        Self {
            store: Arc::new(Store {
                files: self.store.files.clone(),
                index: self.store.index.clone(),
                label: self.store.label.clone(),
                lora,
            }),
            ..self.clone()
        }
    }

    /// The LoRA branches attached to tensor `name` under this prefix (usually `"weight"`).
    pub fn lora_branches(&self, name: &str) -> &[LoraBranch] {
        self.store
            .lora
            .get(&self.key(name))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Number of layers carrying LoRA branches.
    pub fn lora_branch_count(&self) -> usize {
        self.store.lora.len()
    }

    /// The view one level down: keys are looked up under `prefix.name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: format!("{}{}.", self.prefix, name),
            ..self.clone()
        }
    }

    /// The same tensors, for layers that only infer: on a CPU with a product kernel for the dtype
    /// they keep their weights packed for it ([`crate::kernels::matmul::PackedWeight`]).
    pub fn for_cpu_inference(&self) -> Self {
        Self {
            cpu_inference: true,
            ..self.clone()
        }
    }

    /// Whether layers may pack their weights ([`Weights::for_cpu_inference`]).
    pub fn is_for_cpu_inference(&self) -> bool {
        self.cpu_inference
    }

    /// The same tensors, loaded in another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The files' names, for messages.
    pub fn label(&self) -> &str {
        &self.store.label
    }

    /// The full key of `name` under this view's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Whether the tensor `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.store.index.contains_key(&self.key(name))
    }

    /// Whether `name` is a tensor computed at load time (a fused weight, a training parameter) rather than
    /// read from a file: loading it returns the same memory each time.
    pub fn is_computed(&self, name: &str) -> bool {
        matches!(
            self.store.index.get(&self.key(name)),
            Some(TensorSource::Owned(_))
        )
    }

    /// All full keys of the view (whatever its prefix).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.store.index.keys()
    }

    /// The shape of `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let files = &self.store.files;
        Some(match self.store.index.get(&self.key(name))? {
            TensorSource::Stored { file, key } => files[*file].tensors()[key].shape.clone(),
            TensorSource::Slice {
                file,
                key,
                dim,
                len,
                ..
            } => {
                let mut shape = files[*file].tensors()[key].shape.clone();
                shape[*dim] = *len;
                shape
            }
            TensorSource::Reshaped { shape, .. } => shape.clone(),
            TensorSource::Transposed { file, key } => {
                let mut shape = files[*file].tensors()[key].shape.clone();
                shape.reverse();
                shape
            }
            TensorSource::Owned(t) => t.dims().to_vec(),
        })
    }

    /// Loads `name`, checks it has `shape`, converts it to this view's dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let got = self.shape_of(name).ok_or_else(|| self.missing(name))?;
        if got != shape.dims() {
            return Err(Error::Shape {
                file: self.store.label.clone(),
                key: self.key(name),
                expected: shape.dims().to_vec(),
                got,
            });
        }
        self.get_any_shape(name)
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingKey {
            file: self.store.label.clone(),
            key: self.key(name),
        }
    }

    /// Loads `name` whatever its shape, in this view's dtype.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let files = &self.store.files;
        let source = self
            .store
            .index
            .get(&self.key(name))
            .ok_or_else(|| self.missing(name))?;
        let t = match source {
            TensorSource::Stored { file, key } => files[*file].load(key, &self.device)?,
            TensorSource::Slice {
                file,
                key,
                dim,
                start,
                len,
            } => files[*file]
                .load(key, &self.device)?
                .narrow(*dim, *start, *len)?
                .contiguous()?,
            TensorSource::Reshaped { file, key, shape } => files[*file]
                .load(key, &self.device)?
                .reshape(shape.as_slice())?,
            TensorSource::Transposed { file, key } => {
                files[*file].load(key, &self.device)?.t()?.contiguous()?
            }
            TensorSource::Owned(t) => t.clone(),
        };
        Ok(t.to_dtype(self.dtype)?)
    }
}
