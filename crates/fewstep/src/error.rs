//! The library's error type. Every variant names the file, key or field at fault and what was expected,
//! so a one-line message is enough for a user to fix the input.

use std::path::PathBuf;

/// Errors raised by the fewstep library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.safetensors` file whose header or data is malformed (truncated, offsets past the end, bad JSON).
    #[error("{path}: not a valid .safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    /// A PyTorch pickle was offered; it is never executed.
    #[error("{path}: pickle files (.ckpt/.bin/.pt/.pth) are never loaded because they can run code; {hint}")]
    Pickle { path: PathBuf, hint: String },
    /// A `config.json` (or other JSON file) that does not parse into the expected structure.
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// A model folder lacks a part it needs.
    #[error("{path}: missing {what}")]
    Missing { path: PathBuf, what: String },
    /// A weight the model needs is absent from its files.
    #[error("{file}: missing tensor `{key}`")]
    MissingKey { file: String, key: String },
    /// A weight has another shape than the configuration implies.
    #[error("{file}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    Shape {
        file: String,
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A LoRA file that cannot be read or applied (unknown layout, unmatched keys, wrong shapes, NaN).
    #[error("LoRA {path}: {reason}")]
    Lora { path: PathBuf, reason: String },
    /// A user-facing argument outside its valid range.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Fetching from the Hugging Face Hub failed (offline, unknown repo, …).
    #[error("{0}")]
    Hub(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
