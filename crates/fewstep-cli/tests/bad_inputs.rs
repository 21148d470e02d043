//! Bad inputs give a one-line error naming the file, key or field, a non-zero exit, and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::copy_dir;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-sd");

/// A copy of the model folder `src` in a temporary folder, to be damaged by a test.
fn copy_of(src: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    copy_dir(Path::new(src), &dst);
    (tmp, dst)
}

fn tiny_copy() -> (tempfile::TempDir, PathBuf) {
    copy_of(TINY)
}

/// Runs `fewstep generate` with `args` on `model`, expects failure, and returns the error line.
fn fails(model: &Path, args: &[&str]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let res = Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["generate", "a red circle", "--seed", "1", "--model"])
        .arg(model)
        .args(args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).trim().to_string();
    assert!(!res.status.success(), "expected failure, got success");
    assert!(
        !out.exists(),
        "an output file was written despite the error"
    );
    assert_eq!(
        std::fs::read_dir(out_dir.path()).unwrap().count(),
        0,
        "something was left in the output folder"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    lines[0].to_string()
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_t, m) = tiny_copy();
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&m, &[]);
    assert!(
        e.contains("unet/diffusion_pytorch_model.safetensors"),
        "{e}"
    );
    assert!(e.contains("run past"), "{e}");
}

#[test]
fn header_offsets_past_the_end() {
    let (_t, m) = tiny_copy();
    let f = m.join("vae/diffusion_pytorch_model.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&f, bytes).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("vae/diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("`w`") && e.contains("16000"), "{e}");
}

#[test]
fn header_length_past_the_end() {
    let (_t, m) = tiny_copy();
    let f = m.join("text_encoder/model.safetensors");
    std::fs::write(&f, 1_000_000u64.to_le_bytes()).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("text_encoder/model.safetensors"), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn config_with_a_wrong_type_names_the_field() {
    let (_t, m) = tiny_copy();
    let f = m.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!(["wide", 64, 64]);
    std::fs::write(&f, cfg.to_string()).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("unet/config.json"), "{e}");
    assert!(e.contains("block_out_channels"), "{e}");
}

#[test]
fn missing_unet_folder() {
    let (_t, m) = tiny_copy();
    std::fs::remove_dir_all(m.join("unet")).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("`unet/`"), "{e}");
}

#[test]
fn weight_of_the_wrong_shape_names_the_key() {
    let (_t, m) = tiny_copy();
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    let w = tensors.get("conv_in.weight").unwrap();
    let mut dims = w.dims().to_vec();
    dims[0] += 1;
    tensors.insert(
        "conv_in.weight".into(),
        Tensor::zeros(dims.as_slice(), w.dtype(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &f).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("conv_in.weight"), "{e}");
    assert!(e.contains("expected"), "{e}");
}

#[test]
fn size_not_divisible_by_8() {
    let e = fails(Path::new(TINY), &["--width", "60"]);
    assert!(e.contains("width") && e.contains("60"), "{e}");
    let e = fails(Path::new(TINY), &["--height", "65"]);
    assert!(e.contains("height") && e.contains("65"), "{e}");
}

#[test]
fn zero_steps_and_too_many_lcm_steps() {
    let e = fails(Path::new(TINY), &["--steps", "0"]);
    assert!(e.contains("steps"), "{e}");
    let e = fails(Path::new(TINY), &["--steps", "51"]);
    assert!(e.contains("steps") && e.contains("51"), "{e}");
}

#[test]
fn nan_guidance() {
    let e = fails(Path::new(TINY), &["--guidance", "NaN"]);
    assert!(e.contains("guidance") && e.contains("NaN"), "{e}");
}

#[test]
fn pickle_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    let e = fails(&ckpt, &[]);
    assert!(e.contains("model.ckpt") && e.contains("pickle"), "{e}");

    let (_t, m) = tiny_copy();
    let dir = m.join("unet");
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("diffusion_pytorch_model.bin"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn unknown_model_path() {
    let e = fails(Path::new("/no/such/model/folder"), &[]);
    assert!(e.contains("/no/such/model/folder"), "{e}");
}

const TINY_XL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny-sdxl"
);

fn xl_copy() -> (tempfile::TempDir, PathBuf) {
    copy_of(TINY_XL)
}

#[test]
fn sd15_weights_in_an_sdxl_folder_name_the_family() {
    let (_t, m) = xl_copy();
    std::fs::remove_dir_all(m.join("unet")).unwrap();
    copy_dir(&Path::new(TINY).join("unet"), &m.join("unet"));
    let e = fails(&m, &[]);
    assert!(e.contains("StableDiffusionXLPipeline"), "{e}");
    assert!(e.contains("Stable Diffusion 1.x"), "{e}");
}

#[test]
fn sdxl_without_its_second_text_encoder() {
    let (_t, m) = xl_copy();
    std::fs::remove_dir_all(m.join("text_encoder_2")).unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("`text_encoder_2/`"), "{e}");
}

#[test]
fn sdxl_size_not_divisible_by_8() {
    let e = fails(Path::new(TINY_XL), &["--width", "60"]);
    assert!(
        e.contains("width") && e.contains("60") && e.contains('8'),
        "{e}"
    );
}

#[test]
fn sdxl_unet_with_an_sd_text_encoder_width() {
    let (_t, m) = xl_copy();
    let cfg = m.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"cross_attention_dim\": 40", "\"cross_attention_dim\": 16"),
    )
    .unwrap();
    let e = fails(&m, &[]);
    assert!(e.contains("cross_attention_dim") && e.contains("40"), "{e}");
}
