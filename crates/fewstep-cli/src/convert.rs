//! `fewstep convert`: rewrites a diffusers pipeline folder's weights, or one `.safetensors` file (a LoRA),
//! in another storage dtype.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F16,
    Bf16,
    F32,
}

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers pipeline folder (with model_index.json), or one .safetensors file.
    input: PathBuf,
    /// The folder to write (created if missing), or the file for a file input.
    output: PathBuf,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
}

pub fn run(args: Args) -> Result<()> {
    let dtype = match args.dtype {
        DtypeArg::F16 => DType::F16,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F32 => DType::F32,
    };
    if args.input.is_file() {
        let n = fewstep::weights::convert::convert_file(&args.input, &args.output, dtype)?;
        eprintln!("{n} tensors as {dtype:?}");
        println!("{}", args.output.display());
        return Ok(());
    }
    let r = fewstep::weights::convert::convert_pipeline_folder(&args.input, &args.output, dtype)?;
    eprintln!(
        "{} tensors in {} files as {dtype:?}, {} other files copied",
        r.tensors, r.weight_files, r.copied
    );
    println!("{}", args.output.display());
    Ok(())
}
