//! Timestep and guidance-scale embeddings of the UNet: the sinusoidal features (computed in f32 as
//! diffusers does, then cast to the model dtype) and the two-layer MLP that turns them into the
//! per-block conditioning vector.

use crate::models::nn::Linear;
use candle_core::{DType, Device, Tensor};

use super::resnet::Activation;
use crate::models::nn::{apply, linear};
use crate::weights::Weights;
use crate::{Error, Result};

/// `e^x` of an f32, correctly rounded (computed in f64), as torch's f32 `exp` gives in all but rare
/// last-bit cases.
fn exp_f32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// Sinusoidal timestep features, diffusers' `get_timestep_embedding` with `scale = 1`,
/// `max_period = 10000`, every step in f32 arithmetic:
///
/// `h = dim/2`, `f_i = exp(-ln(10000)·i / (h − freq_shift))`, `a_{n,i} = t_n·f_i`,
/// `e_n = [sin a_n, cos a_n]` (`[cos, sin]` when `flip_sin_to_cos`), zero-padded by one column when `dim`
/// is odd. Returns f32 `[len(timesteps), dim]`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| exp_f32((neg_log_period * i as f32) / denom))
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// The LCM guidance-scale embedding (diffusers' `get_guidance_scale_embedding`, VDM's
/// `get_timestep_embedding`), in f32 arithmetic then cast to `dtype`:
///
/// `w' = 1000·w`, `h = dim/2`, `f_i = exp(−i·ln(10000)/(h − 1))`, `e_n = [sin(w'_n f), cos(w'_n f)]`,
/// zero-padded by one column when `dim` is odd. Returns `[len(w), dim]`.
///
/// The pipeline passes `w = guidance_scale − 1`; this function takes `w` as given.
pub fn guidance_scale_embedding(
    w: &[f64],
    dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    // torch: log(tensor(10000.0)) / (half - 1), in f32.
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| exp_f32(i as f32 * -step)).collect();
    let mut data = Vec::with_capacity(w.len() * dim);
    for &wi in w {
        let wi = (wi as f32) * 1000.0;
        data.extend(freqs.iter().map(|f| (wi * f).sin()));
        data.extend(freqs.iter().map(|f| (wi * f).cos()));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (w.len(), dim), device)?.to_dtype(dtype)?)
}

/// diffusers' `TimestepEmbedding`: `y = linear_2(act(linear_1(x + cond_proj(c))))`, followed by
/// `post_act` when configured. `cond_proj` (no bias) exists when the UNet has `time_cond_proj_dim`.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// `w` is the `time_embedding` view; `in_dim` the sinusoid width, `out_dim` the embedding width.
    pub fn new(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(linear(&w.pp("cond_proj"), d, in_dim, false)?),
            None => None,
        };
        Ok(Self {
            linear_1: linear(&w.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: linear(&w.pp("linear_2"), out_dim, out_dim, true)?,
            cond_proj,
            act,
            post_act,
        })
    }

    /// Whether the embedding takes a condition (`timestep_cond`).
    pub fn has_cond_proj(&self) -> bool {
        self.cond_proj.is_some()
    }

    /// `x: [B, in_dim]`, `cond: [B, cond_proj_dim]` (ignored if the layer has no `cond_proj`, as diffusers
    /// would fail; callers check first). Returns `[B, out_dim]`.
    pub fn forward(&self, x: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let x = match (cond, &self.cond_proj) {
            (Some(c), Some(p)) => (x + apply(p, c)?)?,
            _ => x.clone(),
        };
        let x = self.act.forward(&apply(&self.linear_1, &x)?)?;
        let x = apply(&self.linear_2, &x)?;
        match &self.post_act {
            Some(a) => a.forward(&x),
            None => Ok(x),
        }
    }
}

/// SDXL's micro-conditioning, the inputs of the `text_time` addition embedding: the pooled, projected
/// prompt embedding of the second text encoder and the six size numbers `(original h, w, crop top, left,
/// target h, w)` (diffusers' `added_cond_kwargs = {"text_embeds", "time_ids"}`).
#[derive(Debug, Clone)]
pub struct TextTimeCond {
    /// `[B, projection_dim]`.
    pub text_embeds: Tensor,
    /// `[B, N]` f32 (N = 6 for SDXL).
    pub time_ids: Tensor,
}

/// diffusers' `text_time` addition embedding (`add_time_proj` + `add_embedding`):
/// `aug = add_embedding(cat[text_embeds, sinusoid(time_ids)])`, where each of the `N` time ids gets the
/// `addition_time_embed_dim`-wide sinusoid of [`timestep_embedding`] (same flip and shift as the
/// timestep) and a row's `N` sinusoids are laid side by side; `add_embedding` is a
/// [`TimestepEmbedding`] with SiLU. The UNet adds `aug` to the timestep embedding.
pub struct TextTimeEmbedding {
    embedding: TimestepEmbedding,
    time_dim: usize,
    in_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl TextTimeEmbedding {
    /// `w` is the UNet root (weights under `add_embedding`); `in_dim` is
    /// `projection_class_embeddings_input_dim`, `out_dim` the timestep embedding's width.
    pub fn new(
        w: &Weights,
        time_dim: usize,
        in_dim: usize,
        out_dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
    ) -> Result<Self> {
        Ok(Self {
            embedding: TimestepEmbedding::new(
                &w.pp("add_embedding"),
                in_dim,
                out_dim,
                Activation::Silu,
                None,
                None,
            )?,
            time_dim,
            in_dim,
            flip_sin_to_cos,
            freq_shift,
        })
    }

    /// `[B, out_dim]` in `dtype`; the widths must add up to `projection_class_embeddings_input_dim`.
    pub fn forward(&self, cond: &TextTimeCond, batch: usize, dtype: DType) -> Result<Tensor> {
        let (b, n) = cond.time_ids.dims2()?;
        let (bt, p) = cond.text_embeds.dims2()?;
        if b != batch || bt != batch {
            return Err(Error::invalid(
                "added_cond",
                format!("text_embeds has {bt} rows and time_ids {b}, the batch is {batch}"),
            ));
        }
        if p + n * self.time_dim != self.in_dim {
            return Err(Error::invalid(
                "added_cond",
                format!(
                    "text_embeds ({p}) + {n} time ids × {} = {} values, but the UNet's \
                     projection_class_embeddings_input_dim is {}",
                    self.time_dim,
                    p + n * self.time_dim,
                    self.in_dim
                ),
            ));
        }
        let ids: Vec<f64> = cond
            .time_ids
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let device = cond.time_ids.device();
        let time = timestep_embedding(
            &ids,
            self.time_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            device,
        )?
        .reshape((b, n * self.time_dim))?;
        let x =
            Tensor::cat(&[&cond.text_embeds.to_dtype(DType::F32)?, &time], 1)?.to_dtype(dtype)?;
        self.embedding.forward(&x, None)
    }
}
