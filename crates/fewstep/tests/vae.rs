//! AutoencoderKL parity with diffusers 0.42.1 on the tiny fixtures.

mod common;

use candle_core::{DType, Device};
use common::{components, fixture, rel_err, weights, weights_file};
use fewstep::config::{load_json, AutoencoderKLConfig};
use fewstep::models::vae::{AutoencoderKL, VaeTiling};
use fewstep::weights::Weights;

const TOL: f64 = 1e-4;

fn load(model: &str) -> AutoencoderKL {
    let cfg: AutoencoderKLConfig =
        load_json(&fixture(&format!("{model}/vae/config.json"))).unwrap();
    AutoencoderKL::new(&cfg, &weights(model, "vae")).unwrap()
}

fn check_vae(model: &str) {
    let refs = components();
    let vae = load(model);
    let post = vae.encode(&refs[&format!("{model}.vae.image")]).unwrap();
    for (name, ours) in [("mean", &post.mean), ("std", &post.std)] {
        let err = rel_err(ours, &refs[&format!("{model}.vae.{name}")]);
        println!("{model} vae {name}: rel err {err:.3e}");
        assert!(err < TOL, "{model} {name}: {err}");
    }
    let dec = vae.decode(&refs[&format!("{model}.vae.latents")]).unwrap();
    let err = rel_err(&dec, &refs[&format!("{model}.vae.decoded")]);
    println!("{model} vae decoded: rel err {err:.3e}");
    assert!(err < TOL, "{model} decoded: {err}");
}

#[test]
fn tiny_sd_vae_matches_diffusers() {
    check_vae("tiny-sd");
}

#[test]
fn tiny_lcm_vae_matches_diffusers() {
    check_vae("tiny-lcm");
}

#[test]
fn vae_runs_in_f16_and_bf16() {
    let refs = components();
    let cfg: AutoencoderKLConfig = load_json(&fixture("tiny-sd/vae/config.json")).unwrap();
    // bf16 on a CPU with AMX or AVX-512 BF16 runs fewstep's bf16 kernels, elsewhere candle's.
    for dtype in [DType::F16, DType::BF16] {
        let w =
            Weights::from_files(&[weights_file("tiny-sd", "vae")], dtype, &Device::Cpu).unwrap();
        let vae = AutoencoderKL::new(&cfg, &w).unwrap();
        let dec = vae.decode(&refs["tiny-sd.vae.latents"]).unwrap();
        assert_eq!(dec.dtype(), dtype);
        let err = rel_err(&dec, &refs["tiny-sd.vae.decoded"]);
        println!("tiny-sd vae decode in {dtype:?}: rel err {err:.3e}");
        assert!(err < 0.05, "{dtype:?}: {err}");
        let post = vae.encode(&refs["tiny-sd.vae.image"]).unwrap();
        let err = rel_err(&post.mean, &refs["tiny-sd.vae.mean"]);
        println!("tiny-sd vae mean in {dtype:?}: rel err {err:.3e}");
        assert!(err < 0.05, "{dtype:?}: {err}");
    }
}

#[test]
fn missing_vae_key_is_named() {
    let cfg: AutoencoderKLConfig = load_json(&fixture("tiny-sd/vae/config.json")).unwrap();
    let mut bad = cfg.clone();
    bad.up_block_types[0] = "AttnUpDecoderBlock2D".into();
    let err = AutoencoderKL::new(&bad, &weights("tiny-sd", "vae"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("up_block_types[0]"), "{err}");
    // A config asking for more layers than the file holds names the first absent tensor.
    let mut more = cfg;
    more.layers_per_block += 1;
    let err = AutoencoderKL::new(&more, &weights("tiny-sd", "vae"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("encoder.down_blocks.0.resnets.1"), "{err}");
}

/// Tiled decoding equals diffusers' `enable_tiling()` decode (tools/reference/make_vae_tiling_fixture.py):
/// 3×2 tiles, the last row shorter than the blend, on latents whose whole decode differs visibly.
#[test]
fn tiled_decode_matches_diffusers() {
    let refs =
        candle_core::safetensors::load(fixture("reference/vae_tiling.safetensors"), &Device::Cpu)
            .unwrap();
    let vae = load("tiny-sd");
    let tiling = VaeTiling::for_config(vae.config());
    assert_eq!((tiling.latent_tile, tiling.sample_tile), (8, 64));
    let tiled = vae.decode_tiled(&refs["z"], &tiling).unwrap();
    let err = rel_err(&tiled, &refs["tiled"]);
    assert!(err < TOL, "tiled: {err}");
    assert!(rel_err(&refs["whole"], &refs["tiled"]) > 100.0 * TOL);
    // Latents of one tile are decoded whole.
    let z = refs["z"].narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap();
    let one = vae.decode_tiled(&z, &tiling).unwrap();
    assert_eq!(rel_err(&one, &vae.decode(&z).unwrap()), 0.0);
}
