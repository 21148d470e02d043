//! TAESD on real trained weights: TAEF2 (32 latent channels, mid-block GroupNorm branch) reproduces the
//! published PyTorch reference round trip of `../shared/data/astronaut.png` (`../shared/weights/README.md`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fewstep::models::taesd::AutoencoderTiny;
use fewstep::weights::Weights;

const TAEF2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/weights/taef2");

fn weights(name: &str) -> Weights {
    Weights::from_files(&[Path::new(TAEF2).join(name)], DType::F32, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
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
