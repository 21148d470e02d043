//! Layer constructors over [`Weights`]: each checks the stored shapes against the configuration, so a
//! mismatched checkpoint names the tensor at fault instead of failing inside a matmul.
//!
//! [`Linear`] and [`Conv2d`] are candle's layers plus the unfused LoRA branches that the view attaches to
//! their weight ([`Weights::with_lora_branches`]): `y = W x + b + Σᵢ sᵢ · up_i(down_i(x))`. Without
//! branches they are exactly candle's layers.

use std::sync::OnceLock;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::Conv2dConfig;

use crate::kernels::matmul;
use crate::kernels::unfold::unfold;
use crate::kernels::winograd::{self, WinogradWeights};
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

/// A layer's weight and bias: candle's layer, or (for inference on a CPU with a product kernel, where
/// the view asks for it: [`Weights::for_cpu_inference`]) the weight packed once for the kernel in
/// place of its tensor.
#[derive(Clone, Debug)]
enum Base<M> {
    Plain(M),
    Packed(std::sync::Arc<matmul::PackedWeight>),
}

/// `y = x Wᵀ + b` with `W: [out, in]`, plus LoRA branches `s · (x downᵀ) upᵀ`.
#[derive(Clone, Debug)]
pub struct Linear {
    base: Base<candle_nn::Linear>,
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
        let (mut y, (out, inner)) = match &self.base {
            Base::Plain(l) => (linear_forward(l, x)?, l.weight().dims2()?),
            Base::Packed(p) => (p.forward_linear(x)?, (p.dims()[0], p.dims()[1])),
        };
        crate::flops::add(crate::flops::matmul(x.elem_count() / inner, inner, out));
        for b in &self.lora {
            y = (y + linear_forward(&b.up, &linear_forward(&b.down, x)?)?)?;
        }
        Ok(y)
    }
}

/// Whether a layer runs its training path: autograd tracks the input or the parameter, on the CPU in f32.
fn training_path(x: &Tensor, param: &Tensor) -> bool {
    (x.track_op() || param.track_op()) && x.device().is_cpu() && x.dtype() == DType::F32
}

/// `v: [C]` repeated over `n` rows, `[n, C]`, as the product `1ₙ · vᵀ`: under autograd its gradient is
/// the matrix product `1ₙᵀ · g` (a broadcast's gradient is a reduction over the leading axes, candle's
/// slowest CPU path).
fn rows_of(v: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let c = v.elem_count();
    Tensor::ones((n, 1), v.dtype(), v.device())?.matmul(&v.reshape((1, c))?)
}

/// candle's linear layer (on a CPU with a product kernel for the dtype [`matmul::linear`]), or under
/// autograd on the CPU in f32 `x Wᵀ + 1·bᵀ` over the flattened rows (see [`rows_of`]).
fn linear_forward(layer: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    if !training_path(x, layer.weight()) {
        if matmul::available(x) && layer.weight().dtype() == x.dtype() {
            return matmul::linear(x, layer.weight(), layer.bias());
        }
        return layer.forward(x);
    }
    let dims = x.dims().to_vec();
    let (inner, n) = (dims[dims.len() - 1], x.elem_count() / dims[dims.len() - 1]);
    let out = layer.weight().dim(0)?;
    let y = x.reshape((n, inner))?.matmul(&layer.weight().t()?)?;
    let y = match layer.bias() {
        Some(b) => (y + rows_of(b, n)?)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = out;
    y.reshape(out_dims)
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
    let packed = match w.is_for_cpu_inference() {
        true => matmul::PackedWeight::linear(&weight, bias.as_ref())?,
        false => None,
    };
    let base = match packed {
        Some(p) => Base::Packed(std::sync::Arc::new(p)),
        None => Base::Plain(candle_nn::Linear::new(weight, bias)),
    };
    Ok(Linear { base, lora })
}

/// A 2-D convolution, plus LoRA branches: `down` a convolution with the layer's kernel, stride and
/// padding into `r` channels, `up` a 1×1 convolution back (peft's and kohya's LoCon).
#[derive(Clone, Debug)]
pub struct Conv2d {
    base: Base<candle_nn::Conv2d>,
    /// Stride and padding (of a packed weight; a plain one's layer holds them).
    stride: usize,
    padding: usize,
    lora: Vec<Branch<candle_nn::Conv2d>>,
    /// The weight transformed for Winograd, made at the first call that takes it on a small image
    /// ([`WINOGRAD_CACHE_PIXELS`]) and kept for the next.
    winograd: std::sync::Arc<OnceLock<WinogradWeights>>,
}

impl Conv2d {
    /// Number of LoRA branches the layer computes at run time.
    pub fn lora_count(&self) -> usize {
        self.lora.len()
    }
}

/// A plain convolution, without LoRA branches.
impl From<candle_nn::Conv2d> for Conv2d {
    fn from(base: candle_nn::Conv2d) -> Self {
        Self {
            stride: base.config().stride,
            padding: base.config().padding,
            base: Base::Plain(base),
            lora: Vec::new(),
            winograd: Default::default(),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (mut y, (_, c, kh, kw)) = match &self.base {
            Base::Plain(conv) => (
                conv_forward(conv, x, Some(&self.winograd))?,
                conv.weight().dims4()?,
            ),
            Base::Packed(p) => {
                let d = p.dims();
                let y = p.forward_conv(x, self.stride, self.padding)?;
                (y, (d[0], d[1], d[2], d[3]))
            }
        };
        crate::flops::add(crate::flops::matmul(y.elem_count(), c * kh * kw, 1));
        for b in &self.lora {
            y = (y + conv_forward(&b.up, &conv_forward(&b.down, x, None)?, None)?)?;
        }
        Ok(y)
    }
}

/// Images with fewer pixels than this (32×32) run the im2col product: with few 4×4 tiles it is faster
/// than Winograd even on kept weights (1280 channels at 16×16: 30 against 44 ms).
const WINOGRAD_MIN_PIXELS: usize = 1024;

/// Images with at most this many pixels (64×64) make Winograd's transformed weights and keep them
/// (4× the weight's values, in f32) for every later call: there transforming the weights took a
/// quarter (320 channels at 64×64) to a half (640 channels at 32×32) of a call; a layer that only
/// sees larger images transforms at each call (a small share there) and does not spend the memory.
const WINOGRAD_CACHE_PIXELS: usize = 4096;

/// The convolution of a layer: candle's on other devices; on the CPU (where candle re-lays the whole
/// weight out at every call) 3×3 stride-1 padding-1 f32 convolutions of images of at least
/// [`WINOGRAD_MIN_PIXELS`] by Winograd in inference (its transformed weights kept in `cache` for
/// small images, where given); other square convolutions by
/// [`matmul::conv2d`] where the CPU has a product kernel for the dtype (bf16 always: its products
/// are exact and a bf16 Winograd transform would round); the rest by [`conv2d_unfolded`] in f32.
fn conv_forward(
    conv: &candle_nn::Conv2d,
    x: &Tensor,
    cache: Option<&OnceLock<WinogradWeights>>,
) -> candle_core::Result<Tensor> {
    let cfg = conv.config();
    if !x.device().is_cpu() || cfg.dilation != 1 || cfg.groups != 1 {
        return conv.forward(x);
    }
    let (_, _, kh, kw) = conv.weight().dims4()?;
    let (_, _, h, w) = x.dims4()?;
    let training = training_path(x, conv.weight());
    let kernel =
        kh == kw && !training && matmul::available(x) && conv.weight().dtype() == x.dtype();
    let winograd = (kh, kw, cfg.stride, cfg.padding) == (3, 3, 1, 1)
        && h * w >= WINOGRAD_MIN_PIXELS
        && !training
        && conv.bias().is_some()
        && !(kernel && x.dtype() == DType::BF16);
    if kernel && !winograd {
        return matmul::conv2d(x, conv.weight(), conv.bias(), cfg.stride, cfg.padding);
    }
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let y = match conv.bias() {
        Some(bias) if winograd => {
            // Kept weights serve every size once made; only small images make them.
            let kept = match (cache, cache.and_then(OnceLock::get)) {
                (_, Some(weights)) => Some(weights),
                (Some(cache), None) if h * w <= WINOGRAD_CACHE_PIXELS => {
                    let made = WinogradWeights::new(conv.weight(), bias)?;
                    Some(cache.get_or_init(|| made))
                }
                _ => None,
            };
            match kept {
                Some(weights) => weights.conv(&f32(x)?)?,
                None => winograd::conv3x3(&f32(x)?, conv.weight(), bias)?,
            }
        }
        _ if kh == kw => conv2d_unfolded(
            &f32(x)?,
            &f32(conv.weight())?,
            conv.bias().map(f32).transpose()?.as_ref(),
            cfg.stride,
            cfg.padding,
        )?,
        _ => return conv.forward(x),
    };
    y.to_dtype(x.dtype())
}

/// A convolution as one matrix product over explicit patches (im2col):
/// `y[:, b] = W · unfold(x)[:, b] + bias`, `W: [O, C·k·k]`, `unfold(x): [C·k·k, B·ho·wo]`
/// ([`unfold`]). Used under autograd on the CPU: its backward pass is two matrix products and a fold,
/// and the bias gradient a contiguous row sum, where candle's convolution backward runs a transposed
/// convolution and a whole-image-kernel convolution, an order of magnitude slower on CPU at training
/// sizes.
pub fn conv2d_unfolded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, k, _) = weight.dims4()?;
    let cols = if k == 1 && stride == 1 && padding == 0 {
        x.reshape((b, c, h * w))?
            .transpose(0, 1)?
            .reshape((c, b * h * w))?
    } else {
        unfold(x, k, stride, padding)?
    };
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (w + 2 * padding - k) / stride + 1,
    );
    let y = weight.reshape((o, c * k * k))?.matmul(&cols)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((o, 1))?)?,
        None => y,
    };
    y.reshape((o, b, ho, wo))?.transpose(0, 1)?.contiguous()
}

/// Nearest-neighbour upsampling by 2, `y[b, c, i, j] = x[b, c, ⌊i/2⌋, ⌊j/2⌋]`, as a broadcast: under
/// autograd its backward pass is a sum over the broadcast axes (candle's own runs a grouped convolution,
/// one per channel). Other inputs take candle's kernel.
pub fn upsample_nearest2x(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !x.track_op() {
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
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
    // Packed where every call would take the product kernel (`conv_forward`): bf16, or f32 but for
    // the 3×3 stride-1 convolutions that Winograd takes at large sizes.
    let kernel_always = weight.dtype() == DType::BF16 || (k, stride, padding) != (3, 1, 1);
    let packed = match w.is_for_cpu_inference() && kernel_always {
        true => matmul::PackedWeight::conv(&weight, Some(&bias))?,
        false => None,
    };
    let base = match packed {
        Some(p) => Base::Packed(std::sync::Arc::new(p)),
        None => Base::Plain(candle_nn::Conv2d::new(weight, Some(bias), cfg)),
    };
    Ok(Conv2d {
        base,
        stride,
        padding,
        lora,
        winograd: Default::default(),
    })
}

/// GroupNorm over `channels` split into `groups`, with affine weight and bias.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = w.get(channels, "weight")?;
    let bias = w.get(channels, "bias")?;
    Ok(GroupNorm {
        candle: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

/// GroupNorm: `y = (x − μ_g) / √(σ²_g + eps) · weight_c + bias_c`, mean and variance over each group of
/// `C/G` channels of each sample.
///
/// On the CPU [`kernels::group_norm`](crate::kernels::group_norm) computes it in one pass over each group
/// (in f32 whatever the dtype), with a direct backward pass for training; other devices run candle's.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    candle: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `silu(group_norm(x))`, the pair that opens every ResNet block: fused into one pass on the CPU
    /// in inference.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() || x.track_op() || self.weight.track_op() {
            return candle_nn::ops::silu(&self.forward(x)?);
        }
        self.cpu_kernel(x, true)
    }

    /// The CPU kernel in f32 (`silu`: fused, inference only), the result in `x`'s dtype: bf16 is
    /// read and written as it is (widened a group at a time), other dtypes converted around it.
    fn cpu_kernel(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (w, b) = (f32(&self.weight)?, f32(&self.bias)?);
        let input = match x.dtype() {
            DType::BF16 => x.clone(),
            _ => f32(x)?,
        };
        let y = if silu {
            crate::kernels::group_norm::group_norm_silu(&input, &w, &b, self.groups, self.eps)?
        } else {
            crate::kernels::group_norm::group_norm(&input, &w, &b, self.groups, self.eps)?
        };
        y.to_dtype(x.dtype())
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            return self.candle.forward(x);
        }
        self.cpu_kernel(x, false)
    }
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
/// runs the same formula out of differentiable tensor operations instead, the affine part through
/// [`rows_of`] on the CPU.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    fused: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !(x.track_op() || self.weight.track_op() || self.bias.track_op()) {
            return self.fused.forward(x);
        }
        let dims = x.dims().to_vec();
        let c = dims[dims.len() - 1];
        let n = x.elem_count() / c;
        let x = x.reshape((n, c))?;
        let mean = x.mean_keepdim(1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = if training_path(&normed, &self.weight) {
            ((normed * rows_of(&self.weight, n)?)? + rows_of(&self.bias, n)?)?
        } else {
            normed
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?
        };
        y.reshape(dims)
    }
}

/// Softmax over the last dimension. At inference [`kernels::softmax`](crate::kernels::softmax) on the
/// CPU in f32, candle's fused kernel elsewhere (neither has a backward pass); under autograd
/// `exp(x − max) / Σ exp(x − max)` from differentiable operations, the max detached (it cancels out of the
/// value, so its gradient is zero).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else if x.device().is_cpu() && x.dtype() == DType::F32 {
        crate::kernels::softmax::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Applies a candle module, mapping its error into ours.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    Ok(m.forward(x)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Uniform values in [-1, 1), reproducible per seed.
    fn randn(shape: &[usize], seed: u64) -> Tensor {
        (crate::kernels::test_input(shape, seed) * 0.5).unwrap()
    }

    use crate::kernels::max_abs_diff as max_diff;

    /// Per variable, the largest difference between the gradients of `Σ probe ⊙ ours` and
    /// `Σ probe ⊙ reference` (`probe` random, drawn from `seed`).
    fn grad_diffs(ours: Tensor, reference: Tensor, vars: &[&Var], seed: u64) -> Vec<f32> {
        let probe = randn(reference.dims(), seed);
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_ours, g_ref) = (grads(ours), grads(reference));
        vars.iter()
            .map(|v| max_diff(g_ours.get(v).unwrap(), g_ref.get(v).unwrap()))
            .collect()
    }

    /// A plain f32 3×3 convolution runs Winograd from 32×32 on, its transformed weights made at the
    /// first small image and kept; every size gives candle's convolution.
    #[test]
    fn winograd_weights_are_kept_for_small_images_and_give_candles_convolution() {
        let (c, o) = (5, 7);
        let (weight, bias) = (randn(&[o, c, 3, 3], 1), randn(&[o], 2));
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let layer = || {
            Conv2d::from(candle_nn::Conv2d::new(
                weight.clone(),
                Some(bias.clone()),
                cfg,
            ))
        };
        // One layer through every size (the kept weights serve 80×80 too); another that sees only
        // 80×80 and keeps nothing.
        let (conv, large_only) = (layer(), layer());
        for (conv, side, kept) in [
            (&conv, 31, false),
            (&conv, 32, true),
            (&conv, 45, true),
            (&conv, 80, true),
            (&large_only, 80, false),
        ] {
            let x = randn(&[1, c, side, side], 3);
            let want = x
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            // Relative to the output's magnitude, as the Winograd kernel's own test.
            let err = max_diff(&conv.forward(&x).unwrap(), &want) / crate::kernels::max_abs(&want);
            assert!(err < 3e-5, "{side}×{side}: {err}");
            assert_eq!(conv.winograd.get().is_some(), kept, "{side}×{side}");
        }
    }

    /// The unfolded convolution and its gradients equal candle's convolution on awkward sizes: odd sides,
    /// stride 2 with and without padding, 1×1 kernels.
    #[test]
    fn unfolded_conv_matches_candle_forward_and_backward() {
        for (i, &(b, c, o, h, w, k, s, p)) in [
            (2, 3, 5, 7, 9, 3, 1, 1),
            (1, 4, 6, 8, 6, 3, 2, 1),
            (2, 3, 4, 9, 7, 3, 2, 0),
            (3, 5, 2, 5, 5, 1, 1, 0),
            (1, 2, 3, 6, 6, 3, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&randn(&[b, c, h, w], seed)).unwrap();
            let wt = Var::from_tensor(&randn(&[o, c, k, k], seed + 1)).unwrap();
            let bias = Var::from_tensor(&randn(&[o], seed + 2)).unwrap();
            let reference = x
                .conv2d(&wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            let ours = conv2d_unfolded(&x, &wt, Some(&bias), s, p).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "case {i}");
            assert!(max_diff(&ours, &reference) < 1e-5, "case {i} forward");
            let diffs = grad_diffs(ours, reference, &[&x, &wt, &bias], seed + 3);
            for (name, d) in ["x", "weight", "bias"].iter().zip(diffs) {
                assert!(d < 1e-4, "case {i} grad {name}: {d}");
            }
        }
    }

    #[test]
    fn broadcast_upsample_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 4], 7)).unwrap();
        let reference = x.upsample_nearest2d(10, 8).unwrap();
        let ours = upsample_nearest2x(&x).unwrap();
        assert_eq!(max_diff(&ours, &reference), 0.0);
        assert!(grad_diffs(ours, reference, &[&x], 8)[0] < 1e-5);
    }
    /// The GroupNorm training kernel and its gradients equal candle's GroupNorm (uneven channel counts
    /// per group, a non-square image, a 3-D input).
    #[test]
    fn group_norm_kernel_matches_candle_forward_and_backward() {
        for (i, shape) in [vec![2usize, 6, 5, 3], vec![3, 8, 7]]
            .into_iter()
            .enumerate()
        {
            let c = shape[1];
            let seed = 100 + 10 * i as u64;
            let x = Var::from_tensor(
                &(randn(&shape, seed) * 3.0)
                    .unwrap()
                    .affine(1.0, 0.5)
                    .unwrap(),
            )
            .unwrap();
            let weight = Var::from_tensor(&randn(&[c], seed + 1)).unwrap();
            let bias = Var::from_tensor(&randn(&[c], seed + 2)).unwrap();
            let reference = candle_nn::GroupNorm::new(
                weight.as_tensor().clone(),
                bias.as_tensor().clone(),
                c,
                2,
                1e-5,
            )
            .unwrap()
            .forward(&x)
            .unwrap();
            let ours = GroupNorm {
                candle: candle_nn::GroupNorm::new(
                    weight.as_tensor().clone(),
                    bias.as_tensor().clone(),
                    c,
                    2,
                    1e-5,
                )
                .unwrap(),
                weight: weight.as_tensor().clone(),
                bias: bias.as_tensor().clone(),
                groups: 2,
                eps: 1e-5,
            }
            .forward(&x)
            .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "case {i} forward");
            let diffs = grad_diffs(ours, reference, &[&x, &weight, &bias], seed + 3);
            for (name, d) in ["x", "weight", "bias"].iter().zip(diffs) {
                assert!(d < 1e-4, "case {i} grad {name}: {d}");
            }
        }
    }
    /// The fused inference GroupNorm+SiLU equals candle's GroupNorm then SiLU, in f32 and (through f32)
    /// in bf16, at sizes that leave partial vector lanes and groups larger than a summation block.
    #[test]
    fn group_norm_silu_matches_candle() {
        for (shape, groups) in [
            (vec![2usize, 6, 5, 3], 3),
            (vec![1, 4, 77, 61], 2),
            (vec![1, 3, 1], 1),
        ] {
            let c = shape[1];
            let x = (randn(&shape, 7) * 3.0).unwrap().affine(1.0, 0.5).unwrap();
            let (weight, bias) = (randn(&[c], 8), randn(&[c], 9));
            let norm = GroupNorm {
                candle: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-5)
                    .unwrap(),
                weight,
                bias,
                groups,
                eps: 1e-5,
            };
            let reference = candle_nn::ops::silu(&norm.candle.forward(&x).unwrap()).unwrap();
            assert!(
                max_diff(&norm.forward_silu(&x).unwrap(), &reference) < 1e-5,
                "{shape:?}"
            );
            let half = norm
                .forward_silu(&x.to_dtype(DType::BF16).unwrap())
                .unwrap();
            assert_eq!(half.dtype(), DType::BF16);
            let half = half.to_dtype(DType::F32).unwrap();
            assert!(max_diff(&half, &reference) < 0.1, "{shape:?} bf16");
        }
    }

    /// The training paths of Linear (3-D input) and LayerNorm, values and gradients, equal candle's.
    #[test]
    fn linear_and_layer_norm_training_paths_match_candle() {
        let x = Var::from_tensor(&randn(&[2, 5, 6], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[4, 6], 2)).unwrap();
        let b = Var::from_tensor(&randn(&[4], 3)).unwrap();
        let reference = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
            .forward(&x)
            .unwrap();
        let ours = Linear {
            base: Base::Plain(candle_nn::Linear::new(
                w.as_tensor().clone(),
                Some(b.as_tensor().clone()),
            )),
            lora: Vec::new(),
        }
        .forward(&x)
        .unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        for d in grad_diffs(ours, reference, &[&x, &w, &b], 4) {
            assert!(d < 1e-4);
        }
        let lw = Var::from_tensor(&randn(&[6], 5)).unwrap();
        let lb = Var::from_tensor(&randn(&[6], 6)).unwrap();
        let reference = candle_nn::ops::layer_norm_slow(&x, &lw, &lb, 1e-5).unwrap();
        let ln = LayerNorm {
            fused: candle_nn::LayerNorm::new(lw.as_tensor().clone(), lb.as_tensor().clone(), 1e-5),
            weight: lw.as_tensor().clone(),
            bias: lb.as_tensor().clone(),
            eps: 1e-5,
        };
        let ours = ln.forward(&x).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        for d in grad_diffs(ours, reference, &[&x, &lw, &lb], 7) {
            assert!(d < 1e-4);
        }
    }
}
