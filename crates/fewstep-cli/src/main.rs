//! The `fewstep` command line.

mod bench;
mod convert;
mod distill;
mod eval;
mod generate;
mod grid;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fewstep",
    version,
    about = "Few-step image generation with Latent Consistency Models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image (or image-to-image with --init-image).
    Generate(generate::Args),
    /// Train the VAE, or the text encoder and UNet, on the toy world (CPU; CUDA needs a cuda build).
    Train(train::Args),
    /// Distill a trained model into a full LCM or an LCM-LoRA (latent consistency distillation).
    Distill(distill::Args),
    /// Train the world classifier that `fewstep eval` measures with.
    TrainClassifier(eval::ClassifierArgs),
    /// Generate pictures of world captions and score them: FID on the classifier's features, prompt
    /// adherence, outline share, time per picture.
    Eval(eval::EvalArgs),
    /// Time text encoding, a UNet step, VAE and TAESD decoding and a whole LCM picture on this machine.
    Bench(bench::Args),
    /// Draw world captions beside a model's pictures of them (the README's grid, the 50-prompt sheet).
    Grid(grid::Args),
    /// Copy a diffusers pipeline folder with its weights stored in another dtype (f16 by default).
    Convert(convert::Args),
}

#[global_allocator]
static ALLOCATOR: fewstep::allocator::HugePages = fewstep::allocator::HugePages;

fn main() {
    fewstep::allocator::keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Distill(args) => distill::run(args),
        Command::TrainClassifier(args) => eval::train_classifier(args),
        Command::Eval(args) => eval::eval(args),
        Command::Grid(args) => grid::run(args),
    };
    if let Err(e) = result {
        // One line: the error chain, without any backtrace a dependency attached.
        let msg = format!("{e:#}");
        eprintln!("error: {}", msg.lines().next().unwrap_or_default());
        std::process::exit(1);
    }
}
