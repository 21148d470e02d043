//! Model weights: validated, memory-mapped `.safetensors` files, and [`Weights`], a prefix-scoped view that
//! hands each model the tensors it asks for with the shape it expects.

pub mod diffusers;
pub mod hub;
pub mod safetensors;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};

pub use self::safetensors::{refuse_pickle, SafetensorsFile};
use crate::{Error, Result};

struct Store {
    files: Vec<SafetensorsFile>,
    /// Tensor name → index in `files`.
    index: HashMap<String, usize>,
    /// The files' names, for error messages.
    label: String,
}

/// A view of a set of weight files under a key prefix (`down_blocks.0.resnets.1.` …), loading tensors
/// in `dtype` on `device`.
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Opens the given `.safetensors` files (sharded models give several) as one set of tensors.
    pub fn from_files<P: AsRef<Path>>(paths: &[P], dtype: DType, device: &Device) -> Result<Self> {
        let files = paths
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for k in f.tensors().keys() {
                index.insert(k.clone(), i);
            }
        }
        let label = files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self {
            store: Arc::new(Store {
                files,
                index,
                label,
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        })
    }

    /// The view one level down: keys are looked up under `prefix.name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: format!("{}{}.", self.prefix, name),
            ..self.clone()
        }
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

    /// The full key of `name` under this view's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Whether the tensor `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.store.index.contains_key(&self.key(name))
    }

    /// All full keys of the underlying files.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.store.index.keys()
    }

    /// The stored shape of `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let key = self.key(name);
        let i = *self.store.index.get(&key)?;
        Some(self.store.files[i].tensors()[&key].shape.clone())
    }

    /// Loads `name`, checks it has `shape`, converts it to this view's dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let key = self.key(name);
        let got = self.shape_of(name).ok_or_else(|| Error::MissingKey {
            file: self.store.label.clone(),
            key: key.clone(),
        })?;
        if got != shape.dims() {
            return Err(Error::Shape {
                file: self.store.label.clone(),
                key,
                expected: shape.dims().to_vec(),
                got,
            });
        }
        self.get_any_shape(name)
    }

    /// Loads `name` whatever its shape, in this view's dtype.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        let i = *self
            .store
            .index
            .get(&key)
            .ok_or_else(|| Error::MissingKey {
                file: self.store.label.clone(),
                key: key.clone(),
            })?;
        let t = self.store.files[i].load(&key, &self.device)?;
        Ok(t.to_dtype(self.dtype)?)
    }
}
