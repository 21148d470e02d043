//! Single-file checkpoints in the original Stable Diffusion layout (`tests/fixtures/single-file/`, made with
//! diffusers 0.42.1's `from_single_file`): same images as diffusers, every key mapped, dtype conversions,
//! refusals, and `--vae` swaps.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixture;
use fewstep::config::{load_json, UNet2DConditionConfig};
use fewstep::pipeline::StableDiffusion;
use fewstep::weights::parts::ModelParts;
use fewstep::weights::single_file::{
    default_scheduler_config, detect, infer_unet_config, load_single_file, load_single_file_with,
    unet_module_map, Family, SingleFileOptions,
};
use fewstep::weights::SafetensorsFile;

fn sf(name: &str) -> PathBuf {
    fixture(&format!("single-file/{name}.safetensors"))
}

fn with_config(name: &str, folder: &str) -> ModelParts {
    let opts = SingleFileOptions {
        config: Some(fixture(folder)),
        prediction_type: None,
    };
    load_single_file_with(&sf(name), &opts, DType::F32, &Device::Cpu).unwrap()
}

fn reference(name: &str) -> Tensor {
    let refs =
        candle_core::safetensors::load(fixture("single-file/reference.safetensors"), &Device::Cpu)
            .unwrap();
    refs[name].clone()
}

use common::assert_image_close as assert_close;

/// The lcm4 picture of the single file's parts equals that of its folder twin.
fn assert_same_as_folder(img: &Tensor, folder: &ModelParts) {
    let (mean, max) = common::image_diff(img, &common::lcm4(folder));
    assert_eq!((mean, max), (0.0, 0.0), "single file vs folder");
}

#[test]
fn detects_families() {
    let f = SafetensorsFile::open(sf("tiny-sd")).unwrap();
    assert_eq!(detect(&f).unwrap(), Family::Sd1);
    let f = SafetensorsFile::open(sf("tiny-sd2")).unwrap();
    assert_eq!(detect(&f).unwrap(), Family::Sd2);
}

#[test]
fn tiny_sd_matches_diffusers() {
    let parts = with_config("tiny-sd", "tiny-sd");
    let img = common::lcm4(&parts);
    assert_close("tiny-sd.lcm4", &img, &reference("tiny-sd.lcm4"));
    assert_close(
        "tiny-sd vs folder_f16",
        &img,
        &reference("folder_f16.tiny-sd.lcm4"),
    );
}

#[test]
fn tiny_sd2_matches_diffusers() {
    let parts = with_config("tiny-sd2", "tiny-sd2");
    assert_eq!(
        parts.scheduler_config.prediction_type.as_deref(),
        Some("v_prediction")
    );
    assert_eq!(parts.tokenizer.pad_id(), 0);
    let img = common::lcm4(&parts);
    assert_close("tiny-sd2.lcm4", &img, &reference("tiny-sd2.lcm4"));
    // The folder twin (weights stored in f16) through our folder loader gives the same image.
    let folder = ModelParts::from_folder(
        &fewstep::weights::diffusers::DiffusersFolder::open(fixture("tiny-sd2")).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_same_as_folder(&img, &folder);
}

/// Every tensor the folder's components hold is mapped from the single file, with the same values
/// (the single file's are the folder's rounded to f16), and nothing else is.
#[test]
fn every_folder_key_is_mapped() {
    for (name, folder) in [("tiny-sd", "tiny-sd"), ("tiny-sd2", "tiny-sd2")] {
        let parts = with_config(name, folder);
        for (component, view) in [
            ("unet", &parts.unet),
            ("vae", &parts.vae),
            ("text_encoder", &parts.text_encoder),
        ] {
            let file = common::weights_file(folder, component);
            let want = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
            let want_keys: BTreeSet<&String> = want
                .keys()
                .filter(|k| !k.ends_with("position_ids"))
                .collect();
            let got_keys: BTreeSet<&String> = view.keys().collect();
            assert_eq!(got_keys, want_keys, "{name} {component}: key sets differ");
            for (k, t) in &want {
                if k.ends_with("position_ids") {
                    continue;
                }
                let ours = view.get_any_shape(k).unwrap();
                let t16 = t
                    .to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                assert_eq!(ours.dims(), t.dims(), "{name} {k}");
                let d = (&ours - &t16)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(d, 0.0, "{name} {component} {k}");
            }
        }
    }
}

#[test]
fn module_map_covers_tiny_sd_unet() {
    let cfg: UNet2DConditionConfig = load_json(&fixture("tiny-sd/unet/config.json")).unwrap();
    let map = unet_module_map(&cfg).unwrap();
    let modules: HashMap<&str, &str> = map.iter().map(|(d, l)| (d.as_str(), l.as_str())).collect();
    let folder = SafetensorsFile::open(common::weights_file("tiny-sd", "unet")).unwrap();
    let single = SafetensorsFile::open(sf("tiny-sd")).unwrap();
    let mut covered = BTreeSet::new();
    for key in folder.tensors().keys() {
        let (module, leaf) = key.rsplit_once('.').unwrap();
        let ldm = modules
            .get(module)
            .unwrap_or_else(|| panic!("{module} not in unet_module_map"));
        let ldm_key = format!("model.diffusion_model.{ldm}.{leaf}");
        assert!(
            single.tensors().contains_key(&ldm_key),
            "{ldm_key} (for {key}) not in the single file"
        );
        covered.insert(module.to_string());
    }
    assert_eq!(
        covered.len(),
        map.len(),
        "the map has modules the UNet lacks"
    );
    // Every UNet tensor of the single file is covered by the map.
    let ldm_modules: BTreeSet<&str> = map.iter().map(|(_, l)| l.as_str()).collect();
    for key in single.tensors().keys() {
        if let Some(rest) = key.strip_prefix("model.diffusion_model.") {
            let (module, _) = rest.rsplit_once('.').unwrap();
            assert!(ldm_modules.contains(module), "{key} not mapped");
        }
    }
}

#[test]
fn module_map_sd15_shape() {
    let map = unet_module_map(&UNet2DConditionConfig::default()).unwrap();
    // SD1.5's UNet has 686 tensors: all leaf modules have weight and bias except to_q/to_k/to_v.
    let qkv = map
        .iter()
        .filter(|(d, _)| d.ends_with("to_q") || d.ends_with("to_k") || d.ends_with("to_v"))
        .count();
    assert_eq!(2 * map.len() - qkv, 686);
}

#[test]
fn infers_unet_config_from_shapes() {
    for (name, folder, family) in [
        ("tiny-sd", "tiny-sd", Family::Sd1),
        ("tiny-sd2", "tiny-sd2", Family::Sd2),
    ] {
        let f = SafetensorsFile::open(sf(name)).unwrap();
        let got = infer_unet_config(&f, family).unwrap();
        let want: UNet2DConditionConfig =
            load_json(&fixture(&format!("{folder}/unet/config.json"))).unwrap();
        assert_eq!(got.block_out_channels, want.block_out_channels, "{name}");
        assert_eq!(got.layers_per_block, want.layers_per_block, "{name}");
        assert_eq!(got.down_block_types, want.down_block_types, "{name}");
        assert_eq!(got.up_block_types, want.up_block_types, "{name}");
        assert_eq!(got.cross_attention_dim, want.cross_attention_dim, "{name}");
        assert_eq!(
            got.transformer_layers_per_block, want.transformer_layers_per_block,
            "{name}"
        );
        assert_eq!(
            got.use_linear_projection, want.use_linear_projection,
            "{name}"
        );
        assert_eq!(got.upcast_attention, want.upcast_attention, "{name}");
        assert_eq!(got.time_cond_proj_dim, want.time_cond_proj_dim, "{name}");
        assert_eq!(got.in_channels, want.in_channels);
        assert_eq!(got.out_channels, want.out_channels);
    }
    // SD1's head layout is diffusers' SD1 config's, whatever the width.
    let f = SafetensorsFile::open(sf("tiny-sd")).unwrap();
    let got = infer_unet_config(&f, Family::Sd1).unwrap();
    assert_eq!(got.attention_head_dim, fewstep::config::OneOrMany::One(8));
}

#[test]
fn sd2_scheduler_is_sd21s() {
    let want: fewstep::config::SchedulerConfig =
        load_json(&fixture("tiny-sd2/scheduler/scheduler_config.json")).unwrap();
    let got = default_scheduler_config(Family::Sd2);
    assert_eq!(got.class_name, want.class_name);
    assert_eq!(got.prediction_type, want.prediction_type);
    assert_eq!(got.beta_start, want.beta_start);
    assert_eq!(got.beta_end, want.beta_end);
    assert_eq!(got.beta_schedule, want.beta_schedule);
    assert_eq!(got.steps_offset, want.steps_offset);
    assert_eq!(got.set_alpha_to_one, want.set_alpha_to_one);
    assert_eq!(got.clip_sample, want.clip_sample);
    let want1: fewstep::config::SchedulerConfig =
        load_json(&fixture("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    let got1 = default_scheduler_config(Family::Sd1);
    assert_eq!(got1.class_name, want1.class_name);
    assert_eq!(got1.prediction_type, want1.prediction_type);
    assert_eq!(got1.steps_offset, want1.steps_offset);
}

/// Writes `tensors` (stored names) to `dir/name`.
fn save(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn stored(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(sf(name), &Device::Cpu).unwrap()
}

#[test]
fn f32_and_bf16_copies_load() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::lcm4(&with_config("tiny-sd", "tiny-sd"));
    for (dtype, tol) in [(DType::F32, 0.0f32), (DType::BF16, 8.0)] {
        let tensors: HashMap<String, Tensor> = stored("tiny-sd")
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect();
        let path = save(dir.path(), &format!("{dtype:?}.safetensors"), &tensors);
        let opts = SingleFileOptions {
            config: Some(fixture("tiny-sd")),
            prediction_type: None,
        };
        let parts = load_single_file_with(&path, &opts, DType::F32, &Device::Cpu).unwrap();
        let (mean, max) = common::image_diff(&common::lcm4(&parts), &base);
        println!("{dtype:?} copy vs f16 file: mean {mean:.4}/255, max {max:.4}/255");
        assert!(max <= tol, "{dtype:?}: max {max}/255");
    }
}

#[test]
fn sdxl_refiner_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let z = Tensor::zeros((4, 4), DType::F16, &Device::Cpu).unwrap();
    let tensors = HashMap::from([
        (
            "conditioner.embedders.0.model.positional_embedding".to_string(),
            z.clone(),
        ),
        (
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            z,
        ),
    ]);
    let path = save(dir.path(), "refiner.safetensors", &tensors);
    let err = load_single_file(&path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("SDXL refiner") && err.contains("not supported"),
        "{err}"
    );
}

fn xl_file() -> PathBuf {
    fixture("sdxl/tiny-sdxl.safetensors")
}

#[test]
fn tiny_sdxl_single_file_matches_diffusers_and_its_folder() {
    let f = SafetensorsFile::open(xl_file()).unwrap();
    assert_eq!(detect(&f).unwrap(), Family::Sdxl);
    let opts = SingleFileOptions {
        config: Some(fixture("tiny-sdxl")),
        prediction_type: None,
    };
    let parts = load_single_file_with(&xl_file(), &opts, DType::F32, &Device::Cpu).unwrap();
    assert!(parts.text_encoder_2.is_some() && parts.force_zeros_for_empty_prompt);
    let img = common::lcm4(&parts);
    let refs = candle_core::safetensors::load(fixture("sdxl/pipelines.safetensors"), &Device::Cpu)
        .unwrap();
    // diffusers' from_single_file(config=tiny-sdxl) gives the folder's image bit for bit
    // (`sdxl/single_file.json`), so the folder's reference is the single file's too.
    assert_close("tiny-sdxl single file", &img, &refs["sdxl_lcm4"]);
    let folder = ModelParts::open(
        fixture("tiny-sdxl").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_same_as_folder(&img, &folder);
}

#[test]
fn sdxl_configs_are_inferred_from_the_file() {
    let f = SafetensorsFile::open(xl_file()).unwrap();
    let got = infer_unet_config(&f, Family::Sdxl).unwrap();
    let want: UNet2DConditionConfig = load_json(&fixture("tiny-sdxl/unet/config.json")).unwrap();
    assert_eq!(got.block_out_channels, want.block_out_channels);
    assert_eq!(got.layers_per_block, want.layers_per_block);
    assert_eq!(got.down_block_types, want.down_block_types);
    assert_eq!(got.up_block_types, want.up_block_types);
    assert_eq!(got.cross_attention_dim, want.cross_attention_dim);
    assert_eq!(
        got.transformer_layers_per_block,
        want.transformer_layers_per_block
    );
    assert!(got.use_linear_projection && !got.upcast_attention);
    assert_eq!(got.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(
        got.projection_class_embeddings_input_dim,
        want.projection_class_embeddings_input_dim
    );
    // 256-wide time-id sinusoids, as SDXL's (the tiny model's are 8 wide, so the folder config decides).
    assert_eq!(got.addition_time_embed_dim, Some(256));
    assert_eq!(got.sample_size, Some(128));
    let parts = load_single_file(&xl_file(), DType::F32, &Device::Cpu).unwrap();
    let te2 = parts.text_encoder_2.as_ref().unwrap();
    let want2: fewstep::config::ClipTextConfig =
        load_json(&fixture("tiny-sdxl/text_encoder_2/config.json")).unwrap();
    assert_eq!(
        (te2.config.hidden_size, te2.config.projection_dim),
        (want2.hidden_size, want2.projection_dim)
    );
    assert_eq!(te2.config.num_hidden_layers, want2.num_hidden_layers);
    assert_eq!(te2.config.intermediate_size, want2.intermediate_size);
    assert_eq!(te2.config.eos_token_id, Some(2));
    assert_eq!(te2.tokenizer.pad_id(), 0);
    assert_eq!(parts.tokenizer.pad_id(), 49407);
    assert_eq!(parts.text_encoder_config.num_hidden_layers, 2);
    assert_eq!(parts.vae_config.scaling_factor, 0.13025);
    assert_eq!(
        parts.scheduler_config.class_name.as_deref(),
        Some("EulerDiscreteScheduler")
    );
}

#[test]
fn missing_key_names_the_ldm_key() {
    let dir = tempfile::tempdir().unwrap();
    for gone in [
        "model.diffusion_model.output_blocks.0.0.emb_layers.1.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias",
    ] {
        let mut tensors = stored("tiny-sd");
        tensors.remove(gone).unwrap();
        let path = save(dir.path(), "cut.safetensors", &tensors);
        let err = load_single_file(&path, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(gone), "{err}");
    }
    let mut tensors = stored("tiny-sd2");
    let gone = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    tensors.remove(gone).unwrap();
    let path = save(dir.path(), "cut2.safetensors", &tensors);
    let err = load_single_file(&path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(gone), "{err}");
}

#[test]
fn extra_keys_are_ignored_and_ckpt_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = stored("tiny-sd");
    let z = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("model_ema.decay".into(), z.clone());
    tensors.insert("cond_stage_model.transformer.logit_scale".into(), z);
    let path = save(dir.path(), "extra.safetensors", &tensors);
    let opts = SingleFileOptions {
        config: Some(fixture("tiny-sd")),
        prediction_type: None,
    };
    load_single_file_with(&path, &opts, DType::F32, &Device::Cpu).unwrap();
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let err = ModelParts::open(ckpt.to_str().unwrap(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.ckpt") && err.contains(".safetensors"),
        "{err}"
    );
}

/// Inferred everything (no config folder): SD1's configs, the bundled tokenizer with EOS padding.
#[test]
fn loads_without_config_folder() {
    // tiny-sd's VAE uses 8 groups, which no key records; everything else is inferred.
    let mut parts = load_single_file(&sf("tiny-sd"), DType::F32, &Device::Cpu).unwrap();
    let folder = with_config("tiny-sd", "tiny-sd");
    assert_eq!(
        parts.vae_config.block_out_channels,
        folder.vae_config.block_out_channels
    );
    assert_eq!(
        parts.vae_config.layers_per_block,
        folder.vae_config.layers_per_block
    );
    assert_eq!(parts.text_encoder_config.hidden_size, 16);
    assert_eq!(parts.text_encoder_config.num_hidden_layers, 2);
    assert_eq!(parts.text_encoder_config.intermediate_size, 37);
    assert_eq!(parts.tokenizer.pad_id(), 49407);
    assert_eq!(
        parts.tokenizer.encode(common::PROMPT).unwrap(),
        folder.tokenizer.encode(common::PROMPT).unwrap()
    );
    // With the shape-invisible values set, the image is diffusers'.
    parts.vae_config.norm_num_groups = 8;
    parts.text_encoder_config.num_attention_heads = 4;
    parts.unet_config.sample_size = Some(8);
    assert_close(
        "inferred tiny-sd",
        &common::lcm4(&parts),
        &reference("tiny-sd.lcm4"),
    );
}

fn decode(parts: &ModelParts, latents: &Tensor) -> Tensor {
    StableDiffusion::from_parts(parts, &Device::Cpu)
        .unwrap()
        .decode(latents)
        .unwrap()
}

#[test]
fn vae_swap_ldm_and_diffusers_layouts() {
    let dir = tempfile::tempdir().unwrap();
    // The published sd-vae-ft-mse-original layout: the LDM VAE keys without `first_stage_model.`.
    let vae: HashMap<String, Tensor> = stored("tiny-sd")
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("first_stage_model.")?.to_string(), t)))
        .collect();
    let vae_path = save(dir.path(), "vae-ft-mse.safetensors", &vae);
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();

    let single = with_config("tiny-sd", "tiny-sd");
    let folder = ModelParts::from_folder(
        &fewstep::weights::diffusers::DiffusersFolder::open(fixture("tiny-sd")).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = decode(&single, &latents);
    let swapped = folder.clone().with_vae_file(&vae_path).unwrap();
    assert_eq!(swapped.vae_config.norm_num_groups, 8);
    let d = common::max_abs_diff(&decode(&swapped, &latents), &want);
    assert_eq!(d, 0.0, "LDM-layout VAE file");
    // A diffusers-named VAE file (its config.json beside it) into the single-file model.
    let swapped = single
        .with_vae_file(&common::weights_file("tiny-sd", "vae"))
        .unwrap();
    let d = common::max_abs_diff(&decode(&swapped, &latents), &decode(&folder, &latents));
    assert_eq!(d, 0.0, "diffusers-layout VAE file");
}

#[test]
fn asymmetric_transformer_depths_are_inferred() {
    let f = SafetensorsFile::open(fixture("sdxl/asym-unet-ldm.safetensors")).unwrap();
    let got = infer_unet_config(&f, Family::Sdxl).unwrap();
    let want: UNet2DConditionConfig = load_json(&fixture("sdxl/asym-unet/config.json")).unwrap();
    for i in 0..3 {
        if want.down_block_types[i].starts_with("CrossAttn") {
            for j in 0..2 {
                assert_eq!(
                    got.down_transformer_layers(i, j),
                    want.down_transformer_layers(i, j),
                    "down {i}.{j}"
                );
            }
        }
        if want.up_block_types[i].starts_with("CrossAttn") {
            for j in 0..3 {
                assert_eq!(
                    got.up_transformer_layers(i, j),
                    want.up_transformer_layers(i, j),
                    "up {i}.{j}"
                );
            }
        }
    }
    // Every stored UNet key is mapped, and every mapped module is stored.
    let stored: BTreeSet<String> = f
        .tensors()
        .keys()
        .filter_map(|k| k.strip_prefix("model.diffusion_model.").map(String::from))
        .collect();
    let mapped: BTreeSet<String> = unet_module_map(&got)
        .unwrap()
        .into_iter()
        .flat_map(|(_, l)| [format!("{l}.weight"), format!("{l}.bias")])
        .filter(|k| stored.contains(k) || k.ends_with(".weight"))
        .collect();
    assert_eq!(mapped, stored);
}
