//! `fewstep generate` end to end: the PNG it writes is diffusers' picture for the same settings, and it
//! carries the parameters that reproduce it.

use std::process::Command;

use candle_core::Device;
use fewstep::image::{read_parameters, read_png};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

#[test]
fn cli_reproduces_diffusers_lcm_image_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lcm4.png");
    let res = Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["generate", "--prompt", "a red circle on a blue background"])
        .args(["--model", &format!("{FIXTURES}/tiny-sd"), "--seed", "0"])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    let img = read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    let refs = candle_core::safetensors::load(
        format!("{FIXTURES}/reference/pipelines.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want: Vec<f32> = refs["lcm4"].flatten_all().unwrap().to_vec1().unwrap();
    let max = img
        .data
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1.0, "max |diff| {max}/255 against diffusers");

    let params = read_parameters(&out).unwrap().expect("a parameters chunk");
    assert!(
        params.starts_with("a red circle on a blue background\n"),
        "{params}"
    );
    for part in [
        "Steps: 4",
        "Sampler: lcm",
        "CFG scale: 1",
        "Seed: 0",
        "Size: 64x64",
    ] {
        assert!(params.contains(part), "{part} missing from {params}");
    }
}

#[test]
fn batch_writes_numbered_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pic.png");
    let res = Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["generate", "a star", "--num-images", "2", "--seed", "7"])
        .args(["--model", &format!("{FIXTURES}/tiny-sd")])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let a = read_png(&dir.path().join("pic-0.png")).unwrap();
    let b = read_png(&dir.path().join("pic-1.png")).unwrap();
    assert_ne!(a.data, b.data, "the two images of a batch differ");
    assert!(!out.exists());
}
