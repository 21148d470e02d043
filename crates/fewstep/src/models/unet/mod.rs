//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x and SDXL layouts, including the LCM
//! `time_cond_proj_dim` guidance conditioning and SDXL's `text_time` micro-conditioning. Weight keys
//! are diffusers' (`down_blocks.0.attentions.1…`).

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod resnet;

use crate::models::nn::Conv2d;
use crate::models::nn::GroupNorm;
use candle_core::{DType, Tensor};

use self::blocks::{AttnConfig, DownBlock, MidBlockCrossAttn, StageConfig, UpBlock};
pub use self::embeddings::{guidance_scale_embedding, TextTimeCond};
use self::embeddings::{timestep_embedding, TextTimeEmbedding, TimestepEmbedding};
use self::resnet::Activation;
use crate::config::UNet2DConditionConfig;
use crate::models::nn::{apply, conv2d, group_norm};
use crate::weights::Weights;
use crate::{Error, Result};

/// The conditional UNet: `ε̂ (or v̂, x̂₀) = UNet(x_t, t, context[, w-embedding])`.
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (`addition_embed_type: "text_time"`).
    add_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlockCrossAttn>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    act: Activation,
    conv_out: Conv2d,
    dtype: DType,
}

fn unsupported(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(format!("unet config `{field}`"), reason)
}

/// Refuses configs whose architecture this implementation does not build, naming the field.
fn validate(c: &UNet2DConditionConfig) -> Result<()> {
    let n = c.block_out_channels.len();
    if n == 0 {
        return Err(unsupported("block_out_channels", "must not be empty"));
    }
    if c.down_block_types.len() != n {
        return Err(unsupported(
            "down_block_types",
            format!(
                "has {} entries, block_out_channels {n}",
                c.down_block_types.len()
            ),
        ));
    }
    if c.up_block_types.len() != n {
        return Err(unsupported(
            "up_block_types",
            format!(
                "has {} entries, block_out_channels {n}",
                c.up_block_types.len()
            ),
        ));
    }
    let lists = [
        ("layers_per_block", c.layers_per_block.per_block_len()),
        ("cross_attention_dim", c.cross_attention_dim.per_block_len()),
        (
            "transformer_layers_per_block",
            c.transformer_layers_per_block.per_block_len(),
        ),
        ("attention_head_dim", c.attention_head_dim.per_block_len()),
        (
            "num_attention_heads",
            c.num_attention_heads
                .as_ref()
                .and_then(|h| h.per_block_len()),
        ),
        (
            "only_cross_attention",
            c.only_cross_attention.per_block_len(),
        ),
    ];
    for (field, len) in lists {
        if let Some(len) = len {
            if len != n {
                return Err(unsupported(
                    field,
                    format!("has {len} entries, down_block_types {n}"),
                ));
            }
        }
    }
    for i in 0..n {
        if c.only_cross_attention.get(i) {
            return Err(unsupported("only_cross_attention", "true is not supported"));
        }
        let heads = c.heads(i);
        if heads == 0 || !c.block_out_channels[i].is_multiple_of(heads) {
            return Err(unsupported(
                "attention_head_dim",
                format!(
                    "{heads} heads do not divide block_out_channels[{i}] = {}",
                    c.block_out_channels[i]
                ),
            ));
        }
    }
    for (i, t) in c.down_block_types.iter().enumerate() {
        if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D") {
            return Err(unsupported(
                &format!("down_block_types[{i}]"),
                format!("block type `{t}` is not supported"),
            ));
        }
    }
    for (i, t) in c.up_block_types.iter().enumerate() {
        if !matches!(t.as_str(), "CrossAttnUpBlock2D" | "UpBlock2D") {
            return Err(unsupported(
                &format!("up_block_types[{i}]"),
                format!("block type `{t}` is not supported"),
            ));
        }
    }
    if let Some(m) = &c.mid_block_type {
        if m != "UNetMidBlock2DCrossAttn" {
            return Err(unsupported(
                "mid_block_type",
                format!("block type `{m}` is not supported"),
            ));
        }
    }
    let must_be_none = [
        ("class_embed_type", c.class_embed_type.is_some()),
        ("num_class_embeds", c.num_class_embeds.is_some()),
        (
            "addition_embed_type",
            c.addition_embed_type
                .as_ref()
                .is_some_and(|t| t != "text_time"),
        ),
        ("encoder_hid_dim", c.encoder_hid_dim.is_some()),
        ("encoder_hid_dim_type", c.encoder_hid_dim_type.is_some()),
        ("time_embedding_act_fn", c.time_embedding_act_fn.is_some()),
        ("cross_attention_norm", c.cross_attention_norm.is_some()),
        ("dual_cross_attention", c.dual_cross_attention),
        ("class_embeddings_concat", c.class_embeddings_concat),
    ];
    for (field, set) in must_be_none {
        if set {
            return Err(unsupported(field, "is set; only its default is supported"));
        }
    }
    if c.addition_embed_type.is_some() {
        for (field, v) in [
            ("addition_time_embed_dim", c.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                c.projection_class_embeddings_input_dim,
            ),
        ] {
            if v.is_none() {
                return Err(unsupported(
                    field,
                    "must be set with addition_embed_type \"text_time\"",
                ));
            }
        }
    }
    if c.transformer_layers_per_block.is_per_layer() {
        match &c.reverse_transformer_layers_per_block {
            None => {
                return Err(unsupported(
                    "reverse_transformer_layers_per_block",
                    "must be given when transformer_layers_per_block has per-layer lists (an asymmetric UNet)",
                ))
            }
            Some(r) if r.per_block_len() != Some(n) => {
                return Err(unsupported(
                    "reverse_transformer_layers_per_block",
                    format!("needs one entry per up block ({n})"),
                ))
            }
            Some(_) => {}
        }
    }
    if c.time_embedding_type != "positional" {
        return Err(unsupported(
            "time_embedding_type",
            format!(
                "`{}` is not supported (only \"positional\")",
                c.time_embedding_type
            ),
        ));
    }
    if c.resnet_time_scale_shift != "default" {
        return Err(unsupported(
            "resnet_time_scale_shift",
            format!(
                "`{}` is not supported (only \"default\")",
                c.resnet_time_scale_shift
            ),
        ));
    }
    if c.attention_type != "default" {
        return Err(unsupported(
            "attention_type",
            format!("`{}` is not supported (only \"default\")", c.attention_type),
        ));
    }
    if c.norm_num_groups.is_none() {
        return Err(unsupported("norm_num_groups", "null is not supported"));
    }
    for (field, k) in [
        ("conv_in_kernel", c.conv_in_kernel),
        ("conv_out_kernel", c.conv_out_kernel),
    ] {
        if k.is_multiple_of(2) {
            return Err(unsupported(field, format!("even kernel size {k}")));
        }
    }
    Ok(())
}

impl UNet2DConditionModel {
    /// Builds the model from its config and weights (`w` at the UNet's root); the model computes in
    /// `w.dtype()`. Every tensor's shape is checked against the config.
    pub fn new(config: &UNet2DConditionConfig, w: &Weights) -> Result<Self> {
        validate(config)?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let act = Activation::parse("unet config `act_fn`", &c.act_fn)?;
        let post_act = match &c.timestep_post_act {
            Some(a) => Some(Activation::parse("unet config `timestep_post_act`", a)?),
            None => None,
        };
        let groups = c.norm_num_groups.unwrap_or(32);
        let temb_dim = c.time_embedding_dim.unwrap_or(4 * ch[0]);
        let stage = StageConfig {
            temb_channels: temb_dim,
            groups,
            eps: c.norm_eps,
            act,
            use_linear_projection: c.use_linear_projection,
            upcast_attention: c.upcast_attention,
        };
        // Stage `i`'s attention with per-layer transformer depths `depth(j)` for its `layers` layers.
        let attn_cfg = |i: usize, layers: usize, depth: &dyn Fn(usize) -> usize| AttnConfig {
            heads: c.heads(i),
            cross_attention_dim: c.cross_attention_dim.get(i),
            transformer_layers: (0..layers).map(depth).collect(),
        };

        let conv_in = conv2d(
            &w.pp("conv_in"),
            c.in_channels,
            ch[0],
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
        )?;
        let time_embedding = TimestepEmbedding::new(
            &w.pp("time_embedding"),
            ch[0],
            temb_dim,
            act,
            post_act,
            c.time_cond_proj_dim,
        )?;
        let add_embedding = match (
            c.addition_time_embed_dim,
            c.projection_class_embeddings_input_dim,
        ) {
            (Some(time_dim), Some(in_dim)) if c.addition_embed_type.is_some() => {
                Some(TextTimeEmbedding::new(
                    w,
                    time_dim,
                    in_dim,
                    temb_dim,
                    c.flip_sin_to_cos,
                    c.freq_shift,
                )?)
            }
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let layers = c.layers_per_block.get(i);
            let attn = attn_cfg(i, layers, &|j| c.down_transformer_layers(i, j));
            down_blocks.push(DownBlock::new(
                &w.pp("down_blocks").pp(i),
                &stage,
                (kind == "CrossAttnDownBlock2D").then_some(&attn),
                layers,
                in_ch,
                out_ch,
                i + 1 < n,
                c.downsample_padding,
            )?);
        }

        let mid_block = match &c.mid_block_type {
            Some(_) => Some(MidBlockCrossAttn::new(
                &w.pp("mid_block"),
                &stage,
                &attn_cfg(n - 1, 1, &|_| c.down_transformer_layers(n - 1, 0)),
                ch[n - 1],
                c.mid_block_scale_factor,
            )?),
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let r = n - 1 - i; // the matching down stage
            let prev_out = out_ch;
            out_ch = ch[r];
            let in_ch = ch[r.saturating_sub(1)];
            let layers = c.layers_per_block.get(r) + 1;
            let attn = attn_cfg(r, layers, &|j| c.up_transformer_layers(i, j));
            up_blocks.push(UpBlock::new(
                &w.pp("up_blocks").pp(i),
                &stage,
                (kind == "CrossAttnUpBlock2D").then_some(&attn),
                layers,
                in_ch,
                prev_out,
                out_ch,
                i + 1 < n,
            )?);
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), groups, ch[0], c.norm_eps)?,
            act,
            conv_out: conv2d(
                &w.pp("conv_out"),
                ch[0],
                c.out_channels,
                c.conv_out_kernel,
                1,
                (c.conv_out_kernel - 1) / 2,
            )?,
            dtype: w.dtype(),
        })
    }

    /// Whether the UNet takes SDXL's micro-conditioning ([`TextTimeCond`]).
    pub fn has_text_time(&self) -> bool {
        self.add_embedding.is_some()
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype the model computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One denoising evaluation. `sample: [B, C, H, W]`; `timestep` one value for the whole batch;
    /// `encoder_hidden_states: [B, L, D]`; `timestep_cond: [B, time_cond_proj_dim]` (the LCM
    /// w-embedding) for models that have `time_cond_proj_dim`; `added` the micro-conditioning of an SDXL
    /// UNet (`addition_embed_type: "text_time"`, required there, refused elsewhere). Inputs are cast to
    /// the model dtype; the output `[B, out_channels, H, W]` is in the model dtype.
    ///
    /// `temb = time_embedding(sinusoid(t) + cond_proj(timestep_cond)) + add_embedding(added)`;
    /// `x = conv_in(sample)`; down stages collect skip connections; mid block; up stages consume them (upsampling to the skip's
    /// size when `H` or `W` is not a multiple of `2^(stages−1)`); `y = conv_out(silu(norm(x)))`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        added: Option<&TextTimeCond>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        self.forward_timesteps(
            sample,
            &vec![timestep; b],
            encoder_hidden_states,
            timestep_cond,
            added,
        )
    }

    /// As [`forward`](Self::forward) with one timestep per sample (`timesteps.len() == B`), as training
    /// draws them.
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        added: Option<&TextTimeCond>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            return Err(Error::invalid(
                "timesteps",
                format!("{} given for a batch of {b}", timesteps.len()),
            ));
        }
        let mut x = sample.to_dtype(self.dtype)?;
        if c.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let context = encoder_hidden_states.to_dtype(self.dtype)?;

        let t = timestep_embedding(
            timesteps,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            sample.device(),
        )?
        .to_dtype(self.dtype)?;
        let cond = match (timestep_cond, self.time_embedding.has_cond_proj()) {
            (Some(cond), true) => Some(cond.to_dtype(self.dtype)?),
            (Some(_), false) => {
                return Err(Error::invalid(
                    "timestep_cond",
                    "given, but the UNet has no `time_cond_proj_dim`",
                ))
            }
            (None, _) => None,
        };
        let mut temb = self.time_embedding.forward(&t, cond.as_ref())?;
        match (&self.add_embedding, added) {
            (Some(e), Some(a)) => temb = (temb + e.forward(a, b, self.dtype)?)?,
            (Some(_), None) => {
                return Err(Error::invalid(
                    "added_cond",
                    "the UNet is an SDXL UNet (addition_embed_type \"text_time\"): give text_embeds and time_ids",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "added_cond",
                    "given, but the UNet has no `addition_embed_type`",
                ))
            }
            (None, None) => {}
        }

        let mut x = apply(&self.conv_in, &x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &temb, &context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &temb, &context)?;
        }

        let factor = 1usize << (self.up_blocks.len() - 1);
        let forward_size = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let size = if forward_size && i < last {
                let idx = skips
                    .len()
                    .checked_sub(block.num_layers() + 1)
                    .ok_or_else(|| candle_core::Error::Msg("UNet: skip count".into()))?;
                let (_, _, sh, sw) = skips[idx].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            x = block.forward(&x, &temb, &context, &mut skips, size)?;
        }

        let x = self.act.after_norm(&self.conv_norm_out, &x)?;
        apply(&self.conv_out, &x)
    }
}
