//! SDXL and SD 2.x against diffusers 0.42.1 (`tests/fixtures/sdxl/`, made by
//! `tools/reference/make_sdxl_fixtures.py`): both text encoders, the micro-conditioned UNet, the full LCM
//! SDXL UNet, whole pipelines (images within a mean |diff| of 0.5/255 and a maximum of 3/255), SDXL LoRAs,
//! and the loader's refusals.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_image_close, fixture, image_diff, lcm4, rel_err, scheduler_kind, PROMPT};
use fewstep::config::{load_json, ClipTextConfig, UNet2DConditionConfig};
use fewstep::image::{read_png, tensor_to_float_images};
use fewstep::lora::{apply, LoraFile};
use fewstep::models::clip::ClipTextModel;
use fewstep::models::unet::{guidance_scale_embedding, TextTimeCond, UNet2DConditionModel};
use fewstep::pipeline::{Request, StableDiffusion};
use fewstep::schedulers::SchedulerKind;
use fewstep::weights::parts::ModelParts;
use fewstep::weights::Weights;
use serde_json::Value;

const TOL: f64 = 1e-4;

/// Asserts `max|got − want| / max|want| < TOL`, printing it under `name`.
fn assert_rel(name: &str, got: &Tensor, want: &Tensor) {
    let err = rel_err(got, want);
    println!("{name}: rel err {err:.3e}");
    assert!(err < TOL, "{name}: rel err {err}");
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("sdxl/{name}.safetensors")), &Device::Cpu)
        .unwrap()
}

fn weights(model: &str, component: &str, file: &str) -> Weights {
    let path = fixture(&format!("{model}/{component}/{file}"));
    Weights::from_files(&[path], DType::F32, &Device::Cpu).unwrap()
}

fn text_encoder(component: &str, projection: bool) -> ClipTextModel {
    let cfg: ClipTextConfig =
        load_json(&fixture(&format!("tiny-sdxl/{component}/config.json"))).unwrap();
    let w = weights("tiny-sdxl", component, "model.safetensors");
    if projection {
        ClipTextModel::with_projection(&cfg, &w).unwrap()
    } else {
        ClipTextModel::new(&cfg, &w).unwrap()
    }
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn first_text_encoder_penultimate_matches_transformers() {
    let r = refs("components");
    let te = text_encoder("text_encoder", false);
    let ids = ids(&r["text.input_ids"]);
    let (h, pooled) = te.encode_penultimate(&ids, None).unwrap();
    assert!(pooled.is_none());
    assert_rel("text_encoder hidden_states[-2]", &h, &r["text.penultimate"]);
    let (h, _) = te.encode_penultimate(&ids, Some(1)).unwrap();
    assert_rel(
        "text_encoder hidden_states[-3] (clip_skip 1)",
        &h,
        &r["text.skip1"],
    );
}

#[test]
fn second_text_encoder_and_projection_match_transformers() {
    let r = refs("components");
    let te = text_encoder("text_encoder_2", true);
    let (h, embeds) = te
        .encode_penultimate(&ids(&r["text_2.input_ids"]), None)
        .unwrap();
    let e1 = rel_err(&h, &r["text_2.penultimate"]);
    let e2 = rel_err(&embeds.unwrap(), &r["text_2.text_embeds"]);
    println!("text_encoder_2 hidden_states[-2]: {e1:.3e}, text_embeds: {e2:.3e}");
    assert!(e1 < TOL && e2 < TOL, "{e1} {e2}");
}

#[test]
fn text_projection_missing_is_named() {
    let cfg: ClipTextConfig = load_json(&fixture("tiny-sdxl/text_encoder/config.json")).unwrap();
    let w = weights("tiny-sdxl", "text_encoder", "model.safetensors");
    let err = ClipTextModel::with_projection(&cfg, &w)
        .expect_err("no text_projection in the first encoder")
        .to_string();
    assert!(err.contains("text_projection.weight"), "{err}");
}

fn xl() -> StableDiffusion {
    StableDiffusion::load_dir(&fixture("tiny-sdxl"), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn encode_prompt_matches_the_sdxl_pipeline() {
    let r = refs("components");
    let model = xl();
    assert!(model.is_sdxl() && model.force_zeros_for_empty_prompt);
    assert_eq!(model.native_size(), 64);
    // Both tokenizers give transformers' ids: the first pads with EOS (49407), the second with "!" (0).
    let (tokenizer_2, _) = model.text_encoder_2.as_ref().unwrap();
    for (tok, key) in [
        (&model.tokenizer, "text.input_ids"),
        (tokenizer_2, "text_2.input_ids"),
    ] {
        let want = ids(&r[key]).to_vec2::<u32>().unwrap();
        assert_eq!(tok.encode(PROMPT).unwrap(), want[0], "{key}");
    }
    assert_eq!(
        ids(&r["text_2.input_ids"]).to_vec2::<u32>().unwrap()[0][76],
        0
    );
    for (i, prompt) in [PROMPT, "a photo of an astronaut riding a horse on mars"]
        .iter()
        .enumerate()
    {
        let p = model.encode_prompt(prompt, None).unwrap();
        let n = model.encode_negative("blurry", &p).unwrap();
        for (got, key) in [
            (&p.context, "encode.prompt_embeds"),
            (p.pooled.as_ref().unwrap(), "encode.pooled"),
            (&n.context, "encode.negative_prompt_embeds"),
            (n.pooled.as_ref().unwrap(), "encode.negative_pooled"),
        ] {
            let want = r[key].get(i).unwrap().unsqueeze(0).unwrap();
            let err = rel_err(got, &want);
            assert!(err < TOL, "prompt {i} {key}: {err}");
        }
        let zeros = model.encode_negative("", &p).unwrap();
        assert_eq!(
            zeros
                .context
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}

/// The components fixture's SDXL micro-conditioning (`unet.text_embeds`, `unet.time_ids`).
fn fixture_added(r: &HashMap<String, Tensor>) -> TextTimeCond {
    TextTimeCond {
        text_embeds: r["unet.text_embeds"].clone(),
        time_ids: r["unet.time_ids"].clone(),
    }
}

/// `u` on the components fixture's `unet.sample` and `unet.encoder_hidden_states` at `t`.
fn run_unet(
    u: &UNet2DConditionModel,
    r: &HashMap<String, Tensor>,
    t: f64,
    cond: Option<&Tensor>,
    added: Option<&TextTimeCond>,
) -> fewstep::Result<Tensor> {
    u.forward(
        &r["unet.sample"],
        t,
        &r["unet.encoder_hidden_states"],
        cond,
        added,
    )
}

fn unet(model: &str) -> UNet2DConditionModel {
    let cfg: UNet2DConditionConfig =
        load_json(&fixture(&format!("{model}/unet/config.json"))).unwrap();
    let w = weights(model, "unet", "diffusion_pytorch_model.safetensors");
    UNet2DConditionModel::new(&cfg, &w).unwrap()
}

#[test]
fn sdxl_unet_with_micro_conditioning_matches_diffusers() {
    let r = refs("components");
    let added = fixture_added(&r);
    let u = unet("tiny-sdxl");
    assert!(u.has_text_time());
    for (t, key) in [(999.0, "unet.out_t999"), (1.0, "unet.out_t1")] {
        let out = run_unet(&u, &r, t, None, Some(&added)).unwrap();
        assert_rel(&format!("tiny-sdxl {key}"), &out, &r[key]);
    }
    let lcm = unet("tiny-sdxl-lcm");
    let cond = guidance_scale_embedding(&[7.5, 7.5], 32, DType::F32, &Device::Cpu).unwrap();
    let out = run_unet(&lcm, &r, 999.0, Some(&cond), Some(&added)).unwrap();
    assert_rel("tiny-sdxl-lcm out_t999", &out, &r["lcm_unet.out_t999"]);
}

#[test]
fn sdxl_unet_refuses_missing_or_misfit_conditioning() {
    let r = refs("components");
    let u = unet("tiny-sdxl");
    let err = run_unet(&u, &r, 999.0, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("text_embeds and time_ids"), "{err}");
    let short = TextTimeCond {
        text_embeds: r["unet.text_embeds"].narrow(1, 0, 8).unwrap(),
        time_ids: r["unet.time_ids"].clone(),
    };
    let err = run_unet(&u, &r, 999.0, None, Some(&short))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("projection_class_embeddings_input_dim"),
        "{err}"
    );
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    let r = refs("components");
    let model = StableDiffusion::load_dir(&fixture("tiny-sd2"), DType::F32, &Device::Cpu).unwrap();
    assert!(!model.is_sdxl());
    assert_eq!(model.tokenizer.pad_id(), 0);
    let ids = ids(&r["sd2.text.input_ids"]);
    let want = ids.to_vec2::<u32>().unwrap();
    assert_eq!(model.tokenizer.encode(PROMPT).unwrap(), want[0]);
    let h = model.text_encoder.encode(&ids, None).unwrap();
    assert_rel(
        "tiny-sd2 text encoder (23 layers)",
        &h,
        &r["sd2.text.last_hidden_state"],
    );
}

/// The image of a request as NHWC f32 in [0, 1].
fn image(model: &StableDiffusion, req: &Request) -> Tensor {
    let out = model.generate(req, &mut |_, _| {}).unwrap();
    let (b, _, h, w) = out.decoded.dims4().unwrap();
    let img: Vec<f32> = tensor_to_float_images(&out.decoded).unwrap().concat();
    Tensor::from_vec(img, (b, h, w, 3), &Device::Cpu).unwrap()
}

fn request_of(model: &StableDiffusion, case: &Value) -> Request {
    let kw = &case["call_kwargs"];
    let mut req = model.request(
        kw["prompt"].as_str().unwrap(),
        case["seed"].as_u64().unwrap(),
    );
    req.scheduler = scheduler_kind(case["scheduler"].as_str().unwrap());
    req.steps = kw["num_inference_steps"].as_u64().unwrap() as usize;
    req.guidance = kw["guidance_scale"].as_f64().unwrap();
    req.negative_prompt = kw["negative_prompt"].as_str().unwrap_or("").to_string();
    req.width = kw["width"].as_u64().unwrap() as usize;
    req.height = kw["height"].as_u64().unwrap() as usize;
    req.num_images = kw["num_images_per_prompt"].as_u64().unwrap_or(1) as usize;
    if let Some(strength) = kw["strength"].as_f64() {
        // fewstep's --steps counts UNet calls; the LCM schedule of that many calls at this strength is
        // the one StableDiffusionXLImg2ImgPipeline runs (499, 259 for 4 steps at 0.5).
        req.strength = strength;
        req.steps = case["n_unet_calls"].as_u64().unwrap() as usize;
        req.init_image = Some(read_png(&fixture(case["init_image"].as_str().unwrap())).unwrap());
    }
    req
}

fn check_pipeline(name: &str) {
    let case = &common::fixture_case("sdxl/pipelines.json", name);
    let model = StableDiffusion::load_dir(
        &fixture(case["model"].as_str().unwrap()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let req = request_of(&model, case);
    assert_image_close(name, &image(&model, &req), &refs("pipelines")[name]);
}

#[test]
fn sdxl_lcm4_matches_diffusers() {
    check_pipeline("sdxl_lcm4");
}

#[test]
fn sdxl_lcm4_48x64_batch2_matches_diffusers() {
    check_pipeline("sdxl_lcm4_48x64_batch2");
}

#[test]
fn sdxl_euler_cfg_with_negative_prompt_matches_diffusers() {
    check_pipeline("sdxl_euler_cfg");
}

#[test]
fn sdxl_euler_cfg_zero_negative_matches_diffusers() {
    check_pipeline("sdxl_euler_zeros");
}

#[test]
fn full_lcm_sdxl_matches_diffusers() {
    check_pipeline("sdxl_lcm_full");
}

#[test]
fn sdxl_img2img_lcm_lora_recipe_matches_diffusers() {
    check_pipeline("sdxl_img2img");
}

#[test]
fn sd2_v_prediction_ddim_cfg_matches_diffusers() {
    check_pipeline("sd2_ddim_cfg");
}

fn lcm4_request(model: &StableDiffusion) -> Request {
    let mut req = model.request(PROMPT, 0);
    req.scheduler = SchedulerKind::Lcm;
    req.steps = 4;
    req.guidance = 1.0;
    req
}

fn lora(name: &str) -> LoraFile {
    LoraFile::open(fixture(&format!("sdxl/{name}.safetensors"))).unwrap()
}

fn parts_of(model: &str, dtype: DType) -> ModelParts {
    ModelParts::open(fixture(model).to_str().unwrap(), dtype, &Device::Cpu).unwrap()
}

fn xl_parts() -> ModelParts {
    parts_of("tiny-sdxl", DType::F32)
}

#[test]
fn sdxl_lora_with_both_text_encoders_matches_diffusers() {
    let r = refs("lora_reference");
    let parts = xl_parts();
    let loras = [(lora("lora_xl"), 1.0)];
    let (fused, report) = apply::fuse(&parts, &loras).unwrap();
    let rep = &report.loras[0];
    assert_eq!(
        (rep.unet, rep.text_encoder, rep.text_encoder_2),
        (257, 12, 18)
    );
    assert_image_close("lora_xl fused", &lcm4(&fused), &r["lora_xl.fused"]);
    let (runtime, _) = apply::runtime(&parts, &loras).unwrap();
    assert_image_close("lora_xl runtime", &lcm4(&runtime), &r["lora_xl"]);
}

#[test]
fn two_sdxl_loras_with_weights_match_set_adapters() {
    let r = refs("lora_reference");
    let loras = [(lora("lora_xl"), 1.0), (lora("lora_xl_te"), 0.8)];
    let (fused, _) = apply::fuse(&xl_parts(), &loras).unwrap();
    assert_image_close("lora_xl+te0.8", &lcm4(&fused), &r["lora_xl+te0.8"]);
}

#[test]
fn sdxl_lora_on_sd15_names_key_and_shapes() {
    let parts = parts_of("tiny-sd", DType::F32);
    let err = apply::fuse(&parts, &[(lora("lora_xl"), 1.0)])
        .err()
        .unwrap()
        .to_string();
    println!("{err}");
    assert!(err.contains("lora_xl.safetensors"), "{err}");
    // The first module whose shape does not fit, with the LoRA's and the model's shapes.
    assert!(
        err.contains("lora_unet_") && err.contains("but the model's weight is"),
        "{err}"
    );
}

#[test]
fn f16_sdxl_decodes_in_f32_unless_the_vae_is_fp16_fix() {
    let parts = parts_of("tiny-sdxl", DType::F16);
    let model = StableDiffusion::from_parts(&parts, &Device::Cpu).unwrap();
    assert_eq!(model.unet.dtype(), DType::F16);
    assert_eq!(
        model.vae.dtype(),
        DType::F32,
        "force_upcast VAE of an f16 SDXL"
    );
    let f16 = image(&model, &lcm4_request(&model));
    let want = &refs("pipelines")["sdxl_lcm4"];
    let (mean, max) = image_diff(&f16, want);
    println!("tiny-sdxl in f16: mean {mean:.3}/255, max {max:.3}/255 against diffusers' f32");
    assert!(mean <= 0.5 && max <= 3.0, "{mean} {max}");

    // An fp16-fix style VAE folder (`force_upcast: false`) decodes in f16.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-sdxl/vae");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\"force_upcast\": true"));
    std::fs::write(
        &cfg,
        text.replace("\"force_upcast\": true", "\"force_upcast\": false"),
    )
    .unwrap();
    let fixed = parts.with_vae_file(dir.path()).unwrap();
    let model = StableDiffusion::from_parts(&fixed, &Device::Cpu).unwrap();
    assert_eq!(model.vae.dtype(), DType::F16);
    let (mean, max) = image_diff(&image(&model, &lcm4_request(&model)), want);
    println!("tiny-sdxl in f16 with an f16 VAE: mean {mean:.3}/255, max {max:.3}/255");
    assert!(mean <= 0.5 && max <= 3.0, "{mean} {max}");
}

#[test]
fn asymmetric_unet_with_per_layer_depths_matches_diffusers() {
    // As SSD-1B and Segmind-Vega: transformer_layers_per_block [1, [1, 2], [2, 0]] with
    // reverse_transformer_layers_per_block [[0, 2, 1], [1, 0, 2], 1]; read from config.json alone.
    let r = refs("components");
    let cfg: UNet2DConditionConfig = load_json(&fixture("sdxl/asym-unet/config.json")).unwrap();
    assert!(cfg.transformer_layers_per_block.is_per_layer());
    assert_eq!(
        (
            cfg.down_transformer_layers(1, 1),
            cfg.down_transformer_layers(2, 1)
        ),
        (2, 0)
    );
    assert_eq!(
        (
            cfg.up_transformer_layers(0, 0),
            cfg.up_transformer_layers(1, 2)
        ),
        (0, 2)
    );
    let w = weights("sdxl", "asym-unet", "diffusion_pytorch_model.safetensors");
    let u = UNet2DConditionModel::new(&cfg, &w).unwrap();
    let added = fixture_added(&r);
    let out = run_unet(&u, &r, 999.0, None, Some(&added)).unwrap();
    assert_rel("asymmetric UNet out_t999", &out, &r["asym_unet.out_t999"]);

    let mut no_reverse = cfg.clone();
    no_reverse.reverse_transformer_layers_per_block = None;
    let err = UNet2DConditionModel::new(&no_reverse, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("reverse_transformer_layers_per_block"),
        "{err}"
    );
}

#[test]
fn real_sdxl_base_unet_config_parses() {
    // stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, verbatim (`upcast_attention: null`).
    let text = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
      "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
      "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
      "block_out_channels": [320, 640, 1280], "center_input_sample": false, "class_embed_type": null,
      "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
      "cross_attention_dim": 2048, "cross_attention_norm": null,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
      "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
      "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
      "resnet_skip_time_act": false, "resnet_time_scale_shift": "default", "sample_size": 128,
      "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
      "time_embedding_type": "positional", "timestep_post_act": null,
      "transformer_layers_per_block": [1, 2, 10],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
      "upcast_attention": null, "use_linear_projection": true}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    let cfg: UNet2DConditionConfig = load_json(&path).unwrap();
    assert!(!cfg.upcast_attention);
    assert_eq!(
        fewstep::weights::family::Family::of_unet(&cfg),
        fewstep::weights::family::Family::Sdxl
    );
    assert_eq!(
        (
            cfg.down_transformer_layers(2, 1),
            cfg.up_transformer_layers(0, 2),
            cfg.up_transformer_layers(1, 0)
        ),
        (10, 10, 2)
    );
    assert_eq!(cfg.heads(2), 20);
    // Every transformer block of the real UNet: 2·(2 + 10) down, 3·(10 + 2) up, 10 in the mid block.
    let map = fewstep::weights::single_file::unet_module_map(&cfg).unwrap();
    let blocks = map
        .iter()
        .filter(|(d, _)| d.ends_with("attn2.to_k"))
        .count();
    assert_eq!(blocks, 2 * (2 + 10) + 3 * (10 + 2) + 10);
}
