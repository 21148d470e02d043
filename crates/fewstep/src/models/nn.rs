//! Layer constructors over [`Weights`]: each checks the stored shapes against the configuration, so a
//! mismatched checkpoint names the tensor at fault instead of failing inside a matmul.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear};

use crate::weights::Weights;
use crate::Result;

/// `y = x Wᵀ + b` with `W: [out, in]`.
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(w.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// 2-D convolution with a square `k×k` kernel, `W: [out, in, k, k]`, with bias.
pub fn conv2d(
    w: &Weights,
    in_ch: usize,
    out_ch: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let weight = w.get((out_ch, in_ch, k, k), "weight")?;
    let bias = w.get(out_ch, "bias")?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// GroupNorm over `channels` split into `groups`, with affine weight and bias.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = w.get(channels, "weight")?;
    let bias = w.get(channels, "bias")?;
    Ok(GroupNorm::new(weight, bias, channels, groups, eps)?)
}

/// LayerNorm over the last dimension, with affine weight and bias.
pub fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    let weight = w.get(dim, "weight")?;
    let bias = w.get(dim, "bias")?;
    Ok(LayerNorm {
        fused: candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps),
        weight,
        bias,
        eps,
    })
}

/// LayerNorm over the last dimension: `y = (x − mean) / √(var + eps) · weight + bias`.
///
/// At inference it runs candle's fused kernel, which has no backward pass (gradients would silently stop
/// there); when the input or the parameters are tracked by autograd (training: the weights are `Var`s), it
/// runs the same formula out of differentiable tensor operations instead.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    fused: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            self.fused.forward(x)
        }
    }
}

/// Softmax over the last dimension. At inference candle's fused kernel (no backward pass); under autograd
/// `exp(x − max) / Σ exp(x − max)` from differentiable operations, the max detached (it cancels out of the
/// value, so its gradient is zero).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Applies a candle module, mapping its error into ours.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    Ok(m.forward(x)?)
}
