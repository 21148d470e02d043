//! `fewstep generate` end to end: the PNG it writes is diffusers' picture for the same settings, and it
//! carries the parameters that reproduce it.

mod common;

use std::process::Command;

use candle_core::Device;
use common::FIXTURES;
use fewstep::image::{read_parameters, read_png};

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

/// `--vae` with the model's own VAE file (diffusers layout, config.json beside it) gives the same picture;
/// `--model` with a single file of an unsupported family names the family.
#[test]
fn vae_flag_and_single_file_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_fewstep"))
            .args(["generate", "--prompt", "a red circle on a blue background"])
            .args(["--seed", "0"])
            .args(extra)
            .arg("--output")
            .arg(out)
            .output()
            .unwrap()
    };
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let vae = format!("{FIXTURES}/tiny-sd/vae/diffusion_pytorch_model.safetensors");
    let tiny = format!("{FIXTURES}/tiny-sd");
    let model = ["--model", tiny.as_str()];
    let with_vae = ["--model", tiny.as_str(), "--vae", vae.as_str()];
    for (extra, out) in [(&model[..], &a), (&with_vae[..], &b)] {
        let res = run(extra, out);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    assert_eq!(read_png(&a).unwrap().data, read_png(&b).unwrap().data);

    let xl = dir.path().join("xl.safetensors");
    let z = candle_core::Tensor::zeros((2, 2), candle_core::DType::F16, &Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([
        (
            "conditioner.embedders.0.model.positional_embedding".to_string(),
            z.clone(),
        ),
        (
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            z,
        ),
    ]);
    candle_core::safetensors::save(&tensors, &xl).unwrap();
    let res = run(
        &["--model", xl.to_str().unwrap()],
        &dir.path().join("c.png"),
    );
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("SDXL refiner") && err.contains("xl.safetensors"),
        "{err}"
    );
}

#[test]
fn generate_with_loras_and_prompt_tags() {
    let dir = tempfile::tempdir().unwrap();
    let lora_dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora");
    let out = dir.path().join("lora.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args([
            "generate",
            "a red circle <lora:style:0.8>",
            "--model",
            &format!("{FIXTURES}/tiny-sd"),
            "--seed",
            "0",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .arg("--lora")
        .arg(format!(
            "{}:1.0",
            lora_dir.join("kohya_diffusers.safetensors").display()
        ))
        .arg("--lora-dir")
        .arg(&lora_dir)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("LoRA: style:0.8 kohya_diffusers:1"),
        "parameters lack the LoRAs"
    );

    {
        let mode = "runtime";
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
            .args([
                "generate",
                "a red circle",
                "--model",
                &format!("{FIXTURES}/tiny-sd"),
                "--seed",
                "0",
                "--width",
                "64",
                "--height",
                "64",
                "--lora-mode",
                mode,
            ])
            .arg("--lora")
            .arg(lora_dir.join("peft.safetensors"))
            .arg("-o")
            .arg(dir.path().join("rt.png"))
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    }

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["generate", "a cat <lora:missing:1>", "--lora-dir"])
        .arg(&lora_dir)
        .arg("-o")
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("missing.safetensors") && err.lines().count() == 1,
        "{err}"
    );
}

/// `--vae` takes a TAESD file (diffusers' AutoencoderTiny layout, detected from its keys): the picture is
/// written at the model's size and differs from the model's own VAE's for the same seed.
#[test]
fn vae_flag_takes_a_taesd_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("{FIXTURES}/tiny-sd");
    let taesd = format!("{FIXTURES}/taesd-tiny/diffusion_pytorch_model.safetensors");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["generate", "a red circle", "--model", &model, "--seed", "2"];
        args.extend_from_slice(extra);
        args.extend(["-o", out.to_str().unwrap()]);
        common::ok(common::fewstep(&args));
        read_png(&out).unwrap()
    };
    let kl = run("kl.png", &[]);
    let tiny = run("taesd.png", &["--vae", &taesd]);
    assert_eq!((tiny.width, tiny.height), (kl.width, kl.height));
    let max = common::max_image_difference(&kl, &tiny);
    assert!(max > 2, "TAESD gave the KL VAE's picture");
}

/// bf16 runs on the CPU (weights stored in bf16, convolutions and matrix products accumulated in f32):
/// the picture is the f32 one up to bf16's 8-bit mantissa — a few levels of 255, not another picture.
#[test]
fn bf16_on_cpu_gives_the_f32_picture_within_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("{FIXTURES}/tiny-sd");
    let run = |dtype: &str| {
        let out = dir.path().join(format!("{dtype}.png"));
        common::ok(common::fewstep(&[
            "generate",
            "a red circle on a blue background",
            "--model",
            &model,
            "--seed",
            "0",
            "--dtype",
            dtype,
            "-o",
            out.to_str().unwrap(),
        ]));
        read_png(&out).unwrap()
    };
    let (full, half) = (run("f32"), run("bf16"));
    let max = common::max_image_difference(&full, &half);
    let mean = full
        .data
        .iter()
        .zip(&half.data)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / full.data.len() as f64;
    assert!(
        max <= 16 && mean < 2.0,
        "bf16 vs f32: max {max}, mean {mean:.2} of 255"
    );
    assert!(
        max > 0,
        "bf16 gave the f32 picture bit for bit: was it run in f32?"
    );
}

/// `--vae-tiling` decodes tile by tile as diffusers' `enable_vae_tiling()`: a picture of one tile (the tiny
/// VAE's tile is 64 pixels) is the untiled picture exactly; a 128-pixel picture is blended from 3×3 tiles
/// and differs (the library test checks those pixels against diffusers').
#[test]
fn vae_tiling_engages_above_one_tile() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("{FIXTURES}/tiny-sd");
    let run = |size: &str, tiling: bool| {
        let out = dir.path().join(format!("{size}-{tiling}.png"));
        let mut args = vec![
            "generate",
            "a red circle",
            "--model",
            &model,
            "--seed",
            "3",
            "--width",
            size,
            "--height",
            size,
        ];
        if tiling {
            args.push("--vae-tiling");
        }
        args.extend(["-o", out.to_str().unwrap()]);
        common::ok(common::fewstep(&args));
        read_png(&out).unwrap()
    };
    assert_eq!(
        common::max_image_difference(&run("64", false), &run("64", true)),
        0
    );
    assert!(common::max_image_difference(&run("128", false), &run("128", true)) > 0);
}

/// The 8-bit picture at `path` against diffusers' NHWC float image `key` of `tests/fixtures/{file}`: the
/// largest difference in 1/255.
fn max_diff_to_reference(path: &std::path::Path, file: &str, key: &str) -> f32 {
    let refs = candle_core::safetensors::load(format!("{FIXTURES}/{file}"), &Device::Cpu).unwrap();
    let img = read_png(path).unwrap();
    let want: Vec<f32> = refs[key].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(img.data.len(), want.len());
    img.data
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .fold(0f32, f32::max)
}

/// `fewstep generate` on tiny-sdxl with `args`, into `dir/xl.png`: the picture's path and stderr.
fn generate_tiny_sdxl(dir: &std::path::Path, args: &[&str]) -> (std::path::PathBuf, String) {
    let out = dir.join("xl.png");
    let res = Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["generate", "a red circle on a blue background"])
        .args(["--model", &format!("{FIXTURES}/tiny-sdxl")])
        .args(args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{stderr}");
    (out, stderr)
}

#[test]
fn sdxl_with_both_encoders_lora_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let lora = format!("{FIXTURES}/sdxl/lora_xl.safetensors");
    let (out, stderr) = generate_tiny_sdxl(dir.path(), &["--seed", "0", "--lora", &lora]);
    assert!(
        stderr.contains("257 UNet and 12 text-encoder and 18 second-text-encoder modules"),
        "{stderr}"
    );
    let max = max_diff_to_reference(&out, "sdxl/lora_reference.safetensors", "lora_xl.fused");
    assert!(max <= 1.0, "max |diff| {max}/255 against diffusers");
}

#[test]
fn sdxl_euler_with_default_guidance_and_zero_negative() {
    // SDXL's default guidance (5) and no negative prompt: diffusers' force_zeros_for_empty_prompt picture.
    let dir = tempfile::tempdir().unwrap();
    let args = ["--seed", "4", "--scheduler", "euler", "--steps", "6"];
    let (out, _) = generate_tiny_sdxl(dir.path(), &args);
    let max = max_diff_to_reference(&out, "sdxl/pipelines.safetensors", "sdxl_euler_zeros");
    assert!(max <= 1.0, "max |diff| {max}/255 against diffusers");
    let params = read_parameters(&out).unwrap().unwrap();
    assert!(params.contains("CFG scale: 5"), "{params}");
}
