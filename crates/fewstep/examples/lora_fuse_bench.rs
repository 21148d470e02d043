//! Times opening a LoRA and fusing it into a model (no image generated).
//!
//!     cargo run -j1 -p fewstep --example lora_fuse_bench -- MODEL_DIR LORA.safetensors [f32|f16]

use std::time::Instant;

use candle_core::{DType, Device};
use fewstep::lora::{self, LoraFile};
use fewstep::weights::diffusers::DiffusersFolder;
use fewstep::weights::parts::ModelParts;

fn main() -> fewstep::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dtype = if args.get(3).map(String::as_str) == Some("f16") {
        DType::F16
    } else {
        DType::F32
    };
    let parts = ModelParts::from_folder(&DiffusersFolder::open(&args[1])?, dtype, &Device::Cpu)?;
    let t = Instant::now();
    let lora = LoraFile::open(&args[2])?;
    let open_s = t.elapsed().as_secs_f64();
    println!(
        "open: {open_s:.2} s ({} modules, {} parameters)",
        lora.modules.len(),
        lora.num_params()
    );
    let t = Instant::now();
    let (_fused, report) = lora::fuse(&parts, &[(lora, 1.0)])?;
    println!(
        "fuse: {:.2} s ({} layers, {} UNet modules)",
        t.elapsed().as_secs_f64(),
        report.layers,
        report.loras[0].unet
    );
    Ok(())
}
