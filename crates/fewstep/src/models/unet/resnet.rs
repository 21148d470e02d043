//! diffusers' `ResnetBlock2D` (with `time_embedding_norm = "default"`), shared by the UNet (with a
//! timestep embedding) and the VAE (without one), and the activation functions the configs name.

use crate::kernels::add::add;
use crate::models::nn::GroupNorm;
use crate::models::nn::{Conv2d, Linear};
use candle_core::Tensor;

use crate::models::nn::{apply, conv2d, group_norm, linear};
use crate::weights::Weights;
use crate::{Error, Result};

/// An activation named by a config's `act_fn`-style field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (diffusers accepts both `"silu"` and `"swish"`).
    Silu,
}

impl Activation {
    /// Parses the config value of `field`; anything but `silu`/`swish` is refused by name.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        match value {
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::invalid(
                field,
                format!("activation `{other}` is not supported (only \"silu\")"),
            )),
        }
    }

    /// Applies the activation elementwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => Ok(candle_nn::ops::silu(x)?),
        }
    }

    /// `act(norm(x))`, fused where the kernels allow ([`GroupNorm::forward_silu`]).
    pub fn after_norm(&self, norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => Ok(norm.forward_silu(x)?),
        }
    }
}

/// Shape parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the timestep embedding; `None` for the VAE (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this (`output_scale_factor`, 1 except in some mid blocks).
    pub output_scale_factor: f64,
    pub act: Activation,
}

/// `h = conv1(act(norm1(x)))`; `h += time_emb_proj(act(temb))[:, :, None, None]` when a timestep
/// embedding is given; `h = conv2(act(norm2(h)))` (dropout is the identity at inference);
/// `y = (shortcut(x) + h) / output_scale_factor`, where `shortcut` is a 1×1 `conv_shortcut` when the
/// channel count changes and the identity otherwise.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    act: Activation,
}

impl ResnetBlock2D {
    pub fn new(w: &Weights, c: &ResnetConfig) -> Result<Self> {
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(linear(&w.pp("time_emb_proj"), t, c.out_channels, true)?),
            None => None,
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                &w.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(&w.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: conv2d(&w.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: group_norm(&w.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: conv2d(&w.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
            act: c.act,
        })
    }

    /// `x: [B, C_in, H, W]`, `temb: [B, T]` → `[B, C_out, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.act.after_norm(&self.norm1, x)?;
        let mut h = apply(&self.conv1, &h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = apply(proj, &self.act.forward(temb)?)?;
            h = add(&h, &t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.act.after_norm(&self.norm2, &h)?;
        let h = apply(&self.conv2, &h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => apply(c, x)?,
            None => x.clone(),
        };
        let y = add(&skip, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            Ok((y / self.output_scale_factor)?)
        }
    }
}
