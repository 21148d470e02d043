//! Single-file checkpoints in the original Stable Diffusion (LDM, CompVis) key layout, read under
//! diffusers' names.
//!
//! A checkpoint holds every component under one prefix each: the UNet under `model.diffusion_model.`
//! (module names from LDM's `openaimodel.py`: `input_blocks`, `middle_block`, `output_blocks`,
//! `time_embed`, `out`), the VAE under `first_stage_model.` (LDM's `autoencoder.py`/`model.py`:
//! `encoder.down.N.block.M`, `mid.attn_1`, …), and the text encoder under `cond_stage_model.`
//! (`transformer.text_model.*` for SD1's CLIP, OpenCLIP's `model.transformer.resblocks.*` for SD2).
//! The family and the configuration are inferred from the keys and shapes, as diffusers'
//! `from_single_file` does; nothing is converted on disk: each diffusers name is mapped to its stored
//! tensor (renamed, sliced or reshaped) through [`TensorSource`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::parts::{ModelParts, TextEncoder2Parts};
use super::{SafetensorsFile, TensorSource, Weights};
use crate::config::{
    load_json, AutoencoderKLConfig, ClipTextConfig, OneOrMany, SchedulerConfig, TransformerLayers,
    UNet2DConditionConfig,
};
use crate::tokenizer::{ClipTokenizer, PadToken};
use crate::{Error, Result};

/// The UNet's prefix in an LDM checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// LDM `ResBlock` leaf layers against diffusers' `ResnetBlock2D` names: `in_layers` is
/// (GroupNorm, SiLU, Conv), `emb_layers` (SiLU, Linear), `out_layers` (GroupNorm, SiLU, Dropout, Conv).
const RESNET: [(&str, &str); 5] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
];

/// Leaf layers of one `BasicTransformerBlock`; LDM and diffusers name them alike.
const TRANSFORMER_BLOCK: [&str; 13] = [
    "norm1",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "norm2",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
];

fn push_resnet(map: &mut Vec<(String, String)>, d: &str, l: &str, shortcut: bool) {
    for (dn, ln) in RESNET {
        map.push((format!("{d}.{dn}"), format!("{l}.{ln}")));
    }
    if shortcut {
        map.push((format!("{d}.conv_shortcut"), format!("{l}.skip_connection")));
    }
}

/// `SpatialTransformer` (LDM `attention.py`) against diffusers' `Transformer2DModel`: same names
/// (`norm`, `proj_in`, `transformer_blocks.N.*`, `proj_out`).
fn push_transformer(map: &mut Vec<(String, String)>, d: &str, l: &str, layers: usize) {
    for name in ["norm", "proj_in"] {
        map.push((format!("{d}.{name}"), format!("{l}.{name}")));
    }
    for t in 0..layers {
        for name in TRANSFORMER_BLOCK {
            map.push((
                format!("{d}.transformer_blocks.{t}.{name}"),
                format!("{l}.transformer_blocks.{t}.{name}"),
            ));
        }
    }
    map.push((format!("{d}.proj_out"), format!("{l}.proj_out")));
}

/// For every leaf layer (Linear, Conv2d, GroupNorm, LayerNorm) of a UNet with config `cfg`, its
/// diffusers module path and its LDM module path (without the `model.diffusion_model.` prefix), e.g.
/// `("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2")`. Append `.weight`/`.bias` to get
/// tensor keys.
///
/// The LDM layout (`openaimodel.py`'s `UNetModel`) numbers the blocks sequentially:
/// - `input_blocks.0.0` is `conv_in`; then for each down stage `i`, `layers_per_block[i]` blocks
///   `input_blocks.k` with the resnet at `.0` and the transformer (cross-attention stages) at `.1`,
///   followed (except after the last stage) by `input_blocks.k.0.op`, the downsampler's conv;
/// - `middle_block.0`/`.2` are the mid resnets, `middle_block.1` its transformer;
/// - for each up stage, `layers_per_block + 1` blocks `output_blocks.k` (resnet `.0`, transformer `.1`),
///   the last one holding the upsampler's conv at `.1.conv` (`.2.conv` after a transformer);
/// - `time_embed.0`/`.2` are `time_embedding.linear_1`/`linear_2`, `out.0`/`out.2` are
///   `conv_norm_out`/`conv_out`; LCM's `time_embedding.cond_proj` keeps its diffusers name.
pub fn unet_module_map(cfg: &UNet2DConditionConfig) -> Result<Vec<(String, String)>> {
    let n = cfg.block_out_channels.len();
    if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
        return Err(crate::Error::invalid(
            "unet config",
            "block_out_channels, down_block_types and up_block_types must have the same, non-zero length",
        ));
    }
    let ch = &cfg.block_out_channels;
    let mut map: Vec<(String, String)> = Vec::new();
    let pair = |d: &str, l: &str| (d.to_string(), l.to_string());
    map.push(pair("conv_in", "input_blocks.0.0"));
    map.push(pair("time_embedding.linear_1", "time_embed.0"));
    map.push(pair("time_embedding.linear_2", "time_embed.2"));
    if cfg.time_cond_proj_dim.is_some() {
        map.push(pair("time_embedding.cond_proj", "time_embedding.cond_proj"));
    }
    if cfg.addition_embed_type.is_some() {
        map.push(pair("add_embedding.linear_1", "label_emb.0.0"));
        map.push(pair("add_embedding.linear_2", "label_emb.0.2"));
    }

    // Down stages.
    let mut k = 1; // input_blocks index
    let mut out = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        let cross = cfg.down_block_types[i].starts_with("CrossAttn");
        let layers = cfg.layers_per_block.get(i);
        for j in 0..layers {
            let tl = cfg.down_transformer_layers(i, j);
            let cin = if j == 0 { out } else { c };
            let d = format!("down_blocks.{i}");
            push_resnet(
                &mut map,
                &format!("{d}.resnets.{j}"),
                &format!("input_blocks.{k}.0"),
                cin != c,
            );
            if cross {
                push_transformer(
                    &mut map,
                    &format!("{d}.attentions.{j}"),
                    &format!("input_blocks.{k}.1"),
                    tl,
                );
            }
            k += 1;
        }
        out = c;
        if i + 1 < n {
            map.push((
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{k}.0.op"),
            ));
            k += 1;
        }
    }

    // Mid block.
    if cfg.mid_block_type.is_some() {
        push_resnet(&mut map, "mid_block.resnets.0", "middle_block.0", false);
        push_transformer(
            &mut map,
            "mid_block.attentions.0",
            "middle_block.1",
            cfg.down_transformer_layers(n - 1, 0),
        );
        push_resnet(&mut map, "mid_block.resnets.1", "middle_block.2", false);
    }

    // Up stages: every up resnet takes a skip connection, so it always has a shortcut conv.
    let mut k = 0; // output_blocks index
    for i in 0..n {
        let r = n - 1 - i;
        let cross = cfg.up_block_types[i].starts_with("CrossAttn");
        let layers = cfg.layers_per_block.get(r) + 1;
        for j in 0..layers {
            let tl = cfg.up_transformer_layers(i, j);
            let d = format!("up_blocks.{i}");
            push_resnet(
                &mut map,
                &format!("{d}.resnets.{j}"),
                &format!("output_blocks.{k}.0"),
                true,
            );
            if cross {
                push_transformer(
                    &mut map,
                    &format!("{d}.attentions.{j}"),
                    &format!("output_blocks.{k}.1"),
                    tl,
                );
            }
            if j + 1 == layers && i + 1 < n {
                let at = if cross { 2 } else { 1 };
                map.push((
                    format!("{d}.upsamplers.0.conv"),
                    format!("output_blocks.{k}.{at}.conv"),
                ));
            }
            k += 1;
        }
    }

    map.push(pair("conv_norm_out", "out.0"));
    map.push(pair("conv_out", "out.2"));
    Ok(map)
}

pub use super::family::Family;

const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's CLIP ViT-L (`conditioner.embedders.0`, transformers' layout) and OpenCLIP ViT-bigG
/// (`conditioner.embedders.1`, open_clip's layout).
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// Infers the family from the keys and shapes, as diffusers' `infer_diffusers_model_type` does:
/// `conditioner.embedders.1.*` is SDXL, `conditioner.embedders.0.model.*` alone the SDXL refiner; an
/// OpenCLIP text encoder (`cond_stage_model.model.*`) or a cross-attention width of 1024
/// (`input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`) is SD2.x; any other
/// `model.diffusion_model.*` checkpoint is SD1.x.
pub fn detect(file: &SafetensorsFile) -> Result<Family> {
    let t = file.tensors();
    let any = |prefix: &str| t.keys().any(|k| k.starts_with(prefix));
    if any("conditioner.embedders.1.") {
        return Ok(Family::Sdxl);
    }
    if any("conditioner.embedders.0.model.") {
        return Ok(Family::SdxlRefiner);
    }
    if any(OPEN_CLIP_PREFIX) {
        return Ok(Family::Sd2);
    }
    let v2_key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
    if t.get(v2_key).and_then(|i| i.shape.last().copied()) == Some(1024) {
        return Ok(Family::Sd2);
    }
    if any(UNET_PREFIX) {
        return Ok(Family::Sd1);
    }
    Err(Error::invalid(
        format!("model file {}", file.path().display()),
        "not a Stable Diffusion checkpoint in the original layout (no `model.diffusion_model.*` keys)",
    ))
}

/// Options of [`load_single_file_with`].
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` configs, `scheduler/` and `tokenizer/`
    /// are used instead of the inferred ones (diffusers' `from_single_file(..., config=folder)`); its
    /// weights are not read.
    pub config: Option<PathBuf>,
    /// Overrides the scheduler's `prediction_type` (`epsilon`, `v_prediction`): SD2.x checkpoints are
    /// taken as the 768-pixel v-prediction model, as diffusers does; give `epsilon` for SD2-base.
    pub prediction_type: Option<String>,
}

/// Builds a [`Weights`] view from (diffusers name → source) pairs, checking first that every required
/// stored tensor exists, so a missing one is reported under its name in the file.
struct IndexBuilder<'a> {
    file: &'a SafetensorsFile,
    index: HashMap<String, TensorSource>,
}

impl<'a> IndexBuilder<'a> {
    fn new(file: &'a SafetensorsFile) -> Self {
        Self {
            file,
            index: HashMap::new(),
        }
    }

    fn shape(&self, key: &str) -> Option<&[usize]> {
        self.file.tensors().get(key).map(|i| i.shape.as_slice())
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingKey {
            file: self.file.path().display().to_string(),
            key: key.to_string(),
        }
    }

    /// `dst` ← stored `src`; an error naming `src` if absent and `required`.
    fn tensor(&mut self, dst: String, src: String, required: bool) -> Result<()> {
        if self.shape(&src).is_none() {
            return if required {
                Err(self.missing(&src))
            } else {
                Ok(())
            };
        }
        self.index
            .insert(dst, TensorSource::Stored { file: 0, key: src });
        Ok(())
    }

    /// A module's `.weight` (required) and `.bias` (required when `bias`, taken if present otherwise).
    fn module(&mut self, dst: &str, src: &str, bias: bool) -> Result<()> {
        self.tensor(format!("{dst}.weight"), format!("{src}.weight"), true)?;
        self.tensor(format!("{dst}.bias"), format!("{src}.bias"), bias)
    }

    /// A Linear stored as a 1×1 convolution (`[out, in, 1, 1]`, LDM's VAE attention): read as `[out, in]`.
    fn linear_from_conv(&mut self, dst: &str, src: &str) -> Result<()> {
        let key = format!("{src}.weight");
        let shape = self.shape(&key).ok_or_else(|| self.missing(&key))?.to_vec();
        let source = if shape.len() > 2 {
            TensorSource::Reshaped {
                file: 0,
                key,
                shape: shape[..2].to_vec(),
            }
        } else {
            TensorSource::Stored { file: 0, key }
        };
        self.index.insert(format!("{dst}.weight"), source);
        self.tensor(format!("{dst}.bias"), format!("{src}.bias"), true)
    }

    /// `dst` ← the transpose of stored matrix `src` (required).
    fn transposed(&mut self, dst: &str, src: &str) -> Result<()> {
        if self.shape(src).is_none_or(|s| s.len() != 2) {
            return Err(self.missing(src));
        }
        self.index.insert(
            dst.to_string(),
            TensorSource::Transposed {
                file: 0,
                key: src.to_string(),
            },
        );
        Ok(())
    }

    /// `len` rows from `start` of stored `src` (dim 0).
    fn slice(&mut self, dst: String, src: String, start: usize, len: usize) -> Result<()> {
        let rows = self.shape(&src).ok_or_else(|| self.missing(&src))?[0];
        if start + len > rows {
            return Err(Error::Shape {
                file: self.file.path().display().to_string(),
                key: src,
                expected: vec![start + len],
                got: vec![rows],
            });
        }
        self.index.insert(
            dst,
            TensorSource::Slice {
                file: 0,
                key: src,
                dim: 0,
                start,
                len,
            },
        );
        Ok(())
    }

    fn finish(self, path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
        Ok(Weights::from_sources(
            vec![SafetensorsFile::open(path)?],
            self.index,
            dtype,
            device,
        ))
    }
}

/// The dimension `dim` of stored tensor `key`, or an error naming the key.
fn dim_of(file: &SafetensorsFile, key: &str, dim: usize) -> Result<usize> {
    let info = file.tensors().get(key).ok_or_else(|| Error::MissingKey {
        file: file.path().display().to_string(),
        key: key.to_string(),
    })?;
    info.shape.get(dim).copied().ok_or_else(|| Error::Shape {
        file: file.path().display().to_string(),
        key: key.to_string(),
        expected: vec![dim + 1],
        got: info.shape.clone(),
    })
}

/// Largest `N` such that some key starts with `{prefix}{N}.` — the count of numbered children is N + 1.
fn count_children(file: &SafetensorsFile, prefix: &str) -> usize {
    file.tensors()
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// Infers the UNet's config from an LDM checkpoint's keys and shapes: the stage widths from the resnet
/// convolutions, `layers_per_block` from where the first down-sampler sits, the stages with attention from
/// `proj_in`, `cross_attention_dim` from `attn2.to_k`, `use_linear_projection` from `proj_in` being 2-D,
/// `time_cond_proj_dim` from LCM's `time_embedding.cond_proj`, SDXL's `text_time` addition embedding
/// from `label_emb.0.0` (6 time ids × 256 + the pooled width); the head layout is the family's (SD1.x:
/// 8 heads per stage; SD2.x and SDXL: 64-wide heads, i.e. `attention_head_dim` [5, 10, 20, 20] at SD2's
/// widths, [5, 10, 20] at SDXL's; SD2.x with `upcast_attention`, as diffusers' SD2.1 config).
pub fn infer_unet_config(file: &SafetensorsFile, family: Family) -> Result<UNet2DConditionConfig> {
    let p = UNET_PREFIX;
    let k = |s: &str| format!("{p}{s}");
    let t = file.tensors();
    let n_inputs = count_children(file, &k("input_blocks."));
    let ops: Vec<usize> = (0..n_inputs)
        .filter(|i| t.contains_key(&k(&format!("input_blocks.{i}.0.op.weight"))))
        .collect();
    let layers = match ops.first() {
        Some(&first) => first - 1,
        None => n_inputs.saturating_sub(1),
    };
    if layers == 0 {
        return Err(Error::invalid(
            format!("model file {}", file.path().display()),
            "cannot infer the UNet's layers_per_block from `input_blocks.*`",
        ));
    }
    let stages = ops.len() + 1;
    let mut block_out_channels = Vec::with_capacity(stages);
    let mut cross = Vec::with_capacity(stages);
    for i in 0..stages {
        let b = 1 + i * (layers + 1);
        block_out_channels.push(dim_of(
            file,
            &k(&format!("input_blocks.{b}.0.in_layers.2.weight")),
            0,
        )?);
        let attn = k(&format!("input_blocks.{b}.1."));
        let has_attn = t.contains_key(&format!("{attn}proj_in.weight"));
        cross.push(has_attn);
    }
    let first_attn = (0..stages).find(|&i| cross[i]);
    let (cross_attention_dim, use_linear_projection) = match first_attn {
        Some(i) => {
            let b = 1 + i * (layers + 1);
            let a = k(&format!("input_blocks.{b}.1."));
            (
                dim_of(
                    file,
                    &format!("{a}transformer_blocks.0.attn2.to_k.weight"),
                    1,
                )?,
                t[&format!("{a}proj_in.weight")].shape.len() == 2,
            )
        }
        None => (768, false),
    };
    let (transformer_layers_per_block, reverse_transformer_layers_per_block) =
        infer_transformer_layers(file, &cross, layers);
    let attention_head_dim = match family {
        Family::Sd2 | Family::Sdxl => OneOrMany::Many(
            block_out_channels
                .iter()
                .map(|&c| (c / 64).max(1))
                .collect(),
        ),
        _ => OneOrMany::One(8),
    };
    let addition = t.get(&k("label_emb.0.0.weight")).map(|i| i.shape[1]);
    Ok(UNet2DConditionConfig {
        sample_size: Some(match family {
            Family::Sd2 => 96,
            Family::Sdxl => 128,
            _ => 64,
        }),
        in_channels: dim_of(file, &k("input_blocks.0.0.weight"), 1)?,
        out_channels: dim_of(file, &k("out.2.weight"), 0)?,
        down_block_types: cross
            .iter()
            .map(|&c| {
                if c {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
                .to_string()
            })
            .collect(),
        up_block_types: cross
            .iter()
            .rev()
            .map(|&c| if c { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
            .collect(),
        block_out_channels,
        layers_per_block: OneOrMany::One(layers),
        cross_attention_dim: OneOrMany::One(cross_attention_dim),
        transformer_layers_per_block,
        reverse_transformer_layers_per_block,
        attention_head_dim,
        use_linear_projection,
        upcast_attention: family == Family::Sd2,
        time_cond_proj_dim: t
            .get(&k("time_embedding.cond_proj.weight"))
            .map(|i| i.shape[1]),
        addition_embed_type: addition.map(|_| "text_time".to_string()),
        addition_time_embed_dim: addition.map(|_| 256),
        projection_class_embeddings_input_dim: addition,
        ..UNet2DConditionConfig::default()
    })
}

/// Transformer depths from the count of `transformer_blocks.N` in each attention of `input_blocks`,
/// `middle_block` and `output_blocks` (stages with attention given by `cross`, `layers` per down stage):
/// one value when every layer agrees, per block, or per layer of a block (SSD-1B, Segmind-Vega), with
/// `reverse_transformer_layers_per_block` when the up blocks are not the down blocks' mirror. A last
/// stage without attention takes the mid block's depth (diffusers' mid block reads the last entry).
fn infer_transformer_layers(
    file: &SafetensorsFile,
    cross: &[bool],
    layers: usize,
) -> (TransformerLayers, Option<TransformerLayers>) {
    // A stage's attention may hold no transformer block at all (a depth of 0).
    let depth =
        |block: &str| count_children(file, &format!("{UNET_PREFIX}{block}.1.transformer_blocks."));
    let stages = cross.len();
    let mid = depth("middle_block");
    let down: Vec<Vec<usize>> = (0..stages)
        .map(|i| {
            (0..layers)
                .map(|j| match cross[i] {
                    true => depth(&format!("input_blocks.{}", 1 + i * (layers + 1) + j)),
                    false if i + 1 == stages => mid,
                    false => 1,
                })
                .collect()
        })
        .collect();
    let up: Vec<Vec<usize>> = (0..stages)
        .map(|u| {
            let r = stages - 1 - u;
            (0..layers + 1)
                .map(|j| match cross[r] {
                    true => depth(&format!("output_blocks.{}", u * (layers + 1) + j)),
                    false => down[r][0],
                })
                .collect()
        })
        .collect();
    let compact = |v: &[Vec<usize>]| -> Vec<OneOrMany<usize>> {
        v.iter()
            .map(|b| match b.iter().all(|&x| x == b[0]) {
                true => OneOrMany::One(b[0]),
                false => OneOrMany::Many(b.clone()),
            })
            .collect()
    };
    let per_block = compact(&down);
    let uniform: Option<Vec<usize>> = per_block
        .iter()
        .map(|b| match b {
            OneOrMany::One(v) => Some(*v),
            OneOrMany::Many(_) => None,
        })
        .collect();
    let mirrored = uniform
        .as_ref()
        .is_some_and(|u| (0..stages).all(|i| up[i].iter().all(|&d| d == u[stages - 1 - i])));
    let forward = match &uniform {
        Some(u) if u.iter().all(|&x| x == u[0]) => TransformerLayers::All(u[0]),
        _ => TransformerLayers::PerBlock(per_block),
    };
    let reverse = (!mirrored).then(|| TransformerLayers::PerBlock(compact(&up)));
    (forward, reverse)
}

/// Maps the UNet of an LDM checkpoint (under `prefix`) to diffusers' names, per [`unet_module_map`].
fn unet_index(b: &mut IndexBuilder, cfg: &UNet2DConditionConfig, prefix: &str) -> Result<()> {
    for (d, l) in unet_module_map(cfg)? {
        // Stable Diffusion's attention projections q/k/v and LCM's cond_proj have no bias.
        let bias = !(d.ends_with(".to_q")
            || d.ends_with(".to_k")
            || d.ends_with(".to_v")
            || d.ends_with("cond_proj"));
        b.module(&d, &format!("{prefix}{l}"), bias)?;
    }
    Ok(())
}

/// The LDM `Encoder`/`Decoder` (`ldm/modules/diffusionmodules/model.py`) against diffusers'
/// `AutoencoderKL`, keys under `prefix`: `encoder.down.N.block.M` → `encoder.down_blocks.N.resnets.M`,
/// `encoder.down.N.downsample.conv` → `….downsamplers.0.conv`, `decoder.up.N.block.M` →
/// `decoder.up_blocks.{last-N}.resnets.M` (LDM numbers the decoder's stages from the bottom),
/// `mid.block_1/2` → `mid_block.resnets.0/1`, `mid.attn_1.{norm,q,k,v,proj_out}` →
/// `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1×1 convs read as Linears),
/// `norm_out` → `conv_norm_out`, resnet `nin_shortcut` → `conv_shortcut`.
fn vae_index(b: &mut IndexBuilder, cfg: &AutoencoderKLConfig, prefix: &str) -> Result<()> {
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let resnet = |b: &mut IndexBuilder, d: &str, l: &str, shortcut: bool| -> Result<()> {
        for name in ["norm1", "conv1", "norm2", "conv2"] {
            b.module(&format!("{d}.{name}"), &format!("{l}.{name}"), true)?;
        }
        if shortcut {
            b.module(
                &format!("{d}.conv_shortcut"),
                &format!("{l}.nin_shortcut"),
                true,
            )?;
        }
        Ok(())
    };
    let mid = |b: &mut IndexBuilder, part: &str| -> Result<()> {
        let (d, l) = (format!("{part}.mid_block"), format!("{prefix}{part}.mid"));
        resnet(b, &format!("{d}.resnets.0"), &format!("{l}.block_1"), false)?;
        if cfg.mid_block_add_attention {
            let (da, la) = (format!("{d}.attentions.0"), format!("{l}.attn_1"));
            b.module(&format!("{da}.group_norm"), &format!("{la}.norm"), true)?;
            for (dn, ln) in [
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ] {
                b.linear_from_conv(&format!("{da}.{dn}"), &format!("{la}.{ln}"))?;
            }
        }
        resnet(b, &format!("{d}.resnets.1"), &format!("{l}.block_2"), false)
    };
    for part in ["encoder", "decoder"] {
        for name in ["conv_in", "conv_out"] {
            b.module(
                &format!("{part}.{name}"),
                &format!("{prefix}{part}.{name}"),
                true,
            )?;
        }
        b.module(
            &format!("{part}.conv_norm_out"),
            &format!("{prefix}{part}.norm_out"),
            true,
        )?;
        mid(b, part)?;
    }
    let mut out = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { out } else { c };
            resnet(
                b,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &format!("{prefix}encoder.down.{i}.block.{j}"),
                cin != c,
            )?;
        }
        out = c;
        if i + 1 < n {
            b.module(
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                &format!("{prefix}encoder.down.{i}.downsample.conv"),
                true,
            )?;
        }
    }
    let mut out = ch[n - 1];
    for i in 0..n {
        let r = n - 1 - i;
        let c = ch[r];
        for j in 0..cfg.layers_per_block + 1 {
            let cin = if j == 0 { out } else { c };
            resnet(
                b,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                &format!("{prefix}decoder.up.{r}.block.{j}"),
                cin != c,
            )?;
        }
        out = c;
        if i + 1 < n {
            b.module(
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                &format!("{prefix}decoder.up.{r}.upsample.conv"),
                true,
            )?;
        }
    }
    if cfg.use_quant_conv {
        b.module("quant_conv", &format!("{prefix}quant_conv"), true)?;
    }
    if cfg.use_post_quant_conv {
        b.module("post_quant_conv", &format!("{prefix}post_quant_conv"), true)?;
    }
    Ok(())
}

/// Infers an `AutoencoderKL` config from LDM VAE keys under `prefix`: stage widths from
/// `encoder.down.N.block.0.conv1`, `layers_per_block` from the encoder's blocks, latent channels from
/// `decoder.conv_in`; scaling factor 0.18215 (SDXL: 0.13025), no shift.
fn infer_ldm_vae_config(
    file: &SafetensorsFile,
    prefix: &str,
    family: Family,
) -> Result<AutoencoderKLConfig> {
    let k = |s: &str| format!("{prefix}{s}");
    let t = file.tensors();
    let n = count_children(file, &k("encoder.down."));
    if n == 0 {
        return Err(Error::MissingKey {
            file: file.path().display().to_string(),
            key: k("encoder.down.0.block.0.conv1.weight"),
        });
    }
    let block_out_channels = (0..n)
        .map(|i| {
            dim_of(
                file,
                &k(&format!("encoder.down.{i}.block.0.conv1.weight")),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AutoencoderKLConfig {
        in_channels: dim_of(file, &k("encoder.conv_in.weight"), 1)?,
        out_channels: dim_of(file, &k("decoder.conv_out.weight"), 0)?,
        down_block_types: vec!["DownEncoderBlock2D".into(); n],
        up_block_types: vec!["UpDecoderBlock2D".into(); n],
        block_out_channels,
        layers_per_block: count_children(file, &k("encoder.down.0.block.")),
        latent_channels: dim_of(file, &k("decoder.conv_in.weight"), 1)?,
        sample_size: match family {
            Family::Sd2 => 768,
            Family::Sdxl => 1024,
            _ => 512,
        },
        scaling_factor: if family == Family::Sdxl {
            0.13025
        } else {
            0.18215
        },
        use_quant_conv: t.contains_key(&k("quant_conv.weight")),
        use_post_quant_conv: t.contains_key(&k("post_quant_conv.weight")),
        mid_block_add_attention: t.contains_key(&k("encoder.mid.attn_1.q.weight")),
        ..AutoencoderKLConfig::default()
    })
}

/// Infers a CLIP ViT-L text encoder's config from transformers-layout keys under `p`
/// (`…text_model.embeddings.token_embedding.weight`): quick_gelu, every stored layer, 64-wide heads.
fn infer_clip_config(file: &SafetensorsFile, p: &str) -> Result<ClipTextConfig> {
    let emb = format!("{p}embeddings.token_embedding.weight");
    let hidden = dim_of(file, &emb, 1)?;
    Ok(ClipTextConfig {
        vocab_size: dim_of(file, &emb, 0)?,
        hidden_size: hidden,
        intermediate_size: dim_of(file, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?,
        projection_dim: 768,
        num_hidden_layers: count_children(file, &format!("{p}encoder.layers.")),
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: dim_of(
            file,
            &format!("{p}embeddings.position_embedding.weight"),
            0,
        )?,
        hidden_act: "quick_gelu".into(),
        ..ClipTextConfig::default()
    })
}

/// Infers an OpenCLIP text tower's config (keys under `p`), read as a transformers `CLIPTextModel`:
/// gelu, 64-wide heads, the legacy ids (bos 0, eos 2, pad 1) of SD2's and SDXL's configs. With
/// `drop_last` one layer fewer than stored (SD2 conditions on the penultimate layer; diffusers' SD2
/// config has `num_hidden_layers` 23 of 24); SDXL keeps every layer and its `text_projection`
/// (`projection_dim` from its shape).
fn infer_open_clip_config(
    file: &SafetensorsFile,
    p: &str,
    drop_last: bool,
) -> Result<ClipTextConfig> {
    let emb = format!("{p}token_embedding.weight");
    let hidden = dim_of(file, &emb, 1)?;
    let stored = count_children(file, &format!("{p}transformer.resblocks."));
    if stored < 2 {
        return Err(Error::MissingKey {
            file: file.path().display().to_string(),
            key: format!("{p}transformer.resblocks.1.attn.in_proj_weight"),
        });
    }
    let projection = format!("{p}text_projection");
    Ok(ClipTextConfig {
        vocab_size: dim_of(file, &emb, 0)?,
        hidden_size: hidden,
        intermediate_size: dim_of(
            file,
            &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
            0,
        )?,
        projection_dim: if drop_last {
            512
        } else {
            dim_of(file, &projection, 1)?
        },
        num_hidden_layers: if drop_last { stored - 1 } else { stored },
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: dim_of(file, &format!("{p}positional_embedding"), 0)?,
        hidden_act: "gelu".into(),
        pad_token_id: Some(1),
        bos_token_id: Some(0),
        eos_token_id: Some(2),
        ..ClipTextConfig::default()
    })
}

/// Infers the (first) text encoder's config: SD1.x's and SDXL's CLIP ViT-L, or SD2.x's OpenCLIP ViT-H.
fn infer_text_config(file: &SafetensorsFile, family: Family) -> Result<ClipTextConfig> {
    match family {
        Family::Sd1 => infer_clip_config(file, &format!("{CLIP_PREFIX}text_model.")),
        Family::Sd2 => infer_open_clip_config(file, OPEN_CLIP_PREFIX, true),
        Family::Sdxl => infer_clip_config(file, &format!("{SDXL_CLIP_PREFIX}text_model.")),
        _ => Err(unsupported_family(file, family)),
    }
}

/// A CLIP stored in transformers' layout under `src` (`…text_model.X` is `text_model.X`;
/// `position_ids` and other extra keys are ignored).
fn clip_index(b: &mut IndexBuilder, cfg: &ClipTextConfig, src: &str) -> Result<()> {
    let p = format!("{src}text_model.");
    for e in ["token_embedding", "position_embedding"] {
        b.tensor(
            format!("text_model.embeddings.{e}.weight"),
            format!("{p}embeddings.{e}.weight"),
            true,
        )?;
    }
    for i in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layers.{i}");
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            b.module(&format!("text_model.{l}.{m}"), &format!("{p}{l}.{m}"), true)?;
        }
    }
    b.module(
        "text_model.final_layer_norm",
        &format!("{p}final_layer_norm"),
        true,
    )
}

/// An OpenCLIP text tower (`open_clip`'s `TextTransformer`, keys under `p`) read as a `CLIPTextModel`:
/// `token_embedding`, `positional_embedding` → `embeddings.position_embedding.weight`,
/// `transformer.resblocks.N.attn.in_proj_*` sliced into q/k/v (rows `0..H`, `H..2H`, `2H..3H`),
/// `attn.out_proj`, `ln_1`/`ln_2` → `layer_norm1`/`layer_norm2`, `mlp.c_fc`/`mlp.c_proj` →
/// `mlp.fc1`/`mlp.fc2`, `ln_final` → `final_layer_norm`. Only the config's first `num_hidden_layers`
/// blocks are read. With `projection` (SDXL), `text_projection` (`x · P`) becomes
/// `text_projection.weight = Pᵀ`; SD2 leaves it and its last block unused, as diffusers does.
fn open_clip_index(
    b: &mut IndexBuilder,
    cfg: &ClipTextConfig,
    p: &str,
    projection: bool,
) -> Result<()> {
    let h = cfg.hidden_size;
    b.tensor(
        "text_model.embeddings.token_embedding.weight".into(),
        format!("{p}token_embedding.weight"),
        true,
    )?;
    b.tensor(
        "text_model.embeddings.position_embedding.weight".into(),
        format!("{p}positional_embedding"),
        true,
    )?;
    for i in 0..cfg.num_hidden_layers {
        let (d, l) = (
            format!("text_model.encoder.layers.{i}"),
            format!("{p}transformer.resblocks.{i}"),
        );
        for (j, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            b.slice(
                format!("{d}.self_attn.{q}.weight"),
                format!("{l}.attn.in_proj_weight"),
                j * h,
                h,
            )?;
            b.slice(
                format!("{d}.self_attn.{q}.bias"),
                format!("{l}.attn.in_proj_bias"),
                j * h,
                h,
            )?;
        }
        for (dn, ln) in [
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ] {
            b.module(&format!("{d}.{dn}"), &format!("{l}.{ln}"), true)?;
        }
    }
    if projection {
        b.transposed("text_projection.weight", &format!("{p}text_projection"))?;
    }
    b.module("text_model.final_layer_norm", &format!("{p}ln_final"), true)
}

/// The scheduler config diffusers takes for the family: SD1.5's PNDM config; SD2.1's DDIM config with
/// `v_prediction` (diffusers' default SD2 repo is the 768-pixel v-prediction model); SDXL base's
/// Euler config (`timestep_spacing` leading).
pub fn default_scheduler_config(family: Family) -> SchedulerConfig {
    let (class, prediction) = match family {
        Family::Sd2 => ("DDIMScheduler", Some("v_prediction".to_string())),
        Family::Sdxl => ("EulerDiscreteScheduler", Some("epsilon".to_string())),
        _ => ("PNDMScheduler", None),
    };
    let sdxl = family == Family::Sdxl;
    SchedulerConfig {
        class_name: Some(class.into()),
        num_train_timesteps: Some(1000),
        beta_start: Some(0.00085),
        beta_end: Some(0.012),
        beta_schedule: Some("scaled_linear".into()),
        prediction_type: prediction,
        set_alpha_to_one: Some(false),
        steps_offset: Some(1),
        clip_sample: Some(false),
        timestep_spacing: sdxl.then(|| "leading".to_string()),
        interpolation_type: sdxl.then(|| "linear".to_string()),
        use_karras_sigmas: sdxl.then_some(false),
        ..SchedulerConfig::default()
    }
}

fn unsupported_family(file: &SafetensorsFile, family: Family) -> Error {
    Error::invalid(
        format!("model file {}", file.path().display()),
        format!(
            "{family} checkpoints are not supported yet (Stable Diffusion 1.x, 2.x and SDXL base single \
             files are)"
        ),
    )
}

/// Loads a single-file SD1.x/SD2.x/SDXL checkpoint with every configuration inferred from it.
pub fn load_single_file(path: &Path, dtype: DType, device: &Device) -> Result<ModelParts> {
    load_single_file_with(path, &SingleFileOptions::default(), dtype, device)
}

/// Loads a single-file SD1.x/SD2.x/SDXL checkpoint: the family and configs inferred (or taken from
/// `opts.config`), each component a [`Weights`] view of the file under diffusers' names, the tokenizer the
/// bundled CLIP BPE (padding with EOS for SD1.x, `!` for SD2.x; SDXL's second tokenizer pads with `!`).
/// The SDXL refiner is refused. Storage in f16, bf16 or f32 is converted to `dtype` as tensors are read.
/// Keys no component uses (`model_ema.*`, `…position_ids`, `logit_scale`, SD2's last text block) are
/// ignored.
pub fn load_single_file_with(
    path: &Path,
    opts: &SingleFileOptions,
    dtype: DType,
    device: &Device,
) -> Result<ModelParts> {
    let file = SafetensorsFile::open(path)?;
    let family = detect(&file)?;
    if family == Family::SdxlRefiner {
        return Err(unsupported_family(&file, family));
    }
    let sdxl = family == Family::Sdxl;
    let folder = match &opts.config {
        Some(dir) => Some(super::diffusers::DiffusersFolder::open(dir)?),
        None => None,
    };
    let cfg = |name: &str| -> Result<Option<PathBuf>> {
        Ok(match &folder {
            Some(f) => Some(f.component_dir(name)?.join("config.json")),
            None => None,
        })
    };
    let unet_config = match cfg("unet")? {
        Some(p) => load_json(&p)?,
        None => infer_unet_config(&file, family)?,
    };
    let vae_config = match cfg("vae")? {
        Some(p) => load_json(&p)?,
        None => infer_ldm_vae_config(&file, VAE_PREFIX, family)?,
    };
    let text_encoder_config = match cfg("text_encoder")? {
        Some(p) => load_json(&p)?,
        None => infer_text_config(&file, family)?,
    };
    let mut scheduler_config = match &folder {
        Some(f) => load_json(&f.scheduler_config()?)?,
        None => default_scheduler_config(family),
    };
    if let Some(p) = &opts.prediction_type {
        scheduler_config.prediction_type = Some(p.clone());
    }
    let tokenizer = match &folder {
        Some(f) => ClipTokenizer::from_dir(&f.component_dir("tokenizer")?)?,
        None => ClipTokenizer::bundled(match family {
            Family::Sd2 => PadToken::Bang,
            _ => PadToken::Eos,
        })?,
    };

    let mut b = IndexBuilder::new(&file);
    unet_index(&mut b, &unet_config, UNET_PREFIX)?;
    let unet = b.finish(path, dtype, device)?;
    let mut b = IndexBuilder::new(&file);
    vae_index(&mut b, &vae_config, VAE_PREFIX)?;
    let vae = b.finish(path, dtype, device)?;
    let mut b = IndexBuilder::new(&file);
    match family {
        Family::Sd2 => open_clip_index(&mut b, &text_encoder_config, OPEN_CLIP_PREFIX, false)?,
        Family::Sdxl => clip_index(&mut b, &text_encoder_config, SDXL_CLIP_PREFIX)?,
        _ => clip_index(&mut b, &text_encoder_config, CLIP_PREFIX)?,
    }
    let text_encoder = b.finish(path, dtype, device)?;
    let text_encoder_2 = if sdxl {
        let config = match cfg("text_encoder_2")? {
            Some(p) => load_json(&p)?,
            None => infer_open_clip_config(&file, SDXL_OPEN_CLIP_PREFIX, false)?,
        };
        let tokenizer = match &folder {
            Some(f) => ClipTokenizer::from_dir(&f.component_dir("tokenizer_2")?)?,
            None => ClipTokenizer::bundled(PadToken::Bang)?,
        };
        let mut b = IndexBuilder::new(&file);
        open_clip_index(&mut b, &config, SDXL_OPEN_CLIP_PREFIX, true)?;
        Some(TextEncoder2Parts {
            tokenizer,
            config,
            weights: b.finish(path, dtype, device)?,
        })
    } else {
        None
    };
    tracing::info!(file = %path.display(), %family, "single-file checkpoint");
    let parts = ModelParts {
        tokenizer,
        text_encoder_config,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt: sdxl,
        unet_config,
        unet,
        vae_config,
        vae,
        taesd: None,
        scheduler_config,
    };
    parts.check_family()?;
    Ok(parts)
}

/// Loads a VAE file to replace a model's (`--vae`): the LDM layout of the published
/// `sd-vae-ft-mse-original` `.safetensors` (`encoder.down.0.block.0.conv1.weight`, with or without a
/// `first_stage_model.` prefix) or diffusers' `AutoencoderKL` names. The config is inferred from the shapes
/// (scaling factor 0.18215); a `config.json` beside a diffusers-named file is used when present.
pub fn load_vae_file(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(AutoencoderKLConfig, Weights)> {
    load_vae_file_like(path, None, dtype, device)
}

/// As [`load_vae_file`], taking what shapes cannot tell (`norm_num_groups`, `scaling_factor`,
/// `shift_factor`, `force_upcast`, `sample_size`) from `like` — the config of the VAE being replaced —
/// when the file's architecture (widths, layers, channels) is the same; otherwise SD's values (32 groups,
/// 0.18215).
pub fn load_vae_file_like(
    path: &Path,
    like: Option<&AutoencoderKLConfig>,
    dtype: DType,
    device: &Device,
) -> Result<(AutoencoderKLConfig, Weights)> {
    let adopt = |mut cfg: AutoencoderKLConfig| {
        if let Some(l) = like {
            if l.block_out_channels == cfg.block_out_channels
                && l.layers_per_block == cfg.layers_per_block
                && l.latent_channels == cfg.latent_channels
                && l.in_channels == cfg.in_channels
                && l.out_channels == cfg.out_channels
            {
                cfg.norm_num_groups = l.norm_num_groups;
                cfg.scaling_factor = l.scaling_factor;
                cfg.shift_factor = l.shift_factor;
                cfg.force_upcast = l.force_upcast;
                cfg.sample_size = l.sample_size;
            }
        }
        cfg
    };
    let file = SafetensorsFile::open(path)?;
    let t = file.tensors();
    for prefix in ["", VAE_PREFIX] {
        if t.contains_key(&format!("{prefix}encoder.down.0.block.0.conv1.weight")) {
            let cfg = adopt(infer_ldm_vae_config(&file, prefix, Family::Sd1)?);
            let mut b = IndexBuilder::new(&file);
            vae_index(&mut b, &cfg, prefix)?;
            return Ok((cfg, b.finish(path, dtype, device)?));
        }
    }
    if t.contains_key("encoder.down_blocks.0.resnets.0.conv1.weight") {
        let beside = path.with_file_name("config.json");
        let cfg = if beside.is_file() {
            load_json(&beside)?
        } else {
            adopt(infer_diffusers_vae_config(&file)?)
        };
        return Ok((cfg, Weights::from_files(&[path], dtype, device)?));
    }
    Err(Error::invalid(
        format!("vae file {}", path.display()),
        "not a VAE: expected LDM keys (`encoder.down.0.block.0.conv1.weight`) or diffusers keys (`encoder.down_blocks.0.resnets.0.conv1.weight`)",
    ))
}

/// An `AutoencoderKL` config from diffusers-named VAE keys.
fn infer_diffusers_vae_config(file: &SafetensorsFile) -> Result<AutoencoderKLConfig> {
    let t = file.tensors();
    let n = count_children(file, "encoder.down_blocks.");
    let block_out_channels = (0..n)
        .map(|i| {
            dim_of(
                file,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AutoencoderKLConfig {
        in_channels: dim_of(file, "encoder.conv_in.weight", 1)?,
        out_channels: dim_of(file, "decoder.conv_out.weight", 0)?,
        down_block_types: vec!["DownEncoderBlock2D".into(); n],
        up_block_types: vec!["UpDecoderBlock2D".into(); n],
        block_out_channels,
        layers_per_block: count_children(file, "encoder.down_blocks.0.resnets."),
        latent_channels: dim_of(file, "decoder.conv_in.weight", 1)?,
        use_quant_conv: t.contains_key("quant_conv.weight"),
        use_post_quant_conv: t.contains_key("post_quant_conv.weight"),
        mid_block_add_attention: t.contains_key("encoder.mid_block.attentions.0.to_q.weight"),
        ..AutoencoderKLConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_examples() {
        let map = unet_module_map(&UNet2DConditionConfig::default()).unwrap();
        let has = |d: &str, l: &str| {
            assert!(
                map.iter().any(|(a, b)| a == d && b == l),
                "missing ({d}, {l})"
            )
        };
        has(
            "down_blocks.0.resnets.0.conv1",
            "input_blocks.1.0.in_layers.2",
        );
        has(
            "down_blocks.0.attentions.0.proj_in",
            "input_blocks.1.1.proj_in",
        );
        has(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        );
        has("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op");
        has(
            "down_blocks.1.resnets.0.conv_shortcut",
            "input_blocks.4.0.skip_connection",
        );
        has(
            "down_blocks.3.resnets.1.conv2",
            "input_blocks.11.0.out_layers.3",
        );
        has("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2");
        has(
            "mid_block.resnets.1.time_emb_proj",
            "middle_block.2.emb_layers.1",
        );
        has("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv");
        has("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv");
        has(
            "up_blocks.3.resnets.2.conv_shortcut",
            "output_blocks.11.0.skip_connection",
        );
        has(
            "up_blocks.3.attentions.2.proj_out",
            "output_blocks.11.1.proj_out",
        );
        has("time_embedding.linear_1", "time_embed.0");
        has("conv_in", "input_blocks.0.0");
        has("conv_norm_out", "out.0");
        has("conv_out", "out.2");
        assert!(!map
            .iter()
            .any(|(d, _)| d.starts_with("down_blocks.3.attentions")));
        assert!(!map
            .iter()
            .any(|(d, _)| d.starts_with("up_blocks.3.upsamplers")));
        let mut ds: Vec<_> = map.iter().map(|(d, _)| d).collect();
        ds.sort();
        ds.dedup();
        assert_eq!(ds.len(), map.len());
    }
}
