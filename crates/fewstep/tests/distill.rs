//! Latent consistency distillation on tiny models: a few steps lower the loss for both variants, the
//! LCM-LoRA export round-trips bit-exactly and loads through fewstep's LoRA loader with every key matched,
//! the full LCM exports a pipeline that generates with the LCM scheduler, and a checkpoint resumes exactly
//! (the EMA target included).

mod common;

use candle_core::{Device, Tensor};
use common::training::{mean, tiny_teacher};
use fewstep::lora::LoraFile;
use fewstep::pipeline::StableDiffusion;
use fewstep::train::checkpoint::{load_checkpoint, save_checkpoint};
use fewstep::train::distill::{lora_param_names, student_unet_config, DistillConfig};
use fewstep::train::export::LORA_FILE;
use fewstep::train::{Preset, Sources, Stage, TrainConfig, Trainer};

fn distill_config(stage: Stage, teacher: &std::path::Path, steps: usize) -> TrainConfig {
    let d = DistillConfig {
        time_cond_proj_dim: 8,
        lora_rank: 4,
        lora_alpha: 8.0,
        ..DistillConfig::default()
    };
    let mut c = TrainConfig::preset(stage, Preset::Tiny);
    c.vae = fewstep::config::load_json(&teacher.join("vae/config.json")).unwrap();
    c.text_encoder =
        Some(fewstep::config::load_json(&teacher.join("text_encoder/config.json")).unwrap());
    let unet = fewstep::config::load_json(&teacher.join("unet/config.json")).unwrap();
    c.unet = Some(student_unet_config(&unet, stage == Stage::Lcm, &d));
    c.distill = Some(d);
    c.steps = steps;
    c.batch_size = 4;
    c.dataset_size = 32;
    c.optim.lr = 1e-3;
    c.seed = 5;
    c
}

fn sources(teacher: &std::path::Path) -> Sources {
    Sources {
        teacher: Some(teacher.to_path_buf()),
        ..Sources::default()
    }
}

fn lowers_the_loss(stage: Stage) {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 20);
    let steps = 30;
    let mut t = Trainer::new(
        distill_config(stage, &teacher, steps),
        &sources(&teacher),
        &Device::Cpu,
    )
    .unwrap();
    let losses: Vec<f32> = (0..steps).map(|_| t.train_step().unwrap()).collect();
    let (first, last) = (mean(&losses[..8]), mean(&losses[steps - 8..]));
    eprintln!("{stage:?} loss: first 8 steps {first:.5}, last 8 {last:.5}");
    assert!(last < 0.8 * first, "{stage:?} loss {first} → {last}");
}

#[test]
fn a_few_steps_lower_the_lcm_loss() {
    lowers_the_loss(Stage::Lcm);
}

#[test]
fn a_few_steps_lower_the_lcm_lora_loss() {
    lowers_the_loss(Stage::LcmLora);
}

#[test]
fn lcm_lora_export_round_trips_and_loads_with_every_key_matched() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 2);
    let mut t = Trainer::new(
        distill_config(Stage::LcmLora, &teacher, 3),
        &sources(&teacher),
        &Device::Cpu,
    )
    .unwrap();
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let out = dir.path().join("lora");
    t.export(&out).unwrap();
    let file = fewstep::weights::SafetensorsFile::open(out.join(LORA_FILE)).unwrap();
    let modules = &t.distill.as_ref().unwrap().lora_modules;
    assert!(modules.len() > 10);
    assert_eq!(file.tensors().len(), 3 * modules.len());
    for m in modules.keys() {
        let stem = format!("lora_unet_{}", m.replace('.', "_"));
        let (d, u) = lora_param_names(m);
        for (key, name) in [
            (format!("{stem}.lora_down.weight"), d),
            (format!("{stem}.lora_up.weight"), u),
        ] {
            let saved = file.load(&key, &Device::Cpu).unwrap();
            let ours = t.params.get(&name).unwrap().as_tensor().clone();
            let same = saved.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{key} differs from {name}");
        }
        let alpha: Tensor = file.load(&format!("{stem}.alpha"), &Device::Cpu).unwrap();
        assert_eq!(alpha.to_scalar::<f32>().unwrap(), 8.0);
    }
    // fewstep's own loader takes it as a kohya LoRA over diffusers names, every key matched.
    let lora = LoraFile::open(out.join(LORA_FILE)).unwrap();
    assert_eq!(lora.modules.len(), modules.len());
    let parts = fewstep::weights::parts::ModelParts::from_folder(
        &fewstep::weights::diffusers::DiffusersFolder::open(&teacher).unwrap(),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (_, report) = fewstep::lora::fuse(&parts, &[(lora, 1.0)]).unwrap();
    assert_eq!(report.loras[0].unet, modules.len());
}

#[test]
fn full_lcm_exports_a_pipeline_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_teacher(dir.path(), 2);
    let cfg = distill_config(Stage::Lcm, &teacher, 4);
    let src = sources(&teacher);
    // 4 steps straight, against 2 steps + checkpoint + resume + 2 steps.
    let mut a = Trainer::new(cfg.clone(), &src, &Device::Cpu).unwrap();
    for _ in 0..4 {
        a.train_step().unwrap();
    }
    let mut b = Trainer::new(cfg.clone(), &src, &Device::Cpu).unwrap();
    for _ in 0..2 {
        b.train_step().unwrap();
    }
    let ckpt = dir.path().join("ckpt.safetensors");
    save_checkpoint(&b, &ckpt).unwrap();
    let mut c = load_checkpoint(&ckpt, cfg, &src, &Device::Cpu).unwrap();
    for _ in 0..2 {
        c.train_step().unwrap();
    }
    let (ea, ec) = (&a.ema, &c.ema);
    assert_eq!(ea.len(), ec.len());
    for (k, t) in ea {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ec[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(x == y, "EMA {k} differs after resume");
    }
    for (k, v) in a.params.iter() {
        let w = c.params.get(k).unwrap();
        let same = v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{k} differs after resume");
    }
    let out = dir.path().join("lcm");
    a.export(&out).unwrap();
    let model = StableDiffusion::load_dir(&out, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(model.is_full_lcm());
    let req = model.request("a small red star", 0);
    let img = model.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(img.decoded.dims(), &[1, 3, 16, 16]);
}
