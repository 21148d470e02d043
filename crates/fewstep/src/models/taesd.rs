//! TAESD, the tiny autoencoder (Ollin Boer Bohan, madebyollin/taesd; diffusers' `AutoencoderTiny`):
//! 3×3 convolutions, ReLU, residual blocks `relu(conv(relu(conv(relu(conv(x))))) + skip(x))`, stride-2
//! convolutions down, nearest ×2 upsampling up, and `tanh(z/3)·3` at the decoder's input. Newer variants
//! (TAEF1/TAEF2, 16 or 32 latent channels) add, in the three innermost blocks of each side, a branch
//! `x + conv1×1(relu(groupnorm₄(conv1×1(x → 4C))))` before the block.
//!
//! Two key layouts: the original `nn.Sequential` files (`taesd_encoder.safetensors` with `0.weight`,
//! `1.conv.0.weight`, …, and `taesd_decoder.safetensors`, whose index 0 is the clamp), and diffusers'
//! folder (`encoder.layers.N.*`, `decoder.layers.N.*`, the decoder's indices one lower as its clamp is
//! not a layer). The encoder takes images in [0, 1] and the decoder returns [0, 1], as the original
//! (diffusers' wrapper maps [-1, 1] around them).

use crate::models::nn::{Conv2d, GroupNorm};
use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;

use crate::kernels::{add::add, relu::relu};
use crate::models::nn::{group_norm, upsample_nearest2x};
use crate::weights::Weights;
use crate::{Error, Result};

/// The blocks between the resolution changes, from the outermost: `num_blocks` (1, 3, 3, 3).
const NUM_BLOCKS: [usize; 4] = [1, 3, 3, 3];

/// candle's `k×k` convolution layer, padding `k/2`, with an optional bias.
fn candle_conv(
    w: &Weights,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    bias: bool,
) -> Result<candle_nn::Conv2d> {
    let weight = w.get((cout, cin, k, k), "weight")?;
    let bias = if bias {
        Some(w.get(cout, "bias")?)
    } else {
        None
    };
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    Ok(candle_nn::Conv2d::new(weight, bias, cfg))
}

/// A `k×k` convolution with bias, padding `k/2` (TAESD never carries LoRAs; the layer is ours for its
/// CPU kernels).
fn conv2d(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    Ok(candle_conv(w, cin, cout, k, stride, true)?.into())
}

/// A `k×k` convolution without bias, padding `k/2`.
fn conv_no_bias(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    Ok(candle_conv(w, cin, cout, k, stride, false)?.into())
}

/// `x + conv₂(relu(groupnorm₄(conv₁(x))))` with 1×1 convolutions `C → 4C → C` (keys `pool.0`, `pool.1`,
/// `pool.3`): the mid-block GroupNorm branch of TAEF1/TAEF2.
struct MidBlockGn {
    expand: Conv2d,
    norm: GroupNorm,
    project: Conv2d,
}

/// `relu(conv₃(relu(conv₂(relu(conv₁(x))))) + skip(x))`, after the optional GroupNorm branch.
struct Block {
    pool: Option<MidBlockGn>,
    convs: [Conv2d; 3],
}

impl Block {
    fn new(w: &Weights, c: usize) -> Result<Self> {
        let pool = if w.contains("pool.0.weight") {
            Some(MidBlockGn {
                expand: conv_no_bias(&w.pp("pool.0"), c, 4 * c, 1, 1)?,
                norm: group_norm(&w.pp("pool.1"), 4, 4 * c, 1e-5)?,
                project: conv_no_bias(&w.pp("pool.3"), 4 * c, c, 1, 1)?,
            })
        } else {
            None
        };
        let conv = |i: usize| conv2d(&w.pp("conv").pp(i), c, c, 3, 1);
        Ok(Self {
            pool,
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.pool {
            Some(p) => {
                let h = p.expand.forward(x)?;
                let h = relu(&p.norm.forward(&h)?)?;
                add(x, &p.project.forward(&h)?)?
            }
            None => x.clone(),
        };
        let h = relu(&self.convs[0].forward(&x)?)?;
        let h = relu(&self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        Ok(relu(&add(&h, &x)?)?)
    }
}

enum Layer {
    Conv(Conv2d),
    Block(Box<Block>),
    Relu,
    Upsample,
}

fn run(layers: &[Layer], x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    for layer in layers {
        x = match layer {
            Layer::Conv(c) => c.forward(&x)?,
            Layer::Block(b) => b.forward(&x)?,
            Layer::Relu => relu(&x)?,
            Layer::Upsample => upsample_nearest2x(&x)?,
        };
    }
    Ok(x)
}

/// The width `C` of a TAESD side and its latent channels, read from the first/last convolution.
fn widths(w: &Weights, name: &str, field: &str) -> Result<(usize, usize)> {
    let shape = w.shape_of(name).ok_or_else(|| Error::MissingKey {
        file: w.label().to_string(),
        key: w.key(name),
    })?;
    match shape[..] {
        [a, b, 3, 3] => Ok((a, b)),
        _ => Err(Error::invalid(
            field,
            format!(
                "`{}` has shape {shape:?}, expected [C, C', 3, 3]",
                w.key(name)
            ),
        )),
    }
}

/// TAESD's encoder: image in [0, 1] `[B, 3, H, W]` → latents `[B, L, H/8, W/8]`.
pub struct TinyEncoder {
    layers: Vec<Layer>,
    latent_channels: usize,
}

impl TinyEncoder {
    /// Builds from a view whose keys are the `nn.Sequential` indices (`0.weight`, `1.conv.0.weight`, …).
    pub fn new(w: &Weights) -> Result<Self> {
        let (c, _) = widths(w, "0.weight", "taesd encoder")?;
        let mut i = 0;
        let mut layers = Vec::new();
        for (level, &n) in NUM_BLOCKS.iter().enumerate() {
            layers.push(Layer::Conv(if level == 0 {
                conv2d(&w.pp(i), 3, c, 3, 1)?
            } else {
                conv_no_bias(&w.pp(i), c, c, 3, 2)?
            }));
            i += 1;
            for _ in 0..n {
                layers.push(Layer::Block(Box::new(Block::new(&w.pp(i), c)?)));
                i += 1;
            }
        }
        let last = format!("{i}.weight");
        let (latent_channels, _) = widths(w, &last, "taesd encoder")?;
        layers.push(Layer::Conv(conv2d(&w.pp(i), c, latent_channels, 3, 1)?));
        Ok(Self {
            layers,
            latent_channels,
        })
    }

    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        run(&self.layers, image)
    }
}

/// TAESD's decoder: latents → image, nominally in [0, 1] (not clamped), after `tanh(z/3)·3`.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    latent_channels: usize,
}

impl TinyDecoder {
    /// Builds from a view whose keys are diffusers' decoder indices (the original file's minus one: the
    /// clamp at original index 0 is not a layer).
    pub fn new(w: &Weights) -> Result<Self> {
        let (c, latent_channels) = widths(w, "0.weight", "taesd decoder")?;
        let mut layers = vec![
            Layer::Conv(conv2d(&w.pp(0), latent_channels, c, 3, 1)?),
            Layer::Relu,
        ];
        let mut i = 2;
        for (level, &n) in NUM_BLOCKS.iter().rev().enumerate() {
            for _ in 0..n {
                layers.push(Layer::Block(Box::new(Block::new(&w.pp(i), c)?)));
                i += 1;
            }
            if level + 1 < NUM_BLOCKS.len() {
                layers.push(Layer::Upsample);
                layers.push(Layer::Conv(conv_no_bias(&w.pp(i + 1), c, c, 3, 1)?));
                i += 2;
            }
        }
        layers.push(Layer::Conv(conv2d(&w.pp(i), c, 3, 3, 1)?));
        Ok(Self {
            layers,
            latent_channels,
        })
    }

    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / 3.0)?.tanh()? * 3.0)?;
        run(&self.layers, &z)
    }
}

/// A TAESD pair; either side may be absent (previews need only the decoder).
pub struct AutoencoderTiny {
    pub encoder: Option<TinyEncoder>,
    pub decoder: Option<TinyDecoder>,
}

impl AutoencoderTiny {
    /// From the original files: `encoder` keyed `0.weight`, `1.conv.0.weight`, …; `decoder` keyed from
    /// `1.weight` (index 0 is the clamp).
    pub fn from_original(encoder: Option<&Weights>, decoder: Option<&Weights>) -> Result<Self> {
        Ok(Self {
            encoder: encoder.map(TinyEncoder::new).transpose()?,
            decoder: decoder
                .map(|w| TinyDecoder::new(&shift_indices(w)))
                .transpose()?,
        })
    }

    /// From diffusers' `AutoencoderTiny` weights (`encoder.layers.N.*`, `decoder.layers.N.*`).
    pub fn from_diffusers(w: &Weights) -> Result<Self> {
        Ok(Self {
            encoder: Some(TinyEncoder::new(&w.pp("encoder.layers"))?),
            decoder: Some(TinyDecoder::new(&w.pp("decoder.layers"))?),
        })
    }
}

/// How a TAESD file lays out its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaesdLayout {
    /// diffusers' `AutoencoderTiny`: `encoder.layers.N.*` and `decoder.layers.N.*`.
    Diffusers,
    /// The original `taesd_decoder.safetensors`: `1.weight`, `3.conv.0.weight`, … (index 0 is the clamp).
    OriginalDecoder,
    /// The original `taesd_encoder.safetensors`: `0.weight`, `1.conv.0.weight`, …
    OriginalEncoder,
}

impl TaesdLayout {
    /// The layout of a file with these keys, or None when they are not a TAESD's.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a String>) -> Option<Self> {
        let keys: Vec<&String> = keys.into_iter().collect();
        if keys.iter().any(|k| k.starts_with("decoder.layers.")) {
            return Some(Self::Diffusers);
        }
        let numbered = !keys.is_empty()
            && keys.iter().all(|k| {
                k.split_once('.')
                    .is_some_and(|(head, _)| head.parse::<usize>().is_ok())
            });
        match (numbered, keys.iter().any(|k| *k == "0.weight")) {
            (false, _) => None,
            (true, true) => Some(Self::OriginalEncoder),
            (true, false) => Some(Self::OriginalDecoder),
        }
    }
}

impl AutoencoderTiny {
    /// A TAESD from one file's weights in `layout`: both sides from diffusers' layout, the decoder alone
    /// from an original decoder file. An original encoder file cannot decode and is refused.
    pub fn from_layout(w: &Weights, layout: TaesdLayout) -> Result<Self> {
        match layout {
            TaesdLayout::Diffusers => Self::from_diffusers(w),
            TaesdLayout::OriginalDecoder => Self::from_original(None, Some(w)),
            TaesdLayout::OriginalEncoder => Err(Error::invalid(
                "vae",
                "this TAESD file is an encoder (its first key is `0.weight`); give the decoder \
                 (taesd_decoder.safetensors) or diffusers' AutoencoderTiny file",
            )),
        }
    }
}

/// The original decoder's keys renamed to diffusers' indices (`N.…` → `N−1.…`).
fn shift_indices(w: &Weights) -> Weights {
    let renamed = w
        .keys()
        .filter_map(|k| {
            let (head, rest) = k.split_once('.')?;
            let i = head.parse::<usize>().ok()?.checked_sub(1)?;
            Some((format!("{i}.{rest}"), k.clone()))
        })
        .collect();
    w.renamed(renamed)
}
