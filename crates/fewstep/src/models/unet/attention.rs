//! Attention layers: diffusers' `Attention` (self and cross, multi-head), the VAE's single-head spatial
//! self-attention block, `BasicTransformerBlock` with its GEGLU feed-forward, and `Transformer2DModel`
//! (the spatial transformer of the UNet's cross-attention blocks).

use crate::models::nn::GroupNorm;
use crate::models::nn::Linear;
use candle_core::{DType, Tensor};

use crate::kernels::add::add;
use crate::kernels::attention::multi_head_attention;
use crate::kernels::transpose::transpose_last2;

use crate::models::nn::{apply, conv2d, group_norm, layer_norm, linear, LayerNorm};
use crate::weights::Weights;
use crate::Result;

/// Multi-head scaled dot-product attention with projections `to_q`, `to_k`, `to_v`, `to_out.0`:
///
/// `q = x W_q`, `k = c W_k`, `v = c W_v` (`c = x` for self-attention), split into `heads` heads of
/// `head_dim`; per head `o = softmax(q kᵀ / √head_dim) v`; heads concatenated; `y = o W_out + b_out`.
/// With `upcast`, `q kᵀ` and the softmax are computed in f32 whatever the model dtype; the softmax is
/// always computed in f32.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    upcast: bool,
}

impl Attention {
    /// `context_dim = None` for self-attention; `qkv_bias` is diffusers' `bias` (false in the UNet's
    /// transformer blocks, true in the VAE); `to_out.0` always has a bias.
    pub fn new(
        w: &Weights,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        Self::with_names(
            w,
            ["to_q", "to_k", "to_v", "to_out.0"],
            query_dim,
            context_dim,
            heads,
            head_dim,
            qkv_bias,
            upcast,
        )
    }

    /// As [`Attention::new`], with the four projections stored under other names (the VAE's
    /// pre-0.14 `query`/`key`/`value`/`proj_attn`).
    #[allow(clippy::too_many_arguments)]
    fn with_names(
        w: &Weights,
        names: [&str; 4],
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear(&w.pp(names[0]), query_dim, inner, qkv_bias)?,
            to_k: linear(&w.pp(names[1]), ctx, inner, qkv_bias)?,
            to_v: linear(&w.pp(names[2]), ctx, inner, qkv_bias)?,
            to_out: linear(&w.pp(names[3]), inner, query_dim, true)?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// `x: [B, N, query_dim]`, `context: [B, M, context_dim]` (or `None` for self-attention) →
    /// `[B, N, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (q, k, v) = (
            apply(&self.to_q, x)?,
            apply(&self.to_k, ctx)?,
            apply(&self.to_v, ctx)?,
        );
        let o = multi_head_attention(&q, &k, &v, self.heads, scale, None, self.upcast)?;
        apply(&self.to_out, &o)
    }
}

/// The VAE's spatial self-attention (diffusers' `Attention` with `group_norm`, one head,
/// `residual_connection`): `y = x + attn(group_norm(x))`, attention over the `H·W` positions with
/// `C`-wide features.
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialSelfAttention {
    /// `channels` wide, one head, GroupNorm with `groups` and `eps`.
    pub fn new(w: &Weights, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let names = if !w.contains("to_q.weight") && w.contains("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: group_norm(&w.pp("group_norm"), groups, channels, eps)?,
            attn: Attention::with_names(w, names, channels, None, 1, channels, true, false)?,
        })
    }

    /// `x: [B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = transpose_last2(&apply(&self.group_norm, x)?.reshape((b, c, h * w))?)?;
        let t = self.attn.forward(&t, None)?;
        let t = transpose_last2(&t)?.reshape((b, c, h, w))?;
        Ok((t + x)?)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`): `[h, g] = x W_1 + b_1` split in halves of width
/// `inner = 4·dim`; `y = (h ⊙ gelu(g)) W_2 + b_2`, with the exact (erf) GELU.
struct FeedForward {
    proj: GegluProjection,
    out: Linear,
    inner: usize,
}

/// The projection `W_1` of a [`FeedForward`]: for inference on a CPU with a product kernel (and no
/// LoRA branch at run time), packed with the gate fused into the product
/// ([`PackedWeight::geglu`](crate::kernels::matmul::PackedWeight::geglu): the `2·inner` features
/// are never written out); else a [`Linear`] followed by the gate.
enum GegluProjection {
    Gated(crate::kernels::matmul::PackedWeight),
    Plain(Linear),
}

impl FeedForward {
    fn new(w: &Weights, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let p = w.pp("net.0.proj");
        let gated = match p.is_for_cpu_inference() && p.lora_branches("weight").is_empty() {
            true => crate::kernels::matmul::PackedWeight::geglu(
                &p.get((2 * inner, dim), "weight")?,
                &p.get(2 * inner, "bias")?,
            )?,
            false => None,
        };
        let proj = match gated {
            Some(g) => GegluProjection::Gated(g),
            None => GegluProjection::Plain(linear(&p, dim, 2 * inner, true)?),
        };
        Ok(Self {
            proj,
            out: linear(&w.pp("net.2"), inner, dim, true)?,
            inner,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let proj = match &self.proj {
            GegluProjection::Gated(p) => {
                let dim = x.dims().last().copied().unwrap_or(0);
                crate::flops::add(crate::flops::matmul(
                    x.elem_count() / dim.max(1),
                    dim,
                    2 * self.inner,
                ));
                return apply(&self.out, &p.forward_geglu(x)?);
            }
            GegluProjection::Plain(proj) => proj,
        };
        let hg = apply(proj, x)?;
        if matches!(hg.dtype(), DType::BF16 | DType::F32) && hg.device().is_cpu() && !hg.track_op()
        {
            return apply(&self.out, &crate::kernels::geglu::geglu(&hg)?);
        }
        let last = hg.rank() - 1;
        let h = hg.narrow(last, 0, self.inner)?;
        let g = hg.narrow(last, self.inner, self.inner)?.gelu_erf()?;
        apply(&self.out, &(h * g)?)
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type = "layer_norm"`:
/// `x += attn1(norm1(x))` (self), `x += attn2(norm2(x), context)` (cross), `x += ff(norm3(x))`.
/// LayerNorms have eps 1e-5 and affine parameters.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        w: &Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&w.pp("attn1"), dim, None, heads, head_dim, false, upcast)?,
            norm2: layer_norm(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                &w.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                false,
                upcast,
            )?,
            norm3: layer_norm(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&w.pp("ff"), dim)?,
        })
    }

    /// `x: [B, N, dim]`, `context: [B, M, cross_attention_dim]` → `[B, N, dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = add(&self.attn1.forward(&apply(&self.norm1, x)?, None)?, x)?;
        let x = add(
            &self
                .attn2
                .forward(&apply(&self.norm2, &x)?, Some(context))?,
            &x,
        )?;
        Ok(add(&self.ff.forward(&apply(&self.norm3, &x)?)?, &x)?)
    }
}

/// `proj_in`/`proj_out` of a [`Transformer2DModel`]: a 1×1 convolution over `[B, C, H, W]` or, with
/// `use_linear_projection`, a Linear over `[B, H·W, C]`.
enum Projection {
    Conv(crate::models::nn::Conv2d),
    Linear(Linear),
}

/// Parameters of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// diffusers' `Transformer2DModel` on continuous input: with `r = x`,
/// `h = group_norm(x)` (eps 1e-6), `h = proj_in(h)` flattened to `[B, H·W, inner]`
/// (`inner = heads·(channels/heads)`), `h = block_n(…block_1(h, context))`, reshaped back to
/// `[B, C, H, W]` through `proj_out`; `y = h + r`.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    inner: usize,
}

impl Transformer2DModel {
    pub fn new(w: &Weights, c: &TransformerConfig) -> Result<Self> {
        let head_dim = c.channels / c.heads;
        let inner = c.heads * head_dim;
        let proj = |name: &str, i: usize, o: usize| -> Result<Projection> {
            if c.use_linear_projection {
                Ok(Projection::Linear(linear(&w.pp(name), i, o, true)?))
            } else {
                Ok(Projection::Conv(conv2d(&w.pp(name), i, o, 1, 1, 0)?))
            }
        };
        let blocks = (0..c.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &w.pp("transformer_blocks").pp(i),
                    inner,
                    c.heads,
                    head_dim,
                    c.cross_attention_dim,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(&w.pp("norm"), c.norm_groups, c.channels, 1e-6)?,
            proj_in: proj("proj_in", c.channels, inner)?,
            blocks,
            proj_out: proj("proj_out", inner, c.channels)?,
            inner,
        })
    }

    /// `x: [B, C, H, W]`, `context: [B, M, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let t = apply(&self.norm, x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(transpose_last2(&t.reshape((b, c, h * w))?)?)
        };
        let mut t = match &self.proj_in {
            Projection::Conv(p) => to_tokens(apply(p, &t)?)?,
            Projection::Linear(p) => apply(p, &to_tokens(t)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_image = |t: Tensor, c: usize| -> Result<Tensor> {
            Ok(transpose_last2(&t)?.reshape((b, c, h, w))?)
        };
        let out = match &self.proj_out {
            Projection::Conv(p) => apply(p, &to_image(t, self.inner)?)?,
            Projection::Linear(p) => {
                let t = apply(p, &t)?;
                let c = t.dim(2)?;
                to_image(t, c)?
            }
        };
        Ok(add(&out, x)?)
    }
}
