//! Serde mirrors of diffusers' and transformers' `config.json` files. Field names are the files' keys;
//! a missing key takes the default of the Python class, so any config diffusers reads, we read.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Reads and parses a JSON config; a wrong type names the field (`block_out_channels[1]: invalid type …`).
pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: format!("field `{}`: {}", e.path(), e.inner()),
    })
}

/// Reads `null` as the type's default: diffusers writes `"upcast_attention": null` (SDXL base) where its
/// Python default is `False`.
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A config value given either once for all blocks or per block (diffusers accepts both).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for block `i`.
    pub fn get(&self, i: usize) -> T {
        match self {
            OneOrMany::One(v) => v.clone(),
            OneOrMany::Many(v) => v[i.min(v.len() - 1)].clone(),
        }
    }

    /// Number of per-block values, if given per block.
    pub fn per_block_len(&self) -> Option<usize> {
        match self {
            OneOrMany::One(_) => None,
            OneOrMany::Many(v) => Some(v.len()),
        }
    }
}

/// A UNet's transformer depth (`transformer_layers_per_block`, `reverse_transformer_layers_per_block`):
/// one for all blocks, one per block (SDXL's `[1, 2, 10]`), or per layer of a block (the distilled SDXLs,
/// SSD-1B and Segmind-Vega: `[1, [2, 2], [4, 4]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TransformerLayers {
    All(usize),
    PerBlock(Vec<OneOrMany<usize>>),
}

impl TransformerLayers {
    /// The depth of layer `layer` of block `block`.
    pub fn get(&self, block: usize, layer: usize) -> usize {
        match self {
            TransformerLayers::All(v) => *v,
            TransformerLayers::PerBlock(v) => v[block.min(v.len() - 1)].get(layer),
        }
    }

    /// Number of per-block values, if given per block.
    pub fn per_block_len(&self) -> Option<usize> {
        match self {
            TransformerLayers::All(_) => None,
            TransformerLayers::PerBlock(v) => Some(v.len()),
        }
    }

    /// Whether some block gives one value per layer.
    pub fn is_per_layer(&self) -> bool {
        matches!(self, TransformerLayers::PerBlock(v) if v.iter().any(|b| b.per_block_len().is_some()))
    }
}

/// `UNet2DConditionModel`'s config (diffusers `unet/config.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(deserialize_with = "null_as_default")]
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    pub transformer_layers_per_block: TransformerLayers,
    /// Despite its name, diffusers uses this as the number of heads when `num_attention_heads` is unset.
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(deserialize_with = "null_as_default")]
    pub use_linear_projection: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub timestep_post_act: Option<String>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub mid_block_only_cross_attention: Option<bool>,
    pub encoder_hid_dim_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    #[serde(deserialize_with = "null_as_default")]
    pub class_embeddings_concat: bool,
    pub time_embedding_act_fn: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub dual_cross_attention: bool,
    pub attention_type: String,
    pub cross_attention_norm: Option<String>,
    /// The up blocks' depths per layer, required by diffusers when `transformer_layers_per_block` has
    /// per-layer lists (an asymmetric UNet).
    pub reverse_transformer_layers_per_block: Option<TransformerLayers>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: TransformerLayers::All(1),
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_cond_proj_dim: None,
            timestep_post_act: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            encoder_hid_dim: None,
            mid_block_only_cross_attention: None,
            encoder_hid_dim_type: None,
            num_class_embeds: None,
            class_embeddings_concat: false,
            time_embedding_act_fn: None,
            dual_cross_attention: false,
            attention_type: "default".into(),
            cross_attention_norm: None,
            reverse_transformer_layers_per_block: None,
        }
    }
}

impl UNet2DConditionConfig {
    /// Transformer depth of layer `j` of down block `i` (the mid block reads block `n − 1`, layer 0).
    pub fn down_transformer_layers(&self, i: usize, j: usize) -> usize {
        self.transformer_layers_per_block.get(i, j)
    }

    /// Transformer depth of layer `j` of up block `i` (diffusers' order, deepest first):
    /// `reverse_transformer_layers_per_block[i][j]` when given, else the matching down block's
    /// `transformer_layers_per_block[n − 1 − i]`.
    pub fn up_transformer_layers(&self, i: usize, j: usize) -> usize {
        match &self.reverse_transformer_layers_per_block {
            Some(r) => r.get(i, j),
            None => {
                let n = self.block_out_channels.len();
                self.transformer_layers_per_block.get(n - 1 - i, 0)
            }
        }
    }

    /// Heads of down block `i`: diffusers' `num_attention_heads or attention_head_dim`.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }
}

/// `AutoencoderKL`'s config (diffusers `vae/config.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Pixels per latent along each side: `2^(len(block_out_channels) - 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// transformers' `CLIPTextConfig` (`text_encoder/config.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// `scheduler/scheduler_config.json`. Every field is optional: as diffusers' `from_config`, a scheduler
/// takes the keys it knows from the file and its own class defaults for the rest.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub set_alpha_to_one: Option<bool>,
    pub steps_offset: Option<usize>,
    pub timestep_spacing: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub interpolation_type: Option<String>,
}
