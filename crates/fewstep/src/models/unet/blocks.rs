//! The UNet's stages: down blocks (`CrossAttnDownBlock2D`, `DownBlock2D`), the cross-attention mid
//! block (`UNetMidBlock2DCrossAttn`), up blocks (`CrossAttnUpBlock2D`, `UpBlock2D`), and the
//! resampling layers `Downsample2D`/`Upsample2D` that the VAE reuses.

use crate::models::nn::Conv2d;
use candle_core::Tensor;

use super::attention::{Transformer2DModel, TransformerConfig};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::models::nn::{apply, conv2d, upsample_nearest2x};
use crate::weights::Weights;
use crate::Result;

/// diffusers' `Downsample2D` with `use_conv`: a 3×3 convolution with stride 2 and the given padding;
/// with padding 0 the input is first zero-padded by one row at the bottom and one column at the right
/// (the VAE encoder's layout). Weights under `conv`.
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(w: &Weights, channels: usize, out_channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&w.pp("conv"), channels, out_channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    /// `[B, C, H, W]` → `[B, C_out, ⌊(H+2p−3)/2⌋+1, …]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            apply(&self.conv, &x)
        } else {
            apply(&self.conv, x)
        }
    }
}

/// diffusers' `Upsample2D` with `use_conv`: nearest-neighbour upsampling to twice the size (or to
/// `size` when given, `src = ⌊dst·in/out⌋`), then a 3×3 convolution with padding 1. Weights under `conv`.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(w: &Weights, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&w.pp("conv"), channels, out_channels, 3, 1, 1)?,
        })
    }

    /// `x: [B, C, H, W]` → `[B, C_out, 2H, 2W]`, or `[B, C_out, size.0, size.1]`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let x = if (oh, ow) == (2 * h, 2 * w) {
            upsample_nearest2x(x)?
        } else {
            x.upsample_nearest2d(oh, ow)?
        };
        apply(&self.conv, &x)
    }
}

/// What every UNet stage shares: resnet shape parameters and the transformers' settings.
#[derive(Debug, Clone, Copy)]
pub struct StageConfig {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub act: super::resnet::Activation,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl StageConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize, scale: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: scale,
            act: self.act,
        }
    }

    fn transformer(&self, channels: usize, attn: &AttnConfig, layers: usize) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads: attn.heads,
            num_layers: layers,
            cross_attention_dim: attn.cross_attention_dim,
            norm_groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// The cross-attention of a stage: heads, context width, transformer depth of each layer.
#[derive(Debug, Clone)]
pub struct AttnConfig {
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub transformer_layers: Vec<usize>,
}

fn transformers(
    w: &Weights,
    s: &StageConfig,
    attn: Option<&AttnConfig>,
    num_layers: usize,
    channels: usize,
) -> Result<Vec<Transformer2DModel>> {
    match attn {
        None => Ok(Vec::new()),
        Some(a) => (0..num_layers)
            .map(|i| {
                Transformer2DModel::new(
                    &w.pp("attentions").pp(i),
                    &s.transformer(channels, a, a.transformer_layers[i]),
                )
            })
            .collect(),
    }
}

/// A down stage: `CrossAttnDownBlock2D` (with `attn`) or `DownBlock2D` (without). For each layer `i`:
/// `x = resnet_i(x, temb)`, then `x = attention_i(x, context)` if present; each result is kept as a
/// skip connection; then, unless it is the last stage, `x = downsample(x)`, also kept.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        s: &StageConfig,
        attn: Option<&AttnConfig>,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(&w.pp("resnets").pp(i), &s.resnet(cin, out_channels, 1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(w, s, attn, num_layers, out_channels)?;
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                &w.pp("downsamplers").pp(0),
                out_channels,
                out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the stage output and appends its skip connections to `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn` (one layer): `x = resnet_1(attention_0(resnet_0(x, temb), context), temb)`;
/// resnets divide by `mid_block_scale_factor`.
pub struct MidBlockCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlockCrossAttn {
    pub fn new(
        w: &Weights,
        s: &StageConfig,
        attn: &AttnConfig,
        channels: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                ResnetBlock2D::new(
                    &w.pp("resnets").pp(i),
                    &s.resnet(channels, channels, output_scale_factor),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(w, s, Some(attn), 1, channels)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, context)?;
            x = resnet.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// An up stage: `CrossAttnUpBlock2D` (with `attn`) or `UpBlock2D` (without). For each layer `i`:
/// `x = resnet_i(cat[x, skip], temb)` with the most recent remaining skip connection, then
/// `x = attention_i(x, context)` if present; then, unless it is the last stage, `x = upsample(x)`.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `in_channels` is the width of this stage's deepest skip connection, `prev_output_channels` the
    /// width of the incoming `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        s: &StageConfig,
        attn: Option<&AttnConfig>,
        num_layers: usize,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let skip = if i == num_layers - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let cin = if i == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    &w.pp("resnets").pp(i),
                    &s.resnet(cin + skip, out_channels, 1.0),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(w, s, attn, num_layers, out_channels)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                &w.pp("upsamplers").pp(0),
                out_channels,
                out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip connections the stage consumes.
    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes `num_layers()` skip connections from the end of `skips`; `upsample_size` is the
    /// explicit output size of the upsampler, if any.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet: ran out of skip connections".into())
            })?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x, upsample_size)?;
        }
        Ok(x)
    }
}
