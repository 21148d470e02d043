//! Renders a grid of prompts of the toy world: for each prompt, the world's own picture of it (left)
//! beside the model's (right), scaled up 4×, and prints the numbered prompts. Used for the README's grid
//! and the 50-prompt judgement in docs/training.md.
//!
//!     cargo run --release -p fewstep --example world_grid -- MODEL_DIR OUT.png [COUNT] [COLS] [STYLE]
//!
//! Prompts: the captions of `world::dataset(2026, COUNT, 32, STYLE)` (STYLE `filled` or `outline`);
//! each image DDIM 25 steps, guidance 3 (the default model's), seed = its index.

use std::path::Path;

use candle_core::{DType, Device};
use fewstep::image::{tensor_to_images, write_png, RgbImage};
use fewstep::pipeline::StableDiffusion;
use fewstep::schedulers::SchedulerKind;
use fewstep::world::{dataset, Style};

const PROMPT_SEED: u64 = 2026;
const ZOOM: usize = 4;
const GAP: usize = 4;

/// Copies `img` scaled by `ZOOM` (nearest neighbour) into `canvas` at `(x0, y0)`.
fn blit(canvas: &mut RgbImage, img: &RgbImage, x0: usize, y0: usize) {
    for y in 0..img.height * ZOOM {
        for x in 0..img.width * ZOOM {
            let p = img.pixel(x / ZOOM, y / ZOOM);
            let i = ((y0 + y) * canvas.width + x0 + x) * 3;
            canvas.data[i..i + 3].copy_from_slice(&p);
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: world_grid MODEL_DIR OUT.png [COUNT] [COLS] [filled|outline]");
        std::process::exit(2);
    }
    let count: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let cols: usize = args.get(4).map_or(Ok(4), |s| s.parse())?;
    let style = match args.get(5).map(String::as_str) {
        Some("outline") => Style::Outline,
        _ => Style::Filled,
    };
    let model = StableDiffusion::load_dir(Path::new(&args[1]), DType::F32, &Device::Cpu)?;
    let side = model.native_size();
    let scenes = dataset(PROMPT_SEED, count, side, style);
    let cell_w = 2 * side * ZOOM + GAP;
    let cell_h = side * ZOOM + GAP;
    let rows = count.div_ceil(cols);
    let mut canvas = RgbImage::new(cols * cell_w, rows * cell_h);
    canvas.data.fill(255);
    for (i, (real, caption)) in scenes.iter().enumerate() {
        let mut req = model.request(caption, i as u64);
        req.scheduler = SchedulerKind::Ddim;
        req.steps = 25;
        req.guidance = 3.0;
        let out = model.generate(&req, &mut |_, _| {})?;
        let generated = &tensor_to_images(&out.decoded)?[0];
        let (x0, y0) = ((i % cols) * cell_w, (i / cols) * cell_h);
        blit(&mut canvas, real, x0, y0);
        blit(&mut canvas, generated, x0 + side * ZOOM, y0);
        println!("{}. {caption}", i + 1);
    }
    write_png(Path::new(&args[2]), &canvas, None)?;
    Ok(())
}
