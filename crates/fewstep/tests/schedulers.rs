//! Schedulers against diffusers 0.42.1 (fixtures made by `tools/reference/make_fixtures.py`): timesteps,
//! σs and init_noise_sigma exactly equal; step trajectories within relative error 1e-5.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use fewstep::config::SchedulerConfig;
use fewstep::rng::TorchGenerator;
use fewstep::schedulers::{build, ScheduleRequest, SchedulerKind};
use serde_json::Value;

fn reference(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/reference/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

struct Fixtures {
    json: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixtures() -> Fixtures {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(reference("schedulers.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(reference("scheduler_steps.safetensors"), &Device::Cpu)
            .unwrap();
    Fixtures { json, tensors }
}

fn kind_of(class: &str) -> SchedulerKind {
    match class {
        "LCMScheduler" => SchedulerKind::Lcm,
        "DDIMScheduler" => SchedulerKind::Ddim,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverPlusPlus,
        other => panic!("unknown class {other}"),
    }
}

/// The input config `from`, with `overrides` applied.
fn config(f: &Fixtures, from: &str, overrides: Option<&Value>) -> SchedulerConfig {
    let mut cfg = f.json["configs"][from].clone();
    if let Some(Value::Object(o)) = overrides {
        for (k, v) in o {
            cfg[k] = v.clone();
        }
    }
    serde_json::from_value(cfg).unwrap()
}

fn request(set: &Value) -> ScheduleRequest {
    ScheduleRequest {
        steps: set["num_inference_steps"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(0),
        strength: set["strength"].as_f64().unwrap_or(1.0),
        original_inference_steps: set["original_inference_steps"].as_u64().map(|v| v as usize),
        custom_timesteps: set["timesteps"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect()),
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Timesteps as float32: diffusers' Euler timesteps are float32 values, and serde_json's default float
/// parser may land one double away from the JSON's decimal, which rounding to float32 undoes.
fn as_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Distance in units in the last place between two finite float32 values of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// max|a − b| / max|b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    num / den.max(1e-30)
}

#[test]
fn timesteps_sigmas_and_errors_match_diffusers() {
    let f = fixtures();
    let mut n = 0;
    for case in f.json["timesteps"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = kind_of(case["class"].as_str().unwrap());
        let cfg = config(&f, case["from"].as_str().unwrap(), None);
        let req = request(&case["set_timesteps"]);
        let got = build(kind, &cfg, &req);
        if !case["error"].is_null() {
            assert!(
                got.is_err(),
                "{name}: diffusers raised `{}`, we did not",
                case["error"]
            );
            n += 1;
            continue;
        }
        let s = got.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            as_f32(s.timesteps()),
            as_f32(&f64s(&case["timesteps"])),
            "{name}: timesteps"
        );
        if kind != SchedulerKind::Euler {
            // Integer timesteps: equal as f64 too.
            assert_eq!(
                s.timesteps(),
                f64s(&case["timesteps"]).as_slice(),
                "{name}: timesteps"
            );
        }
        if let Some(sig) = case.get("sigmas").filter(|v| !v.is_null()) {
            // torch's float32 `sqrt` (MKL/VML on x86) is not correctly rounded: it differs from IEEE
            // `sqrt` by one unit in the last place for about a fifth of inputs, so σ is allowed 1 ulp.
            let want: Vec<f32> = f64s(sig).iter().map(|&v| v as f32).collect();
            let got = s.sigmas().expect("sigmas");
            assert_eq!(got.len(), want.len(), "{name}: sigmas length");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(ulps(*a, *b) <= 1, "{name}: sigma[{i}] {a} vs diffusers {b}");
            }
        }
        if let Some(ins) = case["init_noise_sigma"].as_f64() {
            let (a, b) = (s.init_noise_sigma() as f32, ins as f32);
            assert!(
                ulps(a, b) <= 1,
                "{name}: init_noise_sigma {a} vs diffusers {b}"
            );
        }
        n += 1;
    }
    assert!(n > 100, "only {n} cases");
}

#[test]
fn trajectories_match_diffusers() {
    let f = fixtures();
    for case in f.json["trajectories"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = kind_of(case["class"].as_str().unwrap());
        let cfg = config(
            &f,
            case["from"].as_str().unwrap(),
            case.get("config_overrides"),
        );
        let req = request(&case["set_timesteps"]);
        let mut s = build(kind, &cfg, &req).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            as_f32(s.timesteps()),
            as_f32(&f64s(&case["timesteps"])),
            "{name}: timesteps"
        );
        let mut rng = TorchGenerator::new(case["generator_seed"].as_u64().unwrap_or(0));
        let t = |k: &str| {
            f.tensors
                .get(&format!("{name}.{k}"))
                .unwrap_or_else(|| panic!("{name}.{k}"))
        };
        let mut x = t("x").clone();
        let timesteps = s.timesteps().to_vec();
        for (k, &ts) in timesteps.iter().enumerate() {
            let scaled = s.scale_model_input(&x, ts).unwrap();
            if let Some(want) = f.tensors.get(&format!("{name}.scaled{k}")) {
                let e = rel_err(&scaled, want);
                assert!(e <= 1e-5, "{name} step {k}: scaled input rel err {e}");
            }
            let prev = s.step(t(&format!("m{k}")), ts, &x, &mut rng).unwrap();
            if let Some(want) = f.tensors.get(&format!("{name}.denoised{k}")) {
                let e = rel_err(s.denoised().unwrap(), want);
                assert!(e <= 1e-5, "{name} step {k}: denoised rel err {e}");
            }
            let e = rel_err(&prev, t(&format!("prev{k}")));
            assert!(
                e <= 1e-5,
                "{name} step {k} (t = {ts}): prev_sample rel err {e}"
            );
            x = prev;
        }
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let f = fixtures();
    for case in f.json["add_noise"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = kind_of(case["class"].as_str().unwrap());
        let cfg = config(&f, case["from"].as_str().unwrap(), None);
        let s = build(kind, &cfg, &ScheduleRequest::new(4)).unwrap();
        let x = &f.tensors[&format!("{name}.x")];
        let noise = &f.tensors[&format!("{name}.noise")];
        for t in case["timesteps"].as_array().unwrap() {
            let t = t.as_u64().unwrap();
            let got = s.add_noise(x, noise, t as f64).unwrap();
            let e = rel_err(&got, &f.tensors[&format!("{name}.t{t}")]);
            assert!(e <= 1e-6, "{name} t={t}: rel err {e}");
        }
    }
}

#[test]
fn alphas_cumprod_matches_torch() {
    let f = fixtures();
    let want = f.tensors["alphas_cumprod.sd15"].to_vec1::<f32>().unwrap();
    let cfg = config(&f, "sd15_pndm", None);
    let r = fewstep::schedulers::ResolvedConfig::resolve(SchedulerKind::Ddim, &cfg).unwrap();
    let got = fewstep::schedulers::betas::alphas_cumprod(&r.noise).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "alphas_cumprod[{i}]: {a} vs torch {b}"
        );
    }
}

fn err_of(kind: SchedulerKind, req: ScheduleRequest) -> String {
    match build(kind, &SchedulerConfig::default(), &req) {
        Ok(_) => panic!("{kind} {req:?}: expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_requests_name_the_field() {
    use SchedulerKind::*;
    for kind in [Lcm, Ddim, Euler, DpmSolverPlusPlus] {
        let msg = err_of(kind, ScheduleRequest::new(0));
        assert!(msg.contains("steps"), "{msg}");
        for strength in [0.0, f64::NAN, -0.5, 1.5] {
            let msg = err_of(
                kind,
                ScheduleRequest {
                    strength,
                    ..ScheduleRequest::new(4)
                },
            );
            assert!(msg.contains("strength"), "{msg}");
        }
        // Too small to leave one step.
        let msg = err_of(
            kind,
            ScheduleRequest {
                strength: 0.01,
                ..ScheduleRequest::new(4)
            },
        );
        assert!(msg.contains("strength") || msg.contains("steps"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    let msg = err_of(Lcm, ScheduleRequest::new(51));
    assert!(msg.contains("steps") && msg.contains("50"), "{msg}");
    let msg = err_of(
        Lcm,
        ScheduleRequest {
            original_inference_steps: Some(30),
            ..ScheduleRequest::new(31)
        },
    );
    assert!(msg.contains("steps"), "{msg}");
}

#[test]
fn bad_configs_name_the_field() {
    let req = ScheduleRequest::new(4);
    for (field, value) in [
        ("prediction_type", "x"),
        ("beta_schedule", "cubic"),
        ("timestep_spacing", "random"),
    ] {
        let cfg: SchedulerConfig =
            serde_json::from_value(serde_json::json!({ field: value })).unwrap();
        for kind in [
            SchedulerKind::Lcm,
            SchedulerKind::Ddim,
            SchedulerKind::Euler,
            SchedulerKind::DpmSolverPlusPlus,
        ] {
            let msg = build(kind, &cfg, &req)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(msg.contains(field), "{kind} {field}: `{msg}`");
        }
    }
    let nan_start = SchedulerConfig {
        beta_start: Some(f64::NAN),
        ..Default::default()
    };
    let msg = build(SchedulerKind::Ddim, &nan_start, &req)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("beta_start"), "{msg}");
    let nan_scaling = SchedulerConfig {
        timestep_scaling: Some(f64::NAN),
        ..Default::default()
    };
    let msg = build(SchedulerKind::Lcm, &nan_scaling, &req)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("timestep_scaling"), "{msg}");
    let mut s = build(SchedulerKind::Lcm, &SchedulerConfig::default(), &req).unwrap();
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let msg = s
        .step(&x, f64::NAN, &x, &mut TorchGenerator::new(0))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("timestep"), "{msg}");
}

#[test]
fn scheduler_kind_parses() {
    for (s, k) in [
        ("lcm", SchedulerKind::Lcm),
        ("ddim", SchedulerKind::Ddim),
        ("euler", SchedulerKind::Euler),
        ("dpm++", SchedulerKind::DpmSolverPlusPlus),
    ] {
        assert_eq!(s.parse::<SchedulerKind>().unwrap(), k);
        assert_eq!(k.to_string(), s);
    }
    assert!("pndm"
        .parse::<SchedulerKind>()
        .unwrap_err()
        .to_string()
        .contains("scheduler"));
}

/// `use_karras_sigmas` (diffusers 0.42.1 values, from `/work/pyref` at the time of writing): DPM++'s
/// rounded timesteps exactly; σs within 1 ulp (torch's `sqrt`); Euler's fractional timesteps within
/// 2 ulp (numpy's float32 `log` is not correctly rounded either).
#[test]
#[allow(clippy::excessive_precision)]
fn karras_sigmas_match_diffusers() {
    let sd15: SchedulerConfig = serde_json::from_value(serde_json::json!({
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "steps_offset": 1, "use_karras_sigmas": true
    }))
    .unwrap();
    let s = build(
        SchedulerKind::DpmSolverPlusPlus,
        &sd15,
        &ScheduleRequest::new(10),
    )
    .unwrap();
    assert_eq!(
        s.timesteps(),
        &[999.0, 916.0, 815.0, 687.0, 523.0, 327.0, 146.0, 41.0, 7.0, 0.0]
    );
    let want = [
        14.614646911621094f32,
        9.102937698364258,
        5.478401184082031,
        3.1686110496520996,
        1.7494231462478638,
        0.9140765070915222,
        0.44692090153694153,
        0.20139986276626587,
        0.08191105723381042,
        0.02916753478348255,
        0.0,
    ];
    for (a, b) in s.sigmas().unwrap().iter().zip(&want) {
        assert!(ulps(*a, *b) <= 1, "{a} vs {b}");
    }
    let lin: SchedulerConfig =
        serde_json::from_value(serde_json::json!({ "use_karras_sigmas": true })).unwrap();
    let s = build(SchedulerKind::Euler, &lin, &ScheduleRequest::new(4)).unwrap();
    for (a, b) in s
        .timesteps()
        .iter()
        .zip(&[999.0f32, 775.1343383789062, 300.9902648925781, 0.0])
    {
        assert!(ulps(*a as f32, *b) <= 2, "{a} vs {b}");
    }
    let want = [
        157.4072723388672f32,
        21.10560417175293,
        1.2463603019714355,
        0.010001329705119133,
        0.0,
    ];
    for (a, b) in s.sigmas().unwrap().iter().zip(&want) {
        assert!(ulps(*a, *b) <= 1, "{a} vs {b}");
    }
}
