//! Checkpoints that resume after a kill with nothing lost: one `.safetensors` file holding the parameters
//! (`param/<name>`), AdamW's moments (`adam_m/<name>`, `adam_v/<name>`), and in its metadata the step, the
//! optimiser's step count, the random stream's state and the run's config. It is written to a temporary
//! file and renamed over the previous one, so a failed write (disk full, read-only folder) leaves the
//! previous checkpoint intact.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::data::TrainRng;
use super::diffusion::{expected_shapes, first_difference, Sources, TrainConfig, Trainer};
use super::optim::AdamW;
use super::params::ParamStore;
use crate::weights::safetensors::write_safetensors;
use crate::weights::SafetensorsFile;
use crate::{Error, Result};

/// The checkpoint's file name in a run's output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The metadata key holding [`State`] as JSON.
const STATE_KEY: &str = "fewstep.train_state";

/// Config fields that may change between a run and its resume.
const MAY_CHANGE: [&str; 2] = ["steps", "checkpoint_every"];

/// What a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format_version: u32,
    pub step: usize,
    pub adam_t: usize,
    /// The run's random stream, as a decimal string (JSON numbers lose u64 precision in some readers).
    pub rng_state: String,
    pub config: TrainConfig,
}

/// Writes the trainer's complete state to `path` (atomically).
pub fn save_checkpoint(trainer: &Trainer, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in trainer.params.iter() {
        tensors.push((format!("param/{k}"), v.as_tensor().clone()));
    }
    for (k, m) in &trainer.opt.m {
        tensors.push((format!("adam_m/{k}"), m.clone()));
    }
    for (k, v) in &trainer.opt.v {
        tensors.push((format!("adam_v/{k}"), v.clone()));
    }
    for (k, t) in &trainer.ema {
        tensors.push((format!("ema/{k}"), t.clone()));
    }
    let state = State {
        format_version: 1,
        step: trainer.step,
        adam_t: trainer.opt.t,
        rng_state: trainer.rng.state().to_string(),
        config: trainer.config.clone(),
    };
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            STATE_KEY.to_string(),
            serde_json::to_string(&state).unwrap(),
        ),
    ]);
    write_safetensors(path, &tensors, &meta)
}

/// Reads a checkpoint's [`State`].
pub fn read_state(path: &Path) -> Result<State> {
    let file = SafetensorsFile::open(path)?;
    let text = file
        .metadata()
        .get(STATE_KEY)
        .ok_or_else(|| Error::Missing {
            path: path.to_path_buf(),
            what: format!("`{STATE_KEY}` metadata (not a fewstep training checkpoint)"),
        })?;
    serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: format!("checkpoint state: {e}"),
    })
}

/// Resumes the run saved at `path` under `config`, which must equal the checkpoint's (except `steps` and
/// `checkpoint_every`); otherwise a one-line error names the first differing field and both values.
pub fn load_checkpoint(
    path: &Path,
    config: TrainConfig,
    sources: &Sources,
    device: &candle_core::Device,
) -> Result<Trainer> {
    let state = read_state(path)?;
    let mut ours = serde_json::to_value(&config).unwrap();
    let mut theirs = serde_json::to_value(&state.config).unwrap();
    for k in MAY_CHANGE {
        ours.as_object_mut().unwrap().remove(k);
        theirs.as_object_mut().unwrap().remove(k);
    }
    if let Some((field, a, b)) = first_difference(&ours, &theirs, "") {
        return Err(Error::invalid(
            "resume",
            format!(
                "{} was written with another configuration: `{field}` is {b} there, {a} in this run",
                path.display()
            ),
        ));
    }
    let file = SafetensorsFile::open(path)?;
    let mut params = ParamStore::new(device);
    let mut m = BTreeMap::new();
    let mut v = BTreeMap::new();
    let mut ema = BTreeMap::new();
    let mut keys: Vec<&String> = file.tensors().keys().collect();
    keys.sort();
    for k in keys {
        let t = file.load(k, device)?.to_dtype(DType::F32)?;
        if let Some(name) = k.strip_prefix("param/") {
            params.insert(name, &t)?;
        } else if let Some(name) = k.strip_prefix("adam_m/") {
            m.insert(name.to_string(), t);
        } else if let Some(name) = k.strip_prefix("adam_v/") {
            v.insert(name.to_string(), t);
        } else if let Some(name) = k.strip_prefix("ema/") {
            ema.insert(name.to_string(), t);
        }
    }
    // The checkpoint must hold every parameter the config implies, each with its moments.
    for (k, shape) in expected_shapes(&config)? {
        let got = params.get(&k).ok_or_else(|| Error::MissingKey {
            file: path.display().to_string(),
            key: format!("param/{k}"),
        })?;
        if got.dims() != shape.as_slice() {
            return Err(Error::Shape {
                file: path.display().to_string(),
                key: format!("param/{k}"),
                expected: shape,
                got: got.dims().to_vec(),
            });
        }
    }
    let mut trainer = Trainer::with_params(config, sources, params, device)?;
    for k in trainer
        .params
        .iter()
        .map(|(k, _)| k.clone())
        .collect::<Vec<_>>()
    {
        for (name, map) in [("adam_m", &m), ("adam_v", &v)] {
            if !map.contains_key(&k) {
                return Err(Error::MissingKey {
                    file: path.display().to_string(),
                    key: format!("{name}/{k}"),
                });
            }
        }
    }
    if !trainer.ema.is_empty() {
        for k in trainer.ema.keys() {
            if !ema.contains_key(k) {
                return Err(Error::MissingKey {
                    file: path.display().to_string(),
                    key: format!("ema/{k}"),
                });
            }
        }
        trainer.ema = ema;
    }
    trainer.opt = AdamW {
        config: trainer.config.optim.clone(),
        t: state.adam_t,
        m,
        v,
    };
    trainer.step = state.step;
    trainer.rng = TrainRng::from_state(state.rng_state.parse().map_err(|_| Error::Config {
        path: path.to_path_buf(),
        reason: format!("checkpoint rng_state {:?} is not a u64", state.rng_state),
    })?);
    Ok(trainer)
}
