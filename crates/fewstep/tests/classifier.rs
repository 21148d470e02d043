//! The world classifier learns: a short training lowers its loss, and on held-out scenes it reads the
//! background far above chance (1 in 10); its labels of a scene are what the scene holds.

use candle_core::Device;
use fewstep::eval::classifier::{ClassifierConfig, ClassifierTrainer, Labels};
use fewstep::image::images_to_tensor;
use fewstep::world::{scenes, Style};

#[test]
fn labels_are_what_the_scene_holds() {
    for scene in scenes(3, 50, Style::Outline) {
        let l = Labels::of(&scene);
        assert!(l.outline);
        assert!(l.shapes.iter().any(|&x| x));
        assert!(l.shapes.iter().filter(|&&x| x).count() <= scene.objects.len());
        assert!(l.adheres(&l));
        let mut wrong = l.clone();
        wrong.background = (l.background + 1) % 10;
        assert!(!l.adheres(&wrong));
    }
}

#[test]
fn a_short_training_learns_the_background() {
    let cfg = ClassifierConfig {
        images_per_style: 200,
        side: 32,
        steps: 200,
        batch_size: 32,
        ..ClassifierConfig::default()
    };
    let steps = cfg.steps;
    let mut t = ClassifierTrainer::new(cfg, &Device::Cpu).unwrap();
    let losses: Vec<f32> = (0..steps).map(|_| t.step().unwrap()).collect();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..20]), mean(&losses[steps - 20..]));
    eprintln!("classifier loss {first:.3} → {last:.3}");
    assert!(last < 0.6 * first, "loss {first} → {last}");
    let net = t.classifier().unwrap();
    let held_out: Vec<_> = [Style::Filled, Style::Outline]
        .iter()
        .flat_map(|&s| scenes(1234, 100, s))
        .collect();
    let imgs: Vec<_> = held_out.iter().map(|s| s.render(32)).collect();
    let pred = net
        .predict(&images_to_tensor(&imgs, candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let n = held_out.len() as f32;
    let bg = held_out
        .iter()
        .zip(&pred)
        .filter(|(s, p)| Labels::of(s).background == p.background)
        .count() as f32
        / n;
    eprintln!("held-out background accuracy {bg:.2}");
    assert!(bg > 0.9, "background accuracy {bg}");
}
