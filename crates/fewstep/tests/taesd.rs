//! TAESD on real trained weights: TAEF2 (32 latent channels, mid-block GroupNorm branch) reproduces the
//! published PyTorch reference round trip of `../shared/data/astronaut.png` (`../shared/weights/README.md`).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fewstep::models::taesd::AutoencoderTiny;
use fewstep::weights::Weights;

use common::max_abs_diff;

const TAEF2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/weights/taef2");

fn weights(name: &str) -> Weights {
    Weights::from_files(&[Path::new(TAEF2).join(name)], DType::F32, &Device::Cpu).unwrap()
}

/// Peak signal-to-noise ratio of images in [0, 1]: `10·log₁₀(1 / mean((a − b)²))`.
fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse: f32 = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    10.0 * (1.0 / mse as f64).log10()
}

#[test]
fn taef2_reproduces_the_reference_round_trip() {
    let reference = candle_core::safetensors::load(
        Path::new(TAEF2).join("reference_astronaut256.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let taesd = AutoencoderTiny::from_original(
        Some(&weights("taef2_encoder.safetensors")),
        Some(&weights("taef2_decoder.safetensors")),
    )
    .unwrap();
    let encoder = taesd.encoder.as_ref().unwrap();
    let decoder = taesd.decoder.as_ref().unwrap();
    assert_eq!(encoder.latent_channels(), 32);
    assert_eq!(decoder.latent_channels(), 32);

    let latents = encoder.forward(&reference["image_in"]).unwrap();
    let d = max_abs_diff(&latents, &reference["latents"]);
    assert!(d <= 1e-3, "latents differ by {d}");

    let image = decoder
        .forward(&reference["latents"])
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let d = max_abs_diff(&image, &reference["image_out"]);
    assert!(d <= 1e-3, "decoded image differs by {d}");

    let round_trip = decoder
        .forward(&latents)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let p = psnr(&round_trip, &reference["image_in"]);
    println!("TAEF2 round-trip PSNR {p:.2} dB");
    assert!(
        (p - 29.40).abs() < 0.01,
        "PSNR {p:.3} dB, reference 29.40 dB"
    );
}

#[test]
fn a_taesd_file_of_the_wrong_side_is_an_error() {
    // The decoder file given as the encoder: its first convolution takes 32 channels, not 3.
    let e = AutoencoderTiny::from_original(Some(&weights("taef2_decoder.safetensors")), None)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("0.weight"), "{e}");
}

#[test]
fn diffusers_layout_matches_autoencoder_tiny() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let reference =
        candle_core::safetensors::load(fixtures.join("reference/taesd.safetensors"), &Device::Cpu)
            .unwrap();
    let w = Weights::from_files(
        &[fixtures.join("taesd-tiny/diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let taesd = AutoencoderTiny::from_diffusers(&w).unwrap();
    // diffusers wraps the original's [0, 1] images as [-1, 1].
    let image01 = ((&reference["image"] + 1.0).unwrap() / 2.0).unwrap();
    let latents = taesd.encoder.as_ref().unwrap().forward(&image01).unwrap();
    let rel = max_abs_diff(&latents, &reference["latents"])
        / reference["latents"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(rel < 1e-4, "latents relative error {rel}");
    let decoded = taesd
        .decoder
        .as_ref()
        .unwrap()
        .forward(&reference["z"])
        .unwrap();
    let decoded = ((decoded * 2.0).unwrap() - 1.0).unwrap();
    let rel = max_abs_diff(&decoded, &reference["decoded"])
        / reference["decoded"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(rel < 1e-4, "decoded relative error {rel}");
}

/// `--vae` with a TAESD file: the pipeline's latents are those of the model's own VAE run (decoding is
/// the last step), and its picture is `2·taesd_decoder(latents) − 1`; img2img encodes with TAESD's
/// encoder. An original encoder file alone is refused, naming what to give instead.
#[test]
fn taesd_decodes_in_the_pipeline() {
    use fewstep::pipeline::StableDiffusion;
    use fewstep::weights::parts::ModelParts;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let taesd_file = fixtures.join("taesd-tiny/diffusion_pytorch_model.safetensors");
    let model_dir = fixtures.join("tiny-sd");
    let open = || ModelParts::open(model_dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let kl = StableDiffusion::from_parts(&open(), &Device::Cpu).unwrap();
    let tiny =
        StableDiffusion::from_parts(&open().with_vae_file(&taesd_file).unwrap(), &Device::Cpu)
            .unwrap();
    let req = kl.request("a red circle", 5);
    let a = kl.generate(&req, &mut |_, _| {}).unwrap();
    let b = tiny.generate(&req, &mut |_, _| {}).unwrap();
    assert!(max_abs_diff(&a.latents, &b.latents) < 1e-6);
    let taesd = AutoencoderTiny::from_diffusers(
        &Weights::from_files(&[&taesd_file], DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let want = ((taesd.decoder.as_ref().unwrap().forward(&b.latents).unwrap() * 2.0).unwrap()
        - 1.0)
        .unwrap();
    assert!(max_abs_diff(&b.decoded, &want) < 1e-5);
    assert!(
        max_abs_diff(&a.decoded, &b.decoded) > 1e-3,
        "TAESD was not used"
    );

    let mut img2img = req.clone();
    img2img.init_image = Some(fewstep::image::tensor_to_images(&a.decoded).unwrap()[0].clone());
    img2img.strength = 0.5;
    let c = tiny.generate(&img2img, &mut |_, _| {}).unwrap();
    assert!(c
        .decoded
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));

    let dir = tempfile::tempdir().unwrap();
    let encoder_only = dir.path().join("taesd_encoder.safetensors");
    let t = Tensor::zeros((16, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("0.weight".to_string(), t)]),
        &encoder_only,
    )
    .unwrap();
    let err =
        StableDiffusion::from_parts(&open().with_vae_file(&encoder_only).unwrap(), &Device::Cpu)
            .err()
            .unwrap();
    assert!(err.to_string().contains("taesd_decoder"), "{err}");
}
