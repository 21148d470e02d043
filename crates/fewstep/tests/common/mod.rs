//! Helpers shared by the model parity tests: fixture paths, loading, relative error.
#![allow(dead_code)]

pub mod training;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fewstep::image::tensor_to_float_images;
use fewstep::pipeline::StableDiffusion;
use fewstep::schedulers::SchedulerKind;
use fewstep::weights::parts::ModelParts;
use fewstep::weights::Weights;

/// The prompt of the fixtures' `lcm4` images.
pub const PROMPT: &str = "a red circle on a blue background";

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

/// `max|a − b|` of two f32 tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fixtures' `lcm4` image of a model (LCM, 4 steps, guidance 1, seed 0, 64×64) as NHWC f32 in [0, 1].
pub fn lcm4(parts: &ModelParts) -> Tensor {
    let model = StableDiffusion::from_parts(parts, &Device::Cpu).unwrap();
    let mut req = model.request(PROMPT, 0);
    req.scheduler = SchedulerKind::Lcm;
    req.steps = 4;
    req.guidance = 1.0;
    req.width = 64;
    req.height = 64;
    let out = model.generate(&req, &mut |_, _| {}).unwrap();
    let img: Vec<f32> = tensor_to_float_images(&out.decoded).unwrap().concat();
    Tensor::from_vec(img, (1, 64, 64, 3), &Device::Cpu).unwrap()
}

/// (mean, max) of |a − b| in 1/255 units.
pub fn image_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let d = ((a - b).unwrap().abs().unwrap() * 255.0).unwrap();
    let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let max = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    (mean, max)
}

/// Asserts the foundation's image tolerance (NHWC in [0, 1]): mean |diff| ≤ 0.5/255, max ≤ 3/255.
pub fn assert_image_close(name: &str, ours: &Tensor, want: &Tensor) {
    let (mean, max) = image_diff(ours, want);
    println!("{name}: mean |diff| {mean:.4}/255, max {max:.4}/255");
    assert!(mean <= 0.5, "{name}: mean |diff| {mean}/255 > 0.5/255");
    assert!(max <= 3.0, "{name}: max |diff| {max}/255 > 3/255");
}

/// The sampler of a diffusers scheduler class name (`LCMScheduler`, …).
pub fn scheduler_kind(class: &str) -> SchedulerKind {
    [
        SchedulerKind::Lcm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmSolverPlusPlus,
    ]
    .into_iter()
    .find(|k| k.class_name() == class)
    .unwrap_or_else(|| panic!("unknown scheduler {class}"))
}

/// Case `name` of a fixture JSON of the form `{"cases": [{"name": …, …}, …]}` (`rel` under
/// `tests/fixtures`).
pub fn fixture_case(rel: &str, name: &str) -> serde_json::Value {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap();
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {rel}"))
        .clone()
}
