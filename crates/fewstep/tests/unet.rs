//! UNet parity with diffusers 0.42.1 on the tiny fixtures, and weight-error reporting.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{components, fixture, rel_err, weights, weights_file};
use fewstep::config::{load_json, UNet2DConditionConfig};
use fewstep::models::unet::{guidance_scale_embedding, UNet2DConditionModel};
use fewstep::weights::Weights;
use fewstep::Error;

const TOL: f64 = 1e-4;

fn load(model: &str) -> UNet2DConditionModel {
    let cfg: UNet2DConditionConfig =
        load_json(&fixture(&format!("{model}/unet/config.json"))).unwrap();
    UNet2DConditionModel::new(&cfg, &weights(model, "unet")).unwrap()
}

fn check_unet(model: &str) {
    let refs = components();
    let unet = load(model);
    let sample = &refs[&format!("{model}.unet.sample")];
    let ctx = &refs[&format!("{model}.unet.encoder_hidden_states")];
    let cond = refs.get(&format!("{model}.unet.timestep_cond"));
    assert_eq!(cond.is_some(), unet.config().time_cond_proj_dim.is_some());
    for (t, key) in [
        (999.0, "out_t999"),
        (1.0, "out_t1"),
        (856.2857055664062, "out_t856f"),
    ] {
        let out = unet.forward(sample, t, ctx, cond, None).unwrap();
        let err = rel_err(&out, &refs[&format!("{model}.unet.{key}")]);
        println!("{model} unet {key}: rel err {err:.3e}");
        assert!(err < TOL, "{model} {key}: rel err {err}");
    }
}

#[test]
fn tiny_sd_unet_matches_diffusers() {
    check_unet("tiny-sd");
}

#[test]
fn tiny_lcm_unet_matches_diffusers() {
    check_unet("tiny-lcm");
}

#[test]
fn lcm_unet_with_our_guidance_embedding() {
    let refs = components();
    let unet = load("tiny-lcm");
    let sample = &refs["tiny-lcm.unet.sample"];
    let ctx = &refs["tiny-lcm.unet.encoder_hidden_states"];
    let cond = guidance_scale_embedding(&[7.5, 7.5], 32, DType::F32, &Device::Cpu).unwrap();
    let out = unet.forward(sample, 999.0, ctx, Some(&cond), None).unwrap();
    let err = rel_err(&out, &refs["tiny-lcm.unet.out_t999"]);
    println!("tiny-lcm unet t999 with our w-embedding: rel err {err:.3e}");
    assert!(err < TOL);
}

#[test]
fn guidance_embedding_matches_diffusers() {
    let refs = components();
    let w: Vec<f64> = refs["guidance_embedding.w"]
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    // sin/cos of f32 arguments up to 7500 amplify a one-ulp difference in a frequency to ~5e-4: torch's
    // f32 `exp` (MKL) is not correctly rounded for one of the 128 frequencies of dim 256, ours is.
    for (dim, tol) in [(32, TOL), (256, 1e-3)] {
        let ours = guidance_scale_embedding(&w, dim, DType::F32, &Device::Cpu).unwrap();
        let err = rel_err(&ours, &refs[&format!("guidance_embedding.dim{dim}")]);
        println!("guidance embedding dim {dim}: rel err {err:.3e}");
        assert!(err < tol, "dim {dim}: {err}");
    }
    let odd = guidance_scale_embedding(&w, 33, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(odd.dims(), &[4, 33]);
    let last = odd
        .narrow(1, 32, 1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(last.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn f16_and_bf16_run() {
    let refs = components();
    let cfg: UNet2DConditionConfig = load_json(&fixture("tiny-lcm/unet/config.json")).unwrap();
    // bf16 on a CPU with AMX or AVX-512 BF16 runs fewstep's bf16 kernels, elsewhere candle's.
    for dtype in [DType::F16, DType::BF16] {
        let w =
            Weights::from_files(&[weights_file("tiny-lcm", "unet")], dtype, &Device::Cpu).unwrap();
        let unet = UNet2DConditionModel::new(&cfg, &w).unwrap();
        let out = unet
            .forward(
                &refs["tiny-lcm.unet.sample"],
                999.0,
                &refs["tiny-lcm.unet.encoder_hidden_states"],
                Some(&refs["tiny-lcm.unet.timestep_cond"]),
                None,
            )
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let err = rel_err(&out, &refs["tiny-lcm.unet.out_t999"]);
        println!("tiny-lcm unet t999 in {dtype:?}: rel err {err:.3e}");
        assert!(err < 0.05, "{dtype:?}: {err}");
    }
}

/// Copies the tiny-sd UNet weights into a temp file with `key` reshaped or removed.
fn altered_weights(key: &str, remove: bool) -> (tempdir::Dir, Weights) {
    let all =
        candle_core::safetensors::load(weights_file("tiny-sd", "unet"), &Device::Cpu).unwrap();
    let mut all = all;
    if remove {
        all.remove(key).unwrap();
    } else {
        let t = &all[key];
        let n = t.elem_count();
        all.insert(
            key.to_string(),
            Tensor::zeros(n + 1, t.dtype(), &Device::Cpu).unwrap(),
        );
    }
    let dir = tempdir::Dir::new();
    let path = dir.0.join("unet.safetensors");
    candle_core::safetensors::save(&all, &path).unwrap();
    let w = Weights::from_files(&[path], DType::F32, &Device::Cpu).unwrap();
    (dir, w)
}

mod tempdir {
    /// A uniquely named directory under the system temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "fewstep-unet-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn wrong_shape_names_the_key() {
    let key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let (_dir, w) = altered_weights(key, false);
    let cfg: UNet2DConditionConfig = load_json(&fixture("tiny-sd/unet/config.json")).unwrap();
    let err = UNet2DConditionModel::new(&cfg, &w)
        .err()
        .expect("must fail");
    match &err {
        Error::Shape { key: k, .. } => assert_eq!(k, key),
        other => panic!("expected a shape error, got {other}"),
    }
    assert!(err.to_string().contains(key), "{err}");
}

#[test]
fn missing_key_names_the_key() {
    let key = "up_blocks.1.resnets.1.conv_shortcut.bias";
    let (_dir, w) = altered_weights(key, true);
    let cfg: UNet2DConditionConfig = load_json(&fixture("tiny-sd/unet/config.json")).unwrap();
    let err = UNet2DConditionModel::new(&cfg, &w)
        .err()
        .expect("must fail");
    match &err {
        Error::MissingKey { key: k, .. } => assert_eq!(k, key),
        other => panic!("expected a missing-key error, got {other}"),
    }
}

#[test]
fn unsupported_config_is_refused_by_field() {
    let w = weights("tiny-sd", "unet");
    let base: UNet2DConditionConfig = load_json(&fixture("tiny-sd/unet/config.json")).unwrap();
    let mut cfg = base.clone();
    cfg.down_block_types[1] = "AttnDownBlock2D".into();
    let err = UNet2DConditionModel::new(&cfg, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("down_block_types[1]") && err.contains("AttnDownBlock2D"),
        "{err}"
    );
    let mut cfg = base.clone();
    cfg.class_embed_type = Some("timestep".into());
    let err = UNet2DConditionModel::new(&cfg, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("class_embed_type"), "{err}");
    let mut cfg = base;
    cfg.resnet_time_scale_shift = "scale_shift".into();
    let err = UNet2DConditionModel::new(&cfg, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("resnet_time_scale_shift"), "{err}");
}

/// Per-block list configs, a depth-2 transformer, an odd `time_cond_proj_dim`, and a 6×5 latent (not a
/// multiple of 4: the up blocks upsample to the skip connections' sizes).
#[test]
fn list_configs_and_odd_sizes_match_diffusers() {
    let dir = fixture("unet-extra");
    let cfg: UNet2DConditionConfig = load_json(&dir.join("config.json")).unwrap();
    let w = Weights::from_files(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let unet = UNet2DConditionModel::new(&cfg, &w).unwrap();
    let refs =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    for (t, key) in [(999.0, "out_t999"), (12.5, "out_t12.5")] {
        let out = unet
            .forward(
                &refs["sample"],
                t,
                &refs["encoder_hidden_states"],
                Some(&refs["timestep_cond"]),
                None,
            )
            .unwrap();
        let err = rel_err(&out, &refs[key]);
        println!("unet-extra {key}: rel err {err:.3e}");
        assert!(err < TOL, "{key}: {err}");
    }
}
