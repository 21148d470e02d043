//! Training data from the toy [`world`](crate::world): the images as `[-1, 1]` tensors, the captions as
//! CLIP token ids, and the random draws of a training run (batch indices, caption dropout, Gaussian noise,
//! timesteps) from one small generator whose state is a single `u64`, so a checkpoint saves it exactly.

use candle_core::{Device, Tensor};

use crate::image::images_to_tensor;
use crate::tokenizer::ClipTokenizer;
use crate::world::{self, Style};
use crate::{Error, Result};

/// The random stream of a training run (SplitMix64): batch indices, caption dropout, noise, timesteps.
/// Its whole state is [`TrainRng::state`], restored by [`TrainRng::from_state`].
#[derive(Debug, Clone)]
pub struct TrainRng {
    state: u64,
}

impl TrainRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The generator's state (for a checkpoint).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator continuing from a saved [`state`](Self::state).
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// SplitMix64 (Steele et al. 2014), the same generator as [`world::SceneRng`].
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (by the high bits).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform in `[0, 1)` from the 53 high bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box–Muller (one value per pair of uniforms).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` standard normal values (f32).
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// A standard normal tensor of `shape`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n), shape, device)?)
    }
}

/// A world dataset held in memory: images as one `[N, 3, side, side]` f32 tensor in `[-1, 1]`, captions
/// and their token ids.
pub struct WorldData {
    pub images: Tensor,
    pub captions: Vec<String>,
    /// `[N, max_length]` ids of the captions; the empty caption's ids are `empty_ids`.
    pub ids: Vec<Vec<u32>>,
    pub empty_ids: Vec<u32>,
    pub side: usize,
}

/// One batch: images `[B, 3, side, side]`, token ids `[B, max_length]` (u32, some captions dropped to ""),
/// and which dataset rows it holds.
pub struct Batch {
    pub images: Tensor,
    pub ids: Tensor,
    pub rows: Vec<usize>,
    /// `rows` as a u32 tensor, for `index_select` on per-row data.
    pub index: Tensor,
    pub dropped: Vec<bool>,
}

impl WorldData {
    /// `n` scenes of `world::dataset(seed, n, side, style)`; `n` must be positive. Captions are tokenized
    /// with `tokenizer` when given (the UNet stage), otherwise left as text (the VAE stage).
    pub fn new(
        seed: u64,
        n: usize,
        side: usize,
        style: Style,
        tokenizer: Option<&ClipTokenizer>,
        device: &Device,
    ) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("dataset size", "must be at least 1 (got 0)"));
        }
        if side == 0 {
            return Err(Error::invalid("image size", "must be at least 1 (got 0)"));
        }
        let scenes = world::dataset(seed, n, side, style);
        let (imgs, captions): (Vec<_>, Vec<_>) = scenes.into_iter().unzip();
        let images = images_to_tensor(&imgs, candle_core::DType::F32, device)?;
        let (ids, empty_ids) = match tokenizer {
            Some(t) => (
                captions
                    .iter()
                    .map(|c| t.encode(c))
                    .collect::<Result<Vec<_>>>()?,
                t.encode("")?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Self {
            images,
            captions,
            ids,
            empty_ids,
            side,
        })
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Draws a batch of `b` rows uniformly with replacement; with tokenized captions, each caption is
    /// replaced by the empty one with probability `drop_prob` (classifier-free guidance training). The
    /// draws, in order: per row its index, then (with tokens) one uniform for the dropout.
    pub fn batch(&self, b: usize, drop_prob: f64, rng: &mut TrainRng) -> Result<Batch> {
        let mut rows = Vec::with_capacity(b);
        let mut dropped = Vec::with_capacity(b);
        let mut ids = Vec::new();
        for _ in 0..b {
            let r = rng.below(self.len());
            rows.push(r);
            if !self.ids.is_empty() {
                let drop = rng.uniform() < drop_prob;
                dropped.push(drop);
                ids.extend_from_slice(if drop { &self.empty_ids } else { &self.ids[r] });
            }
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            b,
            self.images.device(),
        )?;
        let images = self.images.index_select(&idx, 0)?;
        let ids = if self.ids.is_empty() {
            Tensor::zeros((b, 0), candle_core::DType::U32, self.images.device())?
        } else {
            let l = self.empty_ids.len();
            Tensor::from_vec(ids, (b, l), self.images.device())?
        };
        Ok(Batch {
            images,
            ids,
            rows,
            index: idx,
            dropped,
        })
    }
}
