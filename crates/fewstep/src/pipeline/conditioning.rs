//! The text conditioning of a batch: the UNet's context (`encoder_hidden_states`) and, for SDXL, the
//! micro-conditioning (pooled prompt embedding + size ids), assembled as diffusers' `encode_prompt` and
//! `_get_add_time_ids` do, with the unconditional half first under classifier-free guidance.

use candle_core::Tensor;

use super::StableDiffusion;
use crate::models::unet::TextTimeCond;
use crate::Result;

/// The embeddings of one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, 77, D]`: SD1.x/SD2.x — the text encoder's `last_hidden_state` (or its `clip_skip` layer);
    /// SDXL — both encoders' `hidden_states[-(clip_skip + 2)]` side by side (768 + 1280 = 2048 wide).
    pub context: Tensor,
    /// SDXL: `[1, projection_dim]`, the second encoder's `text_embeds`.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// diffusers' `force_zeros_for_empty_prompt` negative: zeros of the same shapes.
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }

    /// Each of `rows` repeated `n` times, in order, and concatenated along the batch.
    pub fn batch(rows: &[(PromptEmbeds, usize)]) -> Result<Self> {
        let context = rows
            .iter()
            .map(|(p, n)| p.context.repeat((*n, 1, 1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = rows
            .iter()
            .map(|(p, n)| p.pooled.as_ref().map(|t| t.repeat((*n, 1))).transpose())
            .collect::<candle_core::Result<Option<Vec<_>>>>()?;
        Ok(Self {
            context: Tensor::cat(&context, 0)?,
            pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()?,
        })
    }
}

/// SDXL's `add_time_ids` for a picture of `height × width`: `(original_size, crops_coords_top_left,
/// target_size)` = `(h, w, 0, 0, h, w)` (diffusers' defaults), one row per batch entry.
pub fn time_ids(
    height: usize,
    width: usize,
    rows: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let (h, w) = (height as f32, width as f32);
    let row = [h, w, 0.0, 0.0, h, w];
    let data: Vec<f32> = (0..rows).flat_map(|_| row).collect();
    Ok(Tensor::from_vec(data, (rows, 6), device)?)
}

impl StableDiffusion {
    /// One prompt's embeddings (diffusers' `encode_prompt` with `clip_skip`); a prompt over 75 tokens is
    /// truncated with a warning. SDXL runs both tokenizers and encoders on the same text.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: Option<usize>) -> Result<PromptEmbeds> {
        let ids = |tok: &crate::tokenizer::ClipTokenizer| -> Result<Tensor> {
            let ids = tok.encode(prompt)?;
            Ok(Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?)
        };
        let Some((tokenizer_2, encoder_2)) = &self.text_encoder_2 else {
            let context = self
                .text_encoder
                .encode(&ids(&self.tokenizer)?, clip_skip)?;
            return Ok(PromptEmbeds {
                context,
                pooled: None,
            });
        };
        let (h1, _) = self
            .text_encoder
            .encode_penultimate(&ids(&self.tokenizer)?, clip_skip)?;
        let (h2, pooled) = encoder_2.encode_penultimate(&ids(tokenizer_2)?, clip_skip)?;
        Ok(PromptEmbeds {
            context: Tensor::cat(&[&h1, &h2.to_dtype(h1.dtype())?], 2)?,
            pooled,
        })
    }

    /// The negative prompt's embeddings: zeros for an SDXL model with `force_zeros_for_empty_prompt`
    /// when no negative prompt is given (diffusers' `negative_prompt=None`), the encoded text otherwise
    /// (`""` when none is given) — without `clip_skip`, which diffusers applies to the prompt alone.
    pub fn encode_negative(&self, negative: &str, cond: &PromptEmbeds) -> Result<PromptEmbeds> {
        if negative.is_empty() && self.force_zeros_for_empty_prompt && cond.pooled.is_some() {
            return cond.zeros_like();
        }
        self.encode_prompt(negative, None)
    }

    /// The UNet's added conditioning for a batch of `embeds` (SDXL only): the pooled embeddings and the
    /// time ids of a `height × width` picture.
    pub fn added_cond(
        &self,
        embeds: &PromptEmbeds,
        height: usize,
        width: usize,
    ) -> Result<Option<TextTimeCond>> {
        let Some(pooled) = &embeds.pooled else {
            return Ok(None);
        };
        let rows = pooled.dim(0)?;
        Ok(Some(TextTimeCond {
            text_embeds: pooled.to_dtype(self.dtype)?,
            time_ids: time_ids(height, width, rows, &self.device)?,
        }))
    }
}
