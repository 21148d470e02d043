//! Helpers shared by the model parity tests: fixture paths, loading, relative error.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fewstep::weights::Weights;

/// `tests/fixtures/…` at the workspace root.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// The reference tensors of `components.safetensors`.
pub fn components() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference/components.safetensors"), &Device::Cpu)
        .expect("components.safetensors")
}

/// The first `.safetensors` file of a model component folder (`tiny-lcm` has only fp16 variants).
pub fn weights_file(model: &str, component: &str) -> PathBuf {
    let dir = fixture(&format!("{model}/{component}"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files.into_iter().next().expect("a .safetensors file")
}

/// The component's weights in f32 on the CPU.
pub fn weights(model: &str, component: &str) -> Weights {
    Weights::from_files(&[weights_file(model, component)], DType::F32, &Device::Cpu).unwrap()
}

/// `max|a − b| / max|b|`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let den = b.abs().unwrap().max_all().unwrap();
    num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap()
}
