//! diffusers' `AutoencoderKL`: the encoder to a diagonal Gaussian posterior over latents and the decoder
//! back to images. Built from the UNet's [`ResnetBlock2D`], [`Downsample2D`], [`Upsample2D`] and the
//! single-head [`SpatialSelfAttention`].

use crate::models::nn::Conv2d;
use crate::models::nn::GroupNorm;
use candle_core::{DType, Tensor};

use crate::config::AutoencoderKLConfig;
use crate::models::nn::{apply, conv2d, group_norm};
use crate::models::unet::attention::SpatialSelfAttention;
use crate::models::unet::blocks::{Downsample2D, Upsample2D};
use crate::models::unet::resnet::{Activation, ResnetBlock2D, ResnetConfig};
use crate::weights::Weights;
use crate::{Error, Result};

/// The VAE's GroupNorm epsilon (fixed in diffusers' `Encoder`/`Decoder`).
const EPS: f64 = 1e-6;

fn resnet_config(c_in: usize, c_out: usize, groups: usize, act: Activation) -> ResnetConfig {
    ResnetConfig {
        in_channels: c_in,
        out_channels: c_out,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
        act,
    }
}

fn resnets(
    w: &Weights,
    n: usize,
    c_in: usize,
    c_out: usize,
    groups: usize,
    act: Activation,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|i| {
            let cin = if i == 0 { c_in } else { c_out };
            ResnetBlock2D::new(
                &w.pp("resnets").pp(i),
                &resnet_config(cin, c_out, groups, act),
            )
        })
        .collect()
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it (no timestep embedding):
/// `x = resnet_1(attention(resnet_0(x)))`, the attention omitted when `mid_block_add_attention` is false.
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(
        w: &Weights,
        channels: usize,
        groups: usize,
        act: Activation,
        add_attention: bool,
    ) -> Result<Self> {
        let attention = if add_attention {
            Some(SpatialSelfAttention::new(
                &w.pp("attentions").pp(0),
                channels,
                groups,
                EPS,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: resnets(w, 2, channels, channels, groups, act)?,
            attention,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then (except the last) a stride-2 convolution
/// with right/bottom zero padding (`downsample_padding = 0`).
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (except the last) nearest ×2 + 3×3 conv.
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// `Encoder`: `conv_in`, down blocks, mid block, `conv_out(silu(norm(x)))` to `2·latent_channels`.
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn new(c: &AutoencoderKLConfig, w: &Weights, act: Activation) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let bw = w.pp("down_blocks").pp(i);
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    &bw.pp("downsamplers").pp(0),
                    out_ch,
                    out_ch,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets: resnets(&bw, c.layers_per_block, in_ch, out_ch, g, act)?,
                downsampler,
            });
        }
        Ok(Self {
            conv_in: conv2d(&w.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(
                &w.pp("mid_block"),
                ch[n - 1],
                g,
                act,
                c.mid_block_add_attention,
            )?,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            conv_out: conv2d(&w.pp("conv_out"), ch[n - 1], 2 * c.latent_channels, 3, 1, 1)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = apply(&self.conv_in, x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = &b.downsampler {
                x = d.forward(&x)?;
            }
        }
        let x = self.mid_block.forward(&x)?;
        let x = self.act.after_norm(&self.conv_norm_out, &x)?;
        apply(&self.conv_out, &x)
    }
}

/// `Decoder`: `conv_in` from `latent_channels`, mid block, up blocks, `conv_out(silu(norm(x)))`.
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn new(c: &AutoencoderKLConfig, w: &Weights, act: Activation) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let prev = out_ch;
            out_ch = ch[n - 1 - i];
            let bw = w.pp("up_blocks").pp(i);
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(&bw.pp("upsamplers").pp(0), out_ch, out_ch)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock {
                resnets: resnets(&bw, c.layers_per_block + 1, prev, out_ch, g, act)?,
                upsampler,
            });
        }
        Ok(Self {
            conv_in: conv2d(&w.pp("conv_in"), c.latent_channels, ch[n - 1], 3, 1, 1)?,
            mid_block: MidBlock::new(
                &w.pp("mid_block"),
                ch[n - 1],
                g,
                act,
                c.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: conv2d(&w.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            act,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = apply(&self.conv_in, z)?;
        let mut x = self.mid_block.forward(&x)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &b.upsampler {
                x = u.forward(&x, None)?;
            }
        }
        let x = self.act.after_norm(&self.conv_norm_out, &x)?;
        apply(&self.conv_out, &x)
    }
}

/// The encoder's posterior `N(mean, std²)` over latents (diffusers' `DiagonalGaussianDistribution`):
/// the encoder output split into `[mean, logvar]` along channels, `logvar` clamped to `[-30, 20]`,
/// `std = exp(logvar / 2)`. Both `[B, latent_channels, H/f, W/f]`.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// A draw `mean + std ⊙ noise`, `noise` standard normal of the same shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (&self.std * noise.to_dtype(self.std.dtype())?)?)?)
    }
}

/// diffusers' `AutoencoderKL`, with its tiled decoding ([`AutoencoderKL::decode_tiled`]).
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
}

fn unsupported(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(format!("vae config `{field}`"), reason)
}

fn validate(c: &AutoencoderKLConfig) -> Result<()> {
    let n = c.block_out_channels.len();
    if n == 0 {
        return Err(unsupported("block_out_channels", "must not be empty"));
    }
    for (field, types, want) in [
        (
            "down_block_types",
            &c.down_block_types,
            "DownEncoderBlock2D",
        ),
        ("up_block_types", &c.up_block_types, "UpDecoderBlock2D"),
    ] {
        if types.len() != n {
            return Err(unsupported(
                field,
                format!("has {} entries, block_out_channels {n}", types.len()),
            ));
        }
        for (i, t) in types.iter().enumerate() {
            if t != want {
                return Err(unsupported(
                    &format!("{field}[{i}]"),
                    format!("block type `{t}` is not supported (only {want})"),
                ));
            }
        }
    }
    for (i, &ch) in c.block_out_channels.iter().enumerate() {
        if c.norm_num_groups == 0 || !ch.is_multiple_of(c.norm_num_groups) {
            return Err(unsupported(
                "norm_num_groups",
                format!(
                    "{} groups do not divide block_out_channels[{i}] = {ch}",
                    c.norm_num_groups
                ),
            ));
        }
    }
    Ok(())
}

/// diffusers' VAE tiling (`enable_tiling`) for decoding pictures larger than the VAE was trained on in
/// bounded memory: the latents are cut into tiles of `latent_tile` latents every
/// `⌊latent_tile·(1 − overlap)⌋`, each tile is decoded alone, and each decoded tile is blended into the one
/// above and the one to its left over `e = ⌊sample_tile·overlap⌋` pixels, then cropped to
/// `sample_tile − e` pixels a side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    pub latent_tile: usize,
    pub sample_tile: usize,
    pub overlap: f64,
}

impl VaeTiling {
    /// diffusers' sizes for a VAE: tiles of `sample_size` pixels, `sample_size / 2^(stages − 1)` latents,
    /// overlap 0.25 (for SD: 512 pixels, 64 latents, 128 blended pixels).
    pub fn for_config(c: &AutoencoderKLConfig) -> Self {
        Self {
            latent_tile: c.sample_size / c.scale_factor(),
            sample_tile: c.sample_size,
            overlap: 0.25,
        }
    }
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): with `e = min(extent, a's and b's sizes)`, the
/// first `e` lines of `b` become `a[−e + y]·(1 − y/e) + b[y]·(y/e)`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(b.clone());
    }
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..e).map(|y| f(y as f64 / e as f64) as f32).collect();
        let shape = if dim == 2 { (1, 1, e, 1) } else { (1, 1, 1, e) };
        Ok(Tensor::from_vec(v, shape, b.device())?.to_dtype(b.dtype())?)
    };
    let head = (a
        .narrow(dim, na - e, e)?
        .broadcast_mul(&weights(&|t| 1.0 - t)?)?
        + b.narrow(dim, 0, e)?.broadcast_mul(&weights(&|t| t)?)?)?;
    Ok(Tensor::cat(&[head, b.narrow(dim, e, nb - e)?], dim)?)
}

impl AutoencoderKL {
    /// Builds the VAE from its config and weights (`w` at the VAE's root); it computes in `w.dtype()`.
    pub fn new(config: &AutoencoderKLConfig, w: &Weights) -> Result<Self> {
        validate(config)?;
        let act = Activation::parse("vae config `act_fn`", &config.act_fn)?;
        let l = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(&w.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(config, &w.pp("encoder"), act)?,
            decoder: Decoder::new(config, &w.pp("decoder"), act)?,
            quant_conv,
            post_quant_conv,
            dtype: w.dtype(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype the model computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `image: [B, in_channels, H, W]` in `[-1, 1]` → the posterior over latents (unscaled:
    /// multiply by `scaling_factor` for the UNet), in the model dtype.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(&image.to_dtype(self.dtype)?)?;
        let moments = match &self.quant_conv {
            Some(q) => apply(q, &h)?,
            None => h,
        };
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?.contiguous()?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// `latents: [B, latent_channels, h, w]` (unscaled: divide the UNet's latents by `scaling_factor`
    /// first) → image `[B, out_channels, h·f, w·f]`, roughly in `[-1, 1]`, in the model dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(p) => apply(p, &z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }

    /// [`decode`](Self::decode) tile by tile ([`VaeTiling`]), as diffusers' `tiled_decode`: latents no
    /// larger than a tile are decoded whole, as diffusers does. Only two rows of decoded tiles are held
    /// at a time.
    pub fn decode_tiled(&self, latents: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let t = tiling.latent_tile;
        if h <= t && w <= t {
            return self.decode(latents);
        }
        let stride = ((t as f64 * (1.0 - tiling.overlap)) as usize).max(1);
        let extent = (tiling.sample_tile as f64 * tiling.overlap) as usize;
        let limit = tiling.sample_tile - extent;
        let crop = |x: &Tensor| -> Result<Tensor> {
            let (_, _, th, tw) = x.dims4()?;
            Ok(x.narrow(2, 0, limit.min(th))?.narrow(3, 0, limit.min(tw))?)
        };
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row: Vec<Tensor> = Vec::new();
            for (k, j) in (0..w).step_by(stride).enumerate() {
                let z = latents
                    .narrow(2, i, t.min(h - i))?
                    .narrow(3, j, t.min(w - j))?;
                let mut tile = self.decode(&z)?;
                if let Some(a) = above.get(k) {
                    tile = blend(a, &tile, extent, 2)?;
                }
                if let Some(l) = row.last() {
                    tile = blend(l, &tile, extent, 3)?;
                }
                row.push(tile);
            }
            let crops = row.iter().map(crop).collect::<Result<Vec<_>>>()?;
            rows.push(Tensor::cat(&crops, 3)?);
            above = row;
        }
        Ok(Tensor::cat(&rows, 2)?)
    }
}
