//! The `fewstep` command line.

mod generate;
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
}

fn main() {
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
    };
    if let Err(e) = result {
        // One line: the error chain, without any backtrace a dependency attached.
        let msg = format!("{e:#}");
        eprintln!("error: {}", msg.lines().next().unwrap_or_default());
        std::process::exit(1);
    }
}
