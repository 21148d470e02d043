//! `fewstep bench` on the tiny model: the JSON it writes, the operations it counts (against PyTorch's
//! own counter on the same model), and its refusals of bad arguments.

mod common;

use common::FIXTURES;
use serde_json::Value;

/// `torch.utils.flop_counter.FlopCounterMode` on diffusers' models of `tests/fixtures/tiny-sd` at 64×64
/// (latents 8×8), batch 1, 77 tokens: the text encoder, one UNet call, one VAE decode. Computed with
/// `tools/reference/bench_torch.py tests/fixtures/tiny-sd --size 64 --dtype f32 --stage text --stage unet
/// --stage vae`.
const TORCH_TEXT_FLOP: f64 = 1_438_976.0;
const TORCH_UNET_FLOP: f64 = 35_216_384.0;
const TORCH_VAE_FLOP: f64 = 306_202_624.0;

#[test]
fn bench_writes_timings_with_the_operations_pytorch_counts() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let taesd = format!("{FIXTURES}/taesd-tiny/diffusion_pytorch_model.safetensors");
    let stdout = common::ok(common::fewstep(&[
        "bench",
        &format!("{FIXTURES}/tiny-sd"),
        "--taesd",
        &taesd,
        "--size",
        "64",
        "--dtype",
        "f32",
        "--repeats",
        "2",
        "--matmul-size",
        "64",
        "--output",
        json.to_str().unwrap(),
    ]));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let stages = report["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["text", "unet", "vae", "image", "taesd", "image-taesd"],
        "{stdout}"
    );
    for s in stages {
        assert_eq!(s["times_s"].as_array().unwrap().len(), 2);
        assert!(s["median_s"].as_f64().unwrap() > 0.0);
        assert_eq!(s["size"], 64);
        assert_eq!(s["dtype"], "f32");
    }
    let gflop = |name: &str| {
        stages.iter().find(|s| s["stage"] == name).unwrap()["gflop"]
            .as_f64()
            .unwrap()
    };
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(gflop("unet") * 1e9, TORCH_UNET_FLOP) < 1e-9,
        "{}",
        gflop("unet")
    );
    assert!(
        rel(gflop("text") * 1e9, TORCH_TEXT_FLOP) < 1e-9,
        "{}",
        gflop("text")
    );
    // A whole picture is four UNet steps, a text encoding and a decode.
    assert!(
        rel(gflop("vae") * 1e9, TORCH_VAE_FLOP) < 1e-9,
        "{}",
        gflop("vae")
    );
    let picture = 4.0 * gflop("unet") + gflop("text") + gflop("vae");
    assert!(rel(gflop("image"), picture) < 1e-9);
    assert_eq!(report["matmul"][0]["n"], 64);
}

#[test]
fn bench_refuses_bad_arguments() {
    let model = format!("{FIXTURES}/tiny-sd");
    let fails = |args: &[&str]| {
        let out = common::fewstep(args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fails(&["bench", &model, "--size", "60"]);
    assert!(e.contains("size") && e.contains("60"), "{e}");
    let e = fails(&["bench", &model, "--stage", "taesd"]);
    assert!(e.contains("--taesd"), "{e}");
    let e = fails(&["bench", &model, "--repeats", "0"]);
    assert!(e.contains("repeats"), "{e}");
    let e = fails(&[
        "bench",
        &model,
        "--taesd",
        &format!("{model}/unet/config.json"),
    ]);
    assert!(e.contains("config.json"), "{e}");
}
