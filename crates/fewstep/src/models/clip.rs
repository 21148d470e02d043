//! The CLIP text encoder (transformers' `CLIPTextModel`): token + position embeddings, pre-LayerNorm
//! transformer layers with causal self-attention, a final LayerNorm, and the pooled EOS-position output;
//! with `text_projection` it is `CLIPTextModelWithProjection` (SDXL's second encoder, OpenCLIP ViT-bigG).
//!
//! Weight keys are read either under `text_model.` (SD1.x folders, transformers 4.x) or without that prefix
//! (transformers 5.x saves so); which one is detected from the keys.

use crate::models::nn::Linear;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

use crate::config::ClipTextConfig;
use crate::kernels::attention::{multi_head_attention, Mask};
use crate::models::nn;
use crate::models::nn::LayerNorm;
use crate::weights::Weights;
use crate::{Error, Result};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// `x · σ(1.702 x)` (OpenAI CLIP, SD1.x).
    QuickGelu,
    /// `x · Φ(x)` with the exact erf (OpenCLIP, SD2.x).
    GeluErf,
    /// tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(Error::invalid(
                "text_encoder hidden_act",
                format!(
                    "{other:?} is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"
                ),
            )),
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu if x.dtype() == DType::BF16 && x.device().is_cpu() && !x.track_op() => {
                crate::kernels::quick_gelu::quick_gelu(x)?
            }
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
        })
    }
}

/// Multi-head self-attention with separate q/k/v projections and an output projection.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, w: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::invalid(
                "text_encoder num_attention_heads",
                format!("{heads} does not divide hidden_size {d}"),
            ));
        }
        let head_dim = d / heads;
        Ok(Self {
            q_proj: nn::linear(&w.pp("q_proj"), d, d, true)?,
            k_proj: nn::linear(&w.pp("k_proj"), d, d, true)?,
            v_proj: nn::linear(&w.pp("v_proj"), d, d, true)?,
            out_proj: nn::linear(&w.pp("out_proj"), d, d, true)?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x: [B, L, D]` → `[B, L, D]`, token `i` attending to tokens `0..=i`. Scores and softmax in f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let causal = Some(Mask::Causal);
        let out = multi_head_attention(&q, &k, &v, self.heads, self.scale, causal, false)?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// One pre-LayerNorm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, w: &Weights, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: nn::layer_norm(&w.pp("layer_norm1"), d, eps)?,
            self_attn: ClipAttention::new(cfg, &w.pp("self_attn"))?,
            layer_norm2: nn::layer_norm(&w.pp("layer_norm2"), d, eps)?,
            fc1: nn::linear(&w.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true)?,
            fc2: nn::linear(&w.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(x)?)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.apply(&h)?)?;
        Ok((x + h)?)
    }
}

/// The outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `[B, L, D]`: the last layer's output after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `[B, L, D]`: the second-to-last layer's output (`hidden_states[-2]`), *not* passed through
    /// `final_layer_norm` — what SDXL reads (for a one-layer model, the embeddings); `None` only for a model
    /// with no layers.
    pub penultimate: Option<Tensor>,
    /// `[B, D]`: `last_hidden_state` at each sequence's EOS position.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` (the `text_model` of SD's `text_encoder`).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias): pooled → `text_embeds`.
    text_projection: Option<Linear>,
    eos_token_id: Option<u32>,
    max_positions: usize,
    dtype: DType,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model from its config and weights; keys are found under `text_model.` or at the top
    /// level of `w`, whichever holds `embeddings.token_embedding.weight`. Every tensor's shape is checked
    /// against the config. The model computes in `w.dtype()`.
    pub fn new(config: &ClipTextConfig, w: &Weights) -> Result<Self> {
        Self::build(config, w, false)
    }

    /// transformers' `CLIPTextModelWithProjection`: as [`ClipTextModel::new`] plus `text_projection.weight`
    /// `[projection_dim, hidden_size]` at the root of `w`.
    pub fn with_projection(config: &ClipTextConfig, w: &Weights) -> Result<Self> {
        Self::build(config, w, true)
    }

    fn build(config: &ClipTextConfig, w: &Weights, projection: bool) -> Result<Self> {
        let text_projection = if projection {
            Some(nn::linear(
                &w.pp("text_projection"),
                config.hidden_size,
                config.projection_dim,
                false,
            )?)
        } else {
            None
        };
        let act = Activation::parse(&config.hidden_act)?;
        let w = if w.contains("text_model.embeddings.token_embedding.weight") {
            w.pp("text_model")
        } else {
            w.clone()
        };
        let d = config.hidden_size;
        let emb = w.pp("embeddings");
        let token_embedding = Embedding::new(
            emb.pp("token_embedding")
                .get((config.vocab_size, d), "weight")?,
            d,
        );
        let position_embedding = emb
            .pp("position_embedding")
            .get((config.max_position_embeddings, d), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(config, &w.pp("encoder.layers").pp(i), act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = nn::layer_norm(&w.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            eos_token_id: config.eos_token_id,
            max_positions: config.max_position_embeddings,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token + position embeddings of `ids: [B, L]` (u32) → `[B, L, D]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (_b, l) = ids.dims2()?;
        if l > self.max_positions {
            return Err(Error::invalid(
                "token ids",
                format!(
                    "sequence length {l} exceeds the text encoder's max_position_embeddings {}",
                    self.max_positions
                ),
            ));
        }
        let ids = ids.to_dtype(DType::U32)?;
        let vocab = self.token_embedding.embeddings().dim(0)?;
        if l > 0 {
            let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
            if max_id >= vocab {
                return Err(Error::invalid(
                    "token ids",
                    format!("id {max_id} is outside the text encoder's vocabulary of {vocab}"),
                ));
            }
        }
        let tok = self.token_embedding.forward(&ids)?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// Runs the embeddings and the first `n` layers; returns the output of layer `n` (`hidden_states[n]`,
    /// where `hidden_states[0]` is the embeddings), and `hidden_states[j]` for `keep = Some(j)`, `j ≤ n`.
    fn run(&self, ids: &Tensor, n: usize, keep: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
        let mut x = self.embed(ids)?;
        let mut kept = None;
        for (i, layer) in self.layers.iter().take(n).enumerate() {
            if keep == Some(i) {
                kept = Some(x.clone());
            }
            x = layer.forward(&x)?;
        }
        if keep == Some(n) {
            kept = Some(x.clone());
        }
        Ok((x, kept))
    }

    /// `k` skipped layers must leave at least the embeddings.
    fn check_skip(&self, k: usize, extra: usize) -> Result<()> {
        if k + extra > self.layers.len() {
            return Err(Error::invalid(
                "clip_skip",
                format!(
                    "{k} skips more layers than the text encoder has ({})",
                    self.layers.len()
                ),
            ));
        }
        Ok(())
    }

    /// Prompt embeddings `[B, L, D]` for `ids: [B, L]` with diffusers' `encode_prompt` semantics:
    /// `clip_skip = None` → `last_hidden_state` (last layer, then `final_layer_norm`); `Some(k)` →
    /// `hidden_states[-(k + 1)]` (the output of layer `num_layers - k`; `hidden_states[0]` being the
    /// embeddings) passed through `final_layer_norm`. Layers past the one read are not run.
    pub fn encode(&self, ids: &Tensor, clip_skip: Option<usize>) -> Result<Tensor> {
        let k = clip_skip.unwrap_or(0);
        self.check_skip(k, 0)?;
        let (h, _) = self.run(ids, self.layers.len() - k, None)?;
        Ok(self.final_layer_norm.forward(&h)?)
    }

    /// `last_hidden_state: [B, L, D]` at each row's pooled position (see [`eos_positions`]) → `[B, D]`.
    fn pool(&self, ids: &Tensor, last_hidden_state: &Tensor) -> Result<Tensor> {
        let positions = eos_positions(ids, self.eos_token_id)?;
        let pooled = positions
            .iter()
            .enumerate()
            .map(|(b, &p)| last_hidden_state.get(b)?.get(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pooled, 0)?)
    }

    /// SDXL's prompt features (diffusers' `StableDiffusionXLPipeline.encode_prompt`):
    /// `hidden_states[-(clip_skip + 2)]` — by default the penultimate layer's output, *not* passed through
    /// `final_layer_norm` — and, for a model with `text_projection`, `text_embeds =
    /// text_projection(pooled)` (`pooled` as in [`forward`](Self::forward)). Without a projection the
    /// layers past the one read are not run.
    pub fn encode_penultimate(
        &self,
        ids: &Tensor,
        clip_skip: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let k = clip_skip.unwrap_or(0);
        self.check_skip(k, 1)?;
        let n = self.layers.len();
        let j = n - 1 - k;
        let Some(proj) = &self.text_projection else {
            let (h, _) = self.run(ids, j, None)?;
            return Ok((h, None));
        };
        let (h, kept) = self.run(ids, n, Some(j))?;
        let kept = kept.ok_or_else(|| candle_core::Error::Msg("CLIP: hidden state".into()))?;
        let pooled = self.pool(ids, &self.final_layer_norm.forward(&h)?)?;
        Ok((kept, Some(proj.forward(&pooled)?)))
    }

    /// The full forward pass of `ids: [B, L]` (u32): `last_hidden_state` (after `final_layer_norm`), the
    /// penultimate hidden state (before it), and `pooled` — `last_hidden_state` at the first position where
    /// `id == eos_token_id`, or at the position of the largest id when the config has the legacy
    /// `eos_token_id == 2` (or none), as transformers does.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let n = self.layers.len();
        let (h, penultimate) = self.run(ids, n, n.checked_sub(1))?;
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        let pooled = self.pool(ids, &last_hidden_state)?;
        Ok(ClipOutput {
            last_hidden_state,
            penultimate,
            pooled,
        })
    }
}

/// Per sequence, the position whose state is pooled: the first `eos` there (first position if none), or
/// for `eos == 2` / unset, the first position of the largest id (torch's `argmax`).
fn eos_positions(ids: &Tensor, eos: Option<u32>) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| match eos {
            Some(e) if e != 2 => row.iter().position(|&t| t == e).unwrap_or(0),
            _ => {
                let mut best = 0;
                for (i, &t) in row.iter().enumerate() {
                    if t > row[best] {
                        best = i;
                    }
                }
                best
            }
        })
        .collect())
}
