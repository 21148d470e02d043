//! The CLIP text encoder against transformers 5.23's `CLIPTextModel` on the tiny fixture models
//! (`reference/components.safetensors`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fewstep::config::{load_json, ClipTextConfig};
use fewstep::models::clip::ClipTextModel;
use fewstep::weights::Weights;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/components.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// `max|a − b| / max|b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn load(model: &str, file: &str, dtype: DType) -> ClipTextModel {
    let dir = fixtures().join(model).join("text_encoder");
    let cfg: ClipTextConfig = load_json(&dir.join("config.json")).unwrap();
    let w = Weights::from_files(&[dir.join(file)], dtype, &Device::Cpu).unwrap();
    ClipTextModel::new(&cfg, &w).unwrap()
}

fn check(model: &str, file: &str) {
    let r = reference();
    let m = load(model, file, DType::F32);
    let ids = r[&format!("{model}.text.input_ids")]
        .to_dtype(DType::U32)
        .unwrap();
    let out = m.forward(&ids).unwrap();
    let e_last = rel_err(
        &out.last_hidden_state,
        &r[&format!("{model}.text.last_hidden_state")],
    );
    let e_pool = rel_err(&out.pooled, &r[&format!("{model}.text.pooler_output")]);
    let e_pen = rel_err(
        out.penultimate.as_ref().unwrap(),
        &r[&format!("{model}.text.hidden_states1")],
    );
    let e_enc = rel_err(
        &m.encode(&ids, None).unwrap(),
        &r[&format!("{model}.text.last_hidden_state")],
    );
    let e_skip = rel_err(
        &m.encode(&ids, Some(1)).unwrap(),
        &r[&format!("{model}.text.clip_skip1")],
    );
    eprintln!(
        "{model}: last_hidden_state {e_last:.2e}, pooled {e_pool:.2e}, penultimate {e_pen:.2e}, \
         encode(None) {e_enc:.2e}, clip_skip=1 {e_skip:.2e}"
    );
    for (name, e) in [
        ("last_hidden_state", e_last),
        ("pooled", e_pool),
        ("penultimate", e_pen),
        ("encode(None)", e_enc),
        ("clip_skip=1", e_skip),
    ] {
        assert!(e < 1e-4, "{model} {name}: relative error {e}");
    }
    // clip_skip = 2 on a 2-layer model reads the embeddings' output.
    let e0 = rel_err(
        &m.encode(&ids, Some(2)).unwrap(),
        &m.encode(&ids, Some(2)).unwrap(),
    );
    assert_eq!(e0, 0.0);
    assert!(m.encode(&ids, Some(3)).is_err());
    let bad = Tensor::new(&[[49406u32, 49408, 49407]], &Device::Cpu).unwrap();
    assert!(m.forward(&bad).is_err());
}

#[test]
fn tiny_sd_text_encoder_matches_transformers() {
    // quick_gelu, keys under `text_model.`, fp32 file.
    check("tiny-sd", "model.safetensors");
}

#[test]
fn tiny_lcm_text_encoder_matches_transformers() {
    // gelu (erf), keys without prefix, fp16 variant file loaded as f32.
    check("tiny-lcm", "model.fp16.safetensors");
}

#[test]
fn half_precision_runs() {
    let r = reference();
    let ids = r["tiny-sd.text.input_ids"].to_dtype(DType::U32).unwrap();
    let want = &r["tiny-sd.text.last_hidden_state"];
    for dtype in [DType::F16, DType::BF16] {
        let m = load("tiny-sd", "model.safetensors", dtype);
        let out = m.forward(&ids).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        let e = rel_err(&out.last_hidden_state, want);
        eprintln!("tiny-sd {dtype:?}: last_hidden_state relative error {e:.2e}");
        assert!(e < 5e-2, "{dtype:?}: {e}");
    }
}

#[test]
fn wrong_shape_names_the_key() {
    let dir = fixtures().join("tiny-sd/text_encoder");
    let mut cfg: ClipTextConfig = load_json(&dir.join("config.json")).unwrap();
    cfg.intermediate_size += 1;
    let w =
        Weights::from_files(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    let err = ClipTextModel::new(&cfg, &w).unwrap_err().to_string();
    assert!(
        err.contains("text_model.encoder.layers.0.mlp.fc1.weight"),
        "{err}"
    );
}
