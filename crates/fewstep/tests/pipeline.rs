//! Whole pipelines against diffusers 0.42.1 (`tests/fixtures/reference/pipelines.*`): images within a mean
//! absolute difference of 0.5/255 and a maximum of 3/255 per pixel.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fewstep::image::{read_png, tensor_to_float_images};
use fewstep::pipeline::StableDiffusion;
use fewstep::schedulers::SchedulerKind;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs fixture case `name` through our pipeline and compares image and latents with diffusers'.
fn check_case(name: &str) {
    let root = fixtures();
    let case = &common::fixture_case("reference/pipelines.json", name);
    let refs =
        candle_core::safetensors::load(root.join("reference/pipelines.safetensors"), &Device::Cpu)
            .unwrap();

    let model = StableDiffusion::load_dir(
        &root.join(case["model"].as_str().unwrap()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut req = model.request(
        case["prompt"].as_str().unwrap(),
        case["seed"].as_u64().unwrap(),
    );
    req.scheduler = common::scheduler_kind(case["scheduler"].as_str().unwrap());
    req.negative_prompt = case["negative_prompt"].as_str().unwrap_or("").to_string();
    req.guidance = case["guidance_scale"].as_f64().unwrap();
    req.width = case["width"].as_u64().unwrap() as usize;
    req.height = case["height"].as_u64().unwrap() as usize;
    req.num_images = case["num_images_per_prompt"].as_u64().unwrap() as usize;
    // Our --steps is the number of UNet calls; StableDiffusionImg2ImgPipeline runs fewer than its
    // num_inference_steps, and the LCM schedule of that many calls is the same one.
    req.steps = case["n_unet_calls"].as_u64().unwrap() as usize;
    if let Some(s) = case["strength"].as_f64() {
        req.strength = s;
        req.init_image = Some(read_png(&root.join("reference/init64.png")).unwrap());
    }

    let mut calls = 0;
    let out = model.generate(&req, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, req.steps);

    let want_latents = &refs[&format!("{name}.latents")];
    let rel = max_abs(&(&out.latents - want_latents).unwrap()) / max_abs(want_latents);
    assert!(rel < 1e-3, "{name}: latents relative error {rel}");

    // diffusers' np image is NHWC in [0, 1], as ours after postprocessing.
    let ours: Vec<f32> = tensor_to_float_images(&out.decoded).unwrap().concat();
    let want = &refs[name];
    let ours = Tensor::from_vec(ours, want.dims(), &Device::Cpu).unwrap();
    let diff = ((&ours - want).unwrap().abs().unwrap() * 255.0).unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let max = max_abs(&diff);
    println!("{name}: mean |diff| {mean:.4}/255, max {max:.4}/255, latents rel {rel:.2e}");
    assert!(mean <= 0.5, "{name}: mean |diff| {mean}/255 > 0.5/255");
    assert!(max <= 3.0, "{name}: max |diff| {max}/255 > 3/255");
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lcm_4_steps_guidance_1() {
    check_case("lcm4");
}

#[test]
fn lcm_batch_of_two() {
    check_case("lcm4_batch2");
}

#[test]
fn full_lcm_guidance_embedding() {
    check_case("lcm_full");
}

#[test]
fn ddim_with_cfg_and_negative_prompt() {
    check_case("ddim_cfg");
}

#[test]
fn euler_with_cfg() {
    check_case("euler_cfg");
}

#[test]
fn dpm_solver_with_cfg() {
    check_case("dpmpp_cfg");
}

#[test]
fn img2img_full_lcm() {
    check_case("img2img");
}

#[test]
fn img2img_lcm_lora_recipe() {
    check_case("img2img_sd");
}

/// A list of prompts is one batch, as diffusers' `pipe(prompt=[…])`: prompt p's pictures are rows
/// `p·num_images ..`, and as the noise of the batch is one draw, the first prompt's pictures are those
/// of a generation of that prompt alone (DDIM with CFG: deterministic after the first draw).
#[test]
fn a_list_of_prompts_is_one_batch_in_order() {
    let model =
        StableDiffusion::load_dir(&fixtures().join("tiny-sd"), DType::F32, &Device::Cpu).unwrap();
    let mut req = model.request("a red circle", 7);
    req.scheduler = SchedulerKind::Ddim;
    req.steps = 3;
    req.guidance = 3.0;
    req.num_images = 2;
    let alone = model.generate(&req, &mut |_, _| {}).unwrap();
    let prompts = ["a red circle".to_string(), "a blue star".to_string()];
    let both = model
        .generate_prompts(&prompts, &req, &mut |_, _| {})
        .unwrap();
    assert_eq!(both.latents.dims()[0], 4);
    let first = both.latents.narrow(0, 0, 2).unwrap();
    let same = max_abs(&(&first - &alone.latents).unwrap());
    assert!(
        same < 1e-4,
        "first prompt's rows differ from its own run by {same}"
    );
    let other = max_abs(&(both.latents.narrow(0, 2, 2).unwrap() - &alone.latents).unwrap());
    assert!(other > 1e-2, "the second prompt changed nothing ({other})");
    let err = model
        .generate_prompts(&[], &req, &mut |_, _| {})
        .err()
        .unwrap();
    assert!(err.to_string().contains("prompts"), "{err}");
}
