//! The world classifier learns: a short training lowers its loss, and on held-out scenes it reads the
//! background far above chance (1 in 10); its labels of a scene are what the scene holds.

use candle_core::Device;
use fewstep::eval::classifier::{ClassifierConfig, ClassifierTrainer, Labels};
use fewstep::eval::score::{classify, score, Reference};
use fewstep::image::{images_to_tensor, RgbImage};
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

    // The scores built on it: real pictures are nearer real ones than flat grey pictures are, and the
    // adherence counts agreement with the asked labels.
    let reference = Reference::measure(&net, Style::Filled, 77, 200, 32, &Device::Cpu).unwrap();
    let real = &imgs[..100];
    let (_, found) = classify(&net, real, &Device::Cpu).unwrap();
    let real_scores = score(&net, &reference, real, &found, &Device::Cpu).unwrap();
    let mut grey = RgbImage::new(32, 32);
    grey.data.fill(128);
    let greys = vec![grey; 100];
    let grey_scores = score(&net, &reference, &greys, &found, &Device::Cpu).unwrap();
    eprintln!(
        "FID real {:.3}, grey {:.3}",
        real_scores.fid, grey_scores.fid
    );
    assert!(real_scores.fid < 0.5 * grey_scores.fid);
    assert_eq!(
        real_scores.adherence, 1.0,
        "a picture adheres to its own reading"
    );
    let shifted: Vec<Labels> = found
        .iter()
        .map(|l| Labels {
            background: (l.background + 1) % 10,
            ..l.clone()
        })
        .collect();
    let off = score(&net, &reference, real, &shifted, &Device::Cpu).unwrap();
    assert_eq!(off.adherence, 0.0, "every background asked is wrong");
    assert_eq!((real_scores.background, off.background), (1.0, 0.0));
    assert_eq!(off.outline_share, real_scores.outline_share);
    assert!(score(&net, &reference, real, &found[..10], &Device::Cpu)
        .err()
        .unwrap()
        .to_string()
        .contains("captions"));
}
