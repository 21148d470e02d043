//! LoRA against diffusers 0.42.1 + peft 0.21.2 (`tests/fixtures/lora/`, see tests/fixtures/README.md): every
//! layout's image after fusing and in the runtime (unfused) mode within a mean absolute difference of
//! 0.5/255 and a maximum of 3/255 of diffusers' `fused` and `unfused` images; fused weights within 1e-5
//! relative; two LoRAs at 1.0 and 0.8 as diffusers' `set_adapters`; the un-fused model bit-exact; and each
//! bad input rejected with a one-line error.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture, rel_err};
use fewstep::lora::{self, extract_prompt_loras, LoraFile, LoraSpec};
use fewstep::weights::diffusers::DiffusersFolder;
use fewstep::weights::parts::ModelParts;

fn parts() -> ModelParts {
    let folder = DiffusersFolder::open(fixture("tiny-sd")).unwrap();
    ModelParts::from_folder(&folder, DType::F32, &Device::Cpu).unwrap()
}

fn lora_path(name: &str) -> PathBuf {
    fixture(&format!("lora/{name}.safetensors"))
}

fn open(name: &str) -> LoraFile {
    LoraFile::open(lora_path(name)).unwrap()
}

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("lora/reference.safetensors"), &Device::Cpu).unwrap()
}

fn assert_close(what: &str, ours: &Tensor, want: &Tensor) {
    let (mean, max) = common::image_diff(ours, want);
    println!("{what}: mean |diff| {mean:.4}/255, max {max:.4}/255");
    assert!(mean <= 0.5, "{what}: mean |diff| {mean}/255 > 0.5/255");
    assert!(max <= 3.0, "{what}: max |diff| {max}/255 > 3/255");
}

/// Fused and runtime images of one fixture LoRA against diffusers' fused and unfused references.
fn check_layout(name: &str, unet: usize, text_encoder: usize) {
    let refs = references();
    let base = parts();
    let loras = vec![(open(name), 1.0)];
    let (fused, report) = lora::fuse(&base, &loras).unwrap();
    assert_eq!(report.loras[0].unet, unet, "{name}: UNet modules");
    assert_eq!(
        report.loras[0].text_encoder, text_encoder,
        "{name}: text encoder modules"
    );
    let img_fused = common::lcm4(&fused);
    assert_close(
        &format!("{name} fused vs diffusers fused"),
        &img_fused,
        &refs[&format!("{name}.fused")],
    );
    assert_close(
        &format!("{name} fused vs diffusers unfused"),
        &img_fused,
        &refs[&format!("{name}.unfused")],
    );
    let (rt, report_rt) = lora::runtime(&base, &loras).unwrap();
    assert_eq!(report_rt, report);
    let img_rt = common::lcm4(&rt);
    assert_close(
        &format!("{name} runtime vs diffusers unfused"),
        &img_rt,
        &refs[&format!("{name}.unfused")],
    );
    let (_, max) = common::image_diff(&img_rt, &img_fused);
    println!("{name}: runtime vs fused max |diff| {max:.2e}/255");
    assert!(
        max < 0.05,
        "{name}: runtime differs from fused by {max}/255"
    );
}

#[test]
fn kohya_over_diffusers_names() {
    check_layout("kohya_diffusers", 128, 0);
}

#[test]
fn kohya_over_ldm_names_with_text_encoder() {
    check_layout("kohya_ldm", 92, 8);
}

#[test]
fn kohya_style_rank8_with_text_encoder() {
    check_layout("style", 34, 6);
}

#[test]
fn peft_with_metadata() {
    check_layout("peft", 44, 10);
}

#[test]
fn peft_without_prefix() {
    check_layout("peft_noprefix", 44, 0);
}

#[test]
fn diffusers_old_names() {
    check_layout("diffusers_old", 35, 8);
}

#[test]
fn layouts_detected_from_keys() {
    use fewstep::lora::Layout;
    for (name, layout) in [
        ("kohya_diffusers", Layout::Kohya),
        ("kohya_ldm", Layout::Kohya),
        ("style", Layout::Kohya),
        ("peft", Layout::Peft),
        ("peft_noprefix", Layout::Peft),
        ("diffusers_old", Layout::DiffusersOld),
    ] {
        assert_eq!(open(name).layout, layout, "{name}");
    }
    // The scales the fixtures document: PEFT metadata lora_alpha 8 / r 4; no metadata → 1.
    assert!(open("peft").modules.iter().all(|m| m.scale == 2.0));
    assert!(open("peft_noprefix").modules.iter().all(|m| m.scale == 1.0));
    let ldm = open("kohya_ldm");
    let mut scales: Vec<f64> = ldm.modules.iter().map(|m| m.scale).collect();
    scales.sort_by(f64::total_cmp);
    scales.dedup();
    assert_eq!(scales, vec![0.5, 1.0, 4.0]);
}

#[test]
fn fused_weights_match_diffusers() {
    let refs = references();
    let base = parts();
    for (name, modules) in [
        (
            "kohya_diffusers",
            vec![
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "unet.down_blocks.0.attentions.0.proj_in",
                "unet.down_blocks.0.resnets.0.conv1",
                "unet.up_blocks.0.upsamplers.0.conv",
            ],
        ),
        (
            "kohya_ldm",
            vec![
                "text_encoder.encoder.layers.0.self_attn.q_proj",
                "text_encoder.encoder.layers.0.mlp.fc1",
                "unet.mid_block.resnets.0.conv1",
            ],
        ),
    ] {
        let (fused, _) = lora::fuse(&base, &[(open(name), 1.0)]).unwrap();
        for m in modules {
            let want = &refs[&format!("fused.{m}")];
            let (view, key) = match m.split_once('.').unwrap() {
                ("unet", k) => (&fused.unet, format!("{k}.weight")),
                (_, k) => (&fused.text_encoder, format!("text_model.{k}.weight")),
            };
            let got = view.get_any_shape(&key).unwrap();
            let e = rel_err(&got, want);
            println!("{name} {m}: relative error {e:.2e}");
            assert!(e < 1e-5, "{name} {m}: relative error {e}");
        }
    }
}

#[test]
fn two_loras_weighted_as_set_adapters() {
    let refs = references();
    let base = parts();
    let loras = vec![(open("kohya_diffusers"), 1.0), (open("style"), 0.8)];
    let (fused, report) = lora::fuse(&base, &loras).unwrap();
    assert_eq!(report.loras.len(), 2);
    assert_eq!(
        (report.loras[1].unet, report.loras[1].text_encoder),
        (34, 6)
    );
    let img = common::lcm4(&fused);
    assert_close("stack fused vs diffusers stack", &img, &refs["stack"]);
    assert_close(
        "stack fused vs diffusers stack.fused",
        &img,
        &refs["stack.fused"],
    );
    let (rt, _) = lora::runtime(&base, &loras).unwrap();
    assert_close(
        "stack runtime vs diffusers stack",
        &common::lcm4(&rt),
        &refs["stack"],
    );
}

/// Every tensor of `w` read back bit for bit as the file stores it.
fn assert_view_is_file(w: &fewstep::weights::Weights, file: &Path, prefix_ok: bool) {
    let stored = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let mut n = 0;
    for (k, t) in &stored {
        let got = w.get_any_shape(k).unwrap();
        let same = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{k} differs from the file");
        n += 1;
    }
    assert!(prefix_ok && n > 0);
}

#[test]
fn unfused_model_is_bit_exact_and_fuse_touches_only_lora_layers() {
    let base = parts();
    let loras = vec![(open("kohya_ldm"), 1.0), (open("style"), 0.8)];
    let (fused, report) = lora::fuse(&base, &loras).unwrap();
    // The fused view changes exactly the adapted layers…
    let unet_file = common::weights_file("tiny-sd", "unet");
    let stored = candle_core::safetensors::load(&unet_file, &Device::Cpu).unwrap();
    let mut changed = 0;
    for (k, t) in &stored {
        let got = fused.unet.get_any_shape(k).unwrap();
        let diff = (&got - t)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        if diff.to_scalar::<f32>().unwrap() > 0.0 {
            changed += 1;
        }
    }
    let te_changed = report.layers - changed;
    assert!(changed > 0 && te_changed > 0);
    // …and dropping it leaves the original views: the un-fused model, bit for bit.
    drop(fused);
    assert_view_is_file(&base.unet, &unet_file, true);
    assert_view_is_file(
        &base.text_encoder,
        &common::weights_file("tiny-sd", "text_encoder"),
        true,
    );
    // The image of the un-fused parts is diffusers' plain lcm4.
    let pipelines =
        candle_core::safetensors::load(fixture("reference/pipelines.safetensors"), &Device::Cpu)
            .unwrap();
    let (_, max) = common::image_diff(&common::lcm4(&base), &pipelines["lcm4"]);
    assert!(max <= 3.0);
}

#[test]
fn fuse_in_f16_computes_in_f32() {
    // tiny-sd read as f16: the fused weight is (W_f16→f32 + Δ_f32) rounded once to f16.
    let folder = DiffusersFolder::open(fixture("tiny-sd")).unwrap();
    let base = ModelParts::from_folder(&folder, DType::F16, &Device::Cpu).unwrap();
    let lora = open("kohya_diffusers");
    let (fused, _) = lora::fuse(&base, &[(lora.clone(), 1.0)]).unwrap();
    let key = "down_blocks.0.resnets.0.conv1.weight";
    let got = fused.unet.get_any_shape(key).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    let m = lora
        .modules
        .iter()
        .find(|m| m.down_key == "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        .unwrap();
    let w = base.unet.with_dtype(DType::F32).get_any_shape(key).unwrap();
    let (o, r) = (m.up.dims()[0], m.rank());
    let delta = (m.up.reshape((o, r)).unwrap() * m.scale)
        .unwrap()
        .matmul(&m.down.reshape((r, ())).unwrap())
        .unwrap()
        .reshape(w.dims())
        .unwrap();
    let want = (w + delta).unwrap().to_dtype(DType::F16).unwrap();
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<half::f16>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<half::f16>().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------- bad inputs

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn one_line(e: &fewstep::Error) -> String {
    let s = e.to_string();
    assert_eq!(s.lines().count(), 1, "not one line: {s}");
    println!("{s}");
    s
}

#[test]
fn sdxl_shaped_lora_names_key_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    // SDXL's cross-attention reads 2048-wide context; tiny-sd's attn2.to_k is [32, 16].
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let path = save(
        dir.path(),
        "sdxl",
        &[
            (&format!("{k}.lora_down.weight"), randn(&[4, 2048])),
            (&format!("{k}.lora_up.weight"), randn(&[32, 4])),
            (
                &format!("{k}.alpha"),
                Tensor::new(4f32, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let e = lora::fuse(&parts(), &[(LoraFile::open(&path).unwrap(), 1.0)])
        .err()
        .unwrap();
    let s = one_line(&e);
    assert!(s.contains(&format!("{k}.lora_down.weight")), "{s}");
    assert!(s.contains("[32, 2048]") && s.contains("[32, 16]"), "{s}");
    let e = lora::runtime(&parts(), &[(LoraFile::open(&path).unwrap(), 1.0)])
        .err()
        .unwrap();
    assert!(one_line(&e).contains("[32, 2048]"));
}

#[test]
fn keys_matching_nothing_list_the_first_ten() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    let names: Vec<String> = (0..12)
        .map(|i| format!("lora_unet_nowhere_{i:02}"))
        .collect();
    for n in &names {
        tensors.push((format!("{n}.lora_down.weight"), randn(&[4, 8])));
        tensors.push((format!("{n}.lora_up.weight"), randn(&[8, 4])));
    }
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    let path = save(dir.path(), "nowhere", &refs);
    let e = lora::fuse(&parts(), &[(LoraFile::open(&path).unwrap(), 1.0)])
        .err()
        .unwrap();
    let s = one_line(&e);
    assert!(s.contains("12 of its 12 modules match no layer"), "{s}");
    assert!(s.contains("lora_unet_nowhere_09.lora_down.weight"), "{s}");
    assert!(!s.contains("lora_unet_nowhere_10"), "{s}");
    assert!(s.contains("12 in all"), "{s}");

    // Keys in no LoRA layout at all.
    let path = save(dir.path(), "notlora", &[("model.weight", randn(&[2, 2]))]);
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(
        s.contains("no key is in a known LoRA layout") && s.contains("model.weight"),
        "{s}"
    );
    // A kohya file with a stray key.
    let path = save(
        dir.path(),
        "stray",
        &[
            ("lora_unet_conv_in.lora_down.weight", randn(&[4, 4, 3, 3])),
            ("lora_unet_conv_in.lora_up.weight", randn(&[32, 4, 1, 1])),
            ("lora_unet_conv_in.something", randn(&[1])),
        ],
    );
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(s.contains("lora_unet_conv_in.something"), "{s}");
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(lora_path("kohya_diffusers")).unwrap();
    let path = dir.path().join("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(s.contains("truncated"), "{s}");
}

#[test]
fn nan_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = randn(&[32, 4]).to_vec2::<f32>().unwrap();
    up[3][1] = f32::NAN;
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let path = save(
        dir.path(),
        "nan",
        &[
            (&format!("{k}.lora_down.weight"), randn(&[4, 32])),
            (
                &format!("{k}.lora_up.weight"),
                Tensor::new(up, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(
        s.contains(&format!("{k}.lora_up.weight")) && s.contains("NaN"),
        "{s}"
    );
    let path = save(
        dir.path(),
        "inf",
        &[
            (&format!("{k}.lora_down.weight"), randn(&[4, 32])),
            (&format!("{k}.lora_up.weight"), randn(&[32, 4])),
            (
                &format!("{k}.alpha"),
                Tensor::new(f32::INFINITY, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(s.contains(&format!("{k}.alpha")), "{s}");
}

#[test]
fn integer_tensor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let path = save(
        dir.path(),
        "int",
        &[
            (&format!("{k}.lora_down.weight"), randn(&[4, 32])),
            (
                &format!("{k}.lora_up.weight"),
                Tensor::new(&[[1i64; 4]; 32], &Device::Cpu).unwrap(),
            ),
        ],
    );
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(
        s.contains(&format!("{k}.lora_up.weight")) && s.contains("I64"),
        "{s}"
    );
    let path = save(
        dir.path(),
        "u8",
        &[(
            &format!("{k}.lora_down.weight"),
            Tensor::new(&[1u8, 2], &Device::Cpu).unwrap(),
        )],
    );
    let s = one_line(&LoraFile::open(&path).unwrap_err());
    assert!(s.contains("U8"), "{s}");
}

#[test]
fn prompt_syntax_resolves_in_the_lora_dir() {
    let dir = fixture("lora");
    let (prompt, specs) = extract_prompt_loras(
        "a red circle <lora:kohya_diffusers:1> on blue <lora:style:0.8>",
        &dir,
    )
    .unwrap();
    assert_eq!(prompt, "a red circle on blue");
    assert_eq!(
        specs,
        vec![
            LoraSpec {
                path: dir.join("kohya_diffusers.safetensors"),
                weight: 1.0
            },
            LoraSpec {
                path: dir.join("style.safetensors"),
                weight: 0.8
            },
        ]
    );
    let e = extract_prompt_loras("a cat <lora:missing:1>", &dir).unwrap_err();
    let s = one_line(&e);
    assert!(s.contains("missing.safetensors"), "{s}");
}

#[test]
fn spec_with_a_weight_that_is_not_a_number() {
    let p = lora_path("style");
    let e = LoraSpec::parse(&format!("{}:strong", p.display())).unwrap_err();
    let s = one_line(&e);
    assert!(s.contains("`strong`") && s.contains("not a number"), "{s}");
    let spec = LoraSpec::parse(&format!("{}:0.8", p.display())).unwrap();
    assert_eq!((spec.path, spec.weight), (p, 0.8));
}

#[test]
fn text_encoder_2_lora_on_sd15_is_unmatched() {
    let dir = tempfile::tempdir().unwrap();
    let k = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    let path = save(
        dir.path(),
        "te2",
        &[
            (&format!("{k}.lora_down.weight"), randn(&[4, 16])),
            (&format!("{k}.lora_up.weight"), randn(&[16, 4])),
        ],
    );
    let e = lora::fuse(&parts(), &[(LoraFile::open(&path).unwrap(), 1.0)])
        .err()
        .unwrap();
    let s = one_line(&e);
    assert!(s.contains("no text_encoder_2"), "{s}");
}
