//! The toy world: deterministic per seed, and its pictures show what its captions say.

use fewstep::world::{dataset, Scene, SceneRng, Style, COLOURS};

fn pixel(img: &fewstep::image::RgbImage, x: f32, y: f32) -> [u8; 3] {
    let (px, py) = (
        (x * img.width as f32) as usize,
        (y * img.height as f32) as usize,
    );
    img.pixel(px, py)
}

#[test]
fn same_seed_same_data_other_seed_other_data() {
    let a = dataset(7, 20, 64, Style::Filled);
    let b = dataset(7, 20, 64, Style::Filled);
    let c = dataset(8, 20, 64, Style::Filled);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn filled_pictures_show_the_captioned_colours_where_the_caption_puts_them() {
    let mut rng = SceneRng::new(1);
    for _ in 0..300 {
        let scene = Scene::random(&mut rng, Style::Filled);
        let img = scene.render(64);
        let caption = scene.caption();
        assert!(caption.ends_with(&format!("on a {} background", scene.background.name)));
        // The image corner is background; each object's centre pixel is the object's colour.
        assert_eq!(img.pixel(0, 0), scene.background.rgb, "{caption}");
        for o in &scene.objects {
            let (x, y) = o.position.centre();
            assert_eq!(pixel(&img, x, y), o.colour.rgb, "{caption}");
            let phrase = format!("{} {} {}", o.size.name(), o.colour.name, o.shape.name());
            assert!(caption.contains(&phrase), "{caption} lacks {phrase}");
            assert_ne!(o.colour, scene.background, "{caption}");
        }
        assert!((1..=2).contains(&scene.objects.len()));
    }
}

#[test]
fn every_shape_colour_size_and_position_occurs() {
    let data = dataset(3, 2000, 32, Style::Filled);
    for word in [
        "circle",
        "square",
        "triangle",
        "star",
        "small",
        "large",
        "top left",
        "bottom right",
        " and ",
    ] {
        assert!(
            data.iter().any(|(_, c)| c.contains(word)),
            "{word} never drawn"
        );
    }
    for c in COLOURS {
        assert!(
            data.iter().any(|(_, cap)| cap.contains(c.name)),
            "{} never used",
            c.name
        );
    }
}

#[test]
fn outline_style_draws_the_same_scene_with_less_ink() {
    let mut rng_a = SceneRng::new(5);
    let mut rng_b = SceneRng::new(5);
    for _ in 0..50 {
        let filled = Scene::random(&mut rng_a, Style::Filled);
        let outline = Scene::random(&mut rng_b, Style::Outline);
        assert_eq!(filled.objects, outline.objects);
        assert_eq!(filled.caption(), outline.caption());
        let (fi, oi) = (filled.render(64), outline.render(64));
        let ink = |img: &fewstep::image::RgbImage| {
            img.data
                .chunks(3)
                .filter(|p| *p != filled.background.rgb.as_slice())
                .count()
        };
        let (f, o) = (ink(&fi), ink(&oi));
        assert!(
            o > f / 5 && o < f,
            "outline ink {o} vs filled {f}: {}",
            filled.caption()
        );
    }
}

#[test]
fn anti_aliased_edges_blend_shape_and_background() {
    let mut rng = SceneRng::new(11);
    let scene = Scene::random(&mut rng, Style::Filled);
    let img = scene.render(64);
    let o = scene.objects[0];
    let blended = img
        .data
        .chunks(3)
        .any(|p| p != scene.background.rgb.as_slice() && p != o.colour.rgb.as_slice());
    assert!(blended, "no intermediate pixels: {}", scene.caption());
}
