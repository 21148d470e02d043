//! PNG I/O and image ↔ tensor conversion.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fewstep::image::{
    images_to_tensor, read_parameters, read_png, tensor_to_float_images, tensor_to_images,
    write_png, RgbImage,
};

/// A path in a folder of this test's own (tests run in parallel; a shared folder would see the others'
/// temporary files).
fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("image-test-dirs")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn gradient(w: usize, h: usize) -> RgbImage {
    let mut img = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            img.data[i] = (x * 255 / (w - 1)) as u8;
            img.data[i + 1] = (y * 255 / (h - 1)) as u8;
            img.data[i + 2] = ((x + y) * 7 % 256) as u8;
        }
    }
    img
}

#[test]
fn png_round_trip_with_parameters() {
    let img = gradient(17, 9);
    let params = "a photo of a cat\nSteps: 4, Sampler: LCM, CFG scale: 1, Seed: 42, Size: 17x9";
    let path = tmp("roundtrip.png");
    write_png(&path, &img, Some(params)).unwrap();
    assert_eq!(read_png(&path).unwrap(), img);
    assert_eq!(read_parameters(&path).unwrap().as_deref(), Some(params));

    // Non-Latin-1 text goes into an iTXt chunk and comes back the same.
    let unicode = "猫 🐱 — naïve";
    write_png(&path, &img, Some(unicode)).unwrap();
    assert_eq!(read_parameters(&path).unwrap().as_deref(), Some(unicode));

    write_png(&path, &img, None).unwrap();
    assert_eq!(read_parameters(&path).unwrap(), None);
    // No temporary files left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn reads_other_color_types() {
    let path = tmp("reference_init64.png");
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/init64.png");
    let img = read_png(&src).unwrap();
    assert_eq!(img.data.len(), img.width * img.height * 3);

    // Encode RGBA, gray, gray+alpha, 16-bit RGB and palette with the png crate directly, read as RGB8.
    let (w, h) = (5usize, 3usize);
    let rgb = gradient(w, h);
    let write =
        |color: png::ColorType, depth: png::BitDepth, data: &[u8], palette: Option<Vec<u8>>| {
            let file = std::fs::File::create(&path).unwrap();
            let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
            enc.set_color(color);
            enc.set_depth(depth);
            if let Some(p) = palette {
                enc.set_palette(p);
            }
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(data).unwrap();
            wr.finish().unwrap();
            read_png(&path).unwrap()
        };
    let rgba: Vec<u8> = rgb
        .data
        .chunks(3)
        .flat_map(|p| [p[0], p[1], p[2], 77])
        .collect();
    assert_eq!(
        write(png::ColorType::Rgba, png::BitDepth::Eight, &rgba, None),
        rgb
    );

    let gray: Vec<u8> = (0..w * h).map(|i| (i * 17) as u8).collect();
    let gray_rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    assert_eq!(
        write(png::ColorType::Grayscale, png::BitDepth::Eight, &gray, None).data,
        gray_rgb
    );
    let gray_alpha: Vec<u8> = gray.iter().flat_map(|&g| [g, 200]).collect();
    assert_eq!(
        write(
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Eight,
            &gray_alpha,
            None
        )
        .data,
        gray_rgb
    );
    let rgb16: Vec<u8> = rgb.data.iter().flat_map(|&v| [v, 0x5a]).collect();
    assert_eq!(
        write(png::ColorType::Rgb, png::BitDepth::Sixteen, &rgb16, None),
        rgb
    );
    let palette = vec![255, 0, 0, 0, 255, 0, 0, 0, 255];
    let idx: Vec<u8> = (0..w * h).map(|i| (i % 3) as u8).collect();
    let pal_img = write(
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        &idx,
        Some(palette.clone()),
    );
    let want: Vec<u8> = idx
        .iter()
        .flat_map(|&i| palette[i as usize * 3..i as usize * 3 + 3].to_vec())
        .collect();
    assert_eq!(pal_img.data, want);
}

#[test]
fn truncated_png_names_the_file() {
    let path = tmp("full.png");
    write_png(&path, &gradient(32, 32), Some("x")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp("truncated.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_png(&cut).unwrap_err().to_string();
    assert!(err.contains("truncated.png"), "{err}");
    let garbage = tmp("garbage.png");
    std::fs::write(&garbage, b"not a png at all").unwrap();
    let err = read_png(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.png"), "{err}");
    let err = read_png(&tmp("does-not-exist.png"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does-not-exist.png"), "{err}");
}

#[test]
fn write_into_missing_directory_fails_cleanly() {
    let dir = tmp("no-such-dir");
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("out.png");
    let err = write_png(&path, &gradient(4, 4), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out.png"), "{err}");
    assert!(!path.exists());
    assert!(!dir.exists());
}

#[test]
fn tensor_conversion_matches_diffusers_arithmetic() {
    // Out-of-range values clamp; 0.0, -0.49411762 and -0.48627448 give exact ties (x/2+0.5)*255 = 127.5,
    // 64.5, 65.5 in f32, which numpy's round sends to the even neighbour.
    let vals: Vec<f32> = vec![
        -1.5,
        -1.0,
        -0.5,
        0.0,
        0.5,
        1.0,
        1.5,
        -0.494_117_62,
        -0.486_274_48,
    ];
    let n = vals.len();
    let mut data = Vec::new();
    for c in 0..3 {
        data.extend(vals.iter().map(|v| v * (1.0 - 0.1 * c as f32)));
    }
    let t = Tensor::from_vec(data.clone(), (1, 3, 1, n), &Device::Cpu).unwrap();
    let imgs = tensor_to_images(&t).unwrap();
    let floats = tensor_to_float_images(&t).unwrap();
    assert_eq!(imgs.len(), 1);
    assert_eq!((imgs[0].width, imgs[0].height), (n, 1));
    for x in 0..n {
        for c in 0..3 {
            let v = data[c * n + x];
            let f = (v * 0.5 + 0.5).clamp(0.0, 1.0);
            assert_eq!(floats[0][x * 3 + c], f);
            assert_eq!(imgs[0].pixel(x, 0)[c], (f * 255.0).round_ties_even() as u8);
        }
    }
    // Channel 0 as numpy computes `((t / 2 + 0.5).clamp(0, 1) * 255).round().astype(uint8)`.
    let red: Vec<u8> = (0..n).map(|x| imgs[0].pixel(x, 0)[0]).collect();
    assert_eq!(red, [0, 0, 64, 128, 191, 255, 255, 64, 66]);

    // images → tensor → images is exact.
    let img = gradient(6, 4);
    let t = images_to_tensor(&[img.clone(), img.clone()], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 4, 6]);
    let v = t
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(1)
        .unwrap()
        .get(5)
        .unwrap();
    let want = 2.0 * (img.pixel(5, 1)[0] as f32 / 255.0) - 1.0;
    assert_eq!(v.to_scalar::<f32>().unwrap(), want);
    assert_eq!(
        tensor_to_images(&t).unwrap(),
        vec![img.clone(), img.clone()]
    );
    assert!(images_to_tensor(&[img, gradient(4, 4)], DType::F32, &Device::Cpu).is_err());
}
