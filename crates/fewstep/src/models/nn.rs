//! Layer constructors over [`Weights`]: each checks the stored shapes against the configuration, so a
//! mismatched checkpoint names the tensor at fault instead of failing inside a matmul.
//!
//! [`Linear`] and [`Conv2d`] are candle's layers plus the unfused LoRA branches that the view attaches to
//! their weight ([`Weights::with_lora_branches`]): `y = W x + b + Σᵢ sᵢ · up_i(down_i(x))`. Without
//! branches they are exactly candle's layers.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, GroupNorm};

use crate::lora::LoraBranch;
use crate::weights::Weights;
use crate::{Error, Result};

/// A LoRA branch as the layer runs it: `down` then `up`, the scale folded into `up`.
#[derive(Clone, Debug)]
struct Branch<M> {
    down: M,
    up: M,
}

/// `up · scale` in f32, then in the layer's dtype.
fn scaled_up(b: &LoraBranch, dtype: DType) -> Result<Tensor> {
    Ok((b.up.to_dtype(DType::F32)? * b.scale)?.to_dtype(dtype)?)
}

fn branch_error(w: &Weights, b: &LoraBranch, expected: &str) -> Error {
    Error::invalid(
        "LoRA",
        format!(
            "branch on `{}` has down {:?} / up {:?}, expected {expected}",
            w.key("weight"),
            b.down.dims(),
            b.up.dims()
        ),
    )
}

/// `y = x Wᵀ + b` with `W: [out, in]`, plus LoRA branches `s · (x downᵀ) upᵀ`.
#[derive(Clone, Debug)]
pub struct Linear {
    base: candle_nn::Linear,
    lora: Vec<Branch<candle_nn::Linear>>,
}

impl Linear {
    /// Number of LoRA branches the layer computes at run time.
    pub fn lora_count(&self) -> usize {
        self.lora.len()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.base.forward(x)?;
        for b in &self.lora {
            y = (y + b.up.forward(&b.down.forward(x)?)?)?;
        }
        Ok(y)
    }
}

/// `y = x Wᵀ + b` with `W: [out, in]`.
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(w.get(out_dim, "bias")?)
    } else {
        None
    };
    let lora = w
        .lora_branches("weight")
        .iter()
        .map(|b| {
            let r = b.down.dim(0)?;
            // A 1×1-conv LoRA on a Linear (SD2's linear projections) is the same matrix.
            let (down, up) = match (b.down.dims(), b.up.dims()) {
                (&[_, i], &[o, _]) | (&[_, i, 1, 1], &[o, _, 1, 1])
                    if i == in_dim && o == out_dim =>
                {
                    (
                        b.down.reshape((r, in_dim))?,
                        scaled_up(b, w.dtype())?.reshape((out_dim, r))?,
                    )
                }
                _ => {
                    return Err(branch_error(
                        w,
                        b,
                        &format!("[r, {in_dim}] / [{out_dim}, r]"),
                    ))
                }
            };
            Ok(Branch {
                down: candle_nn::Linear::new(down.to_dtype(w.dtype())?, None),
                up: candle_nn::Linear::new(up, None),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Linear {
        base: candle_nn::Linear::new(weight, bias),
        lora,
    })
}

/// A 2-D convolution, plus LoRA branches: `down` a convolution with the layer's kernel, stride and
/// padding into `r` channels, `up` a 1×1 convolution back (peft's and kohya's LoCon).
#[derive(Clone, Debug)]
pub struct Conv2d {
    base: candle_nn::Conv2d,
    lora: Vec<Branch<candle_nn::Conv2d>>,
}

impl Conv2d {
    /// Number of LoRA branches the layer computes at run time.
    pub fn lora_count(&self) -> usize {
        self.lora.len()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.base.forward(x)?;
        for b in &self.lora {
            y = (y + b.up.forward(&b.down.forward(x)?)?)?;
        }
        Ok(y)
    }
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
    let one = Conv2dConfig {
        padding: 0,
        stride: 1,
        ..cfg
    };
    let lora = w
        .lora_branches("weight")
        .iter()
        .map(|b| {
            let r = b.down.dim(0)?;
            let ok_down = match *b.down.dims() {
                [_, i, kh, kw] => i == in_ch && kh == k && kw == k,
                [_, i] => i == in_ch && k == 1,
                _ => false,
            };
            let ok_up = match *b.up.dims() {
                [o, _, 1, 1] | [o, _] => o == out_ch,
                _ => false,
            };
            if !ok_down || !ok_up {
                return Err(branch_error(
                    w,
                    b,
                    &format!("[r, {in_ch}, {k}, {k}] / [{out_ch}, r, 1, 1]"),
                ));
            }
            let down = b.down.reshape((r, in_ch, k, k))?.to_dtype(w.dtype())?;
            let up = scaled_up(b, w.dtype())?.reshape((out_ch, r, 1, 1))?;
            Ok(Branch {
                down: candle_nn::Conv2d::new(down, None, cfg),
                up: candle_nn::Conv2d::new(up, None, one),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Conv2d {
        base: candle_nn::Conv2d::new(weight, Some(bias), cfg),
        lora,
    })
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
