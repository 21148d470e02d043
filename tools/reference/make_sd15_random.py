#!/usr/bin/env python3
"""Build a random-weight Stable Diffusion 1.5 with the REAL SD1.5 configuration and save it as a diffusers folder.

    python tools/reference/make_sd15_random.py OUTDIR [--seed 0] [--tiny]

Layout as runwayml/stable-diffusion-v1-5 (fp32 safetensors, no safety checker):
  model_index.json, unet/, vae/, text_encoder/ (keys prefixed `text_model.` as the real folder),
  tokenizer/ (copied from /work/shared/tokenizers/clip or $CLIP_TOKENIZER_DIR), scheduler/ (SD1.5 PNDM config),
  and beside them taesd/ (an AutoencoderTiny with madebyollin/taesd's configuration, for `fewstep bench --taesd`).
Weights: every parameter re-drawn by make_fixtures.reinit (no zero-initialised layers).
`--tiny` swaps in the tiny-sd shapes, for a quick self-test of this script (a few seconds).
Full size: UNet ~860M params (3.4 GB), text encoder 123M (0.5 GB), VAE 84M (0.3 GB).
"""

import argparse
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 center_input_sample=False, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"],
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                 mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
# vae/config.json
SD15_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                sample_size=512, scaling_factor=0.18215)
# text_encoder/config.json (CLIP ViT-L/14 text tower; SD1.5 keeps the legacy bos 0 / eos 2 ids, which makes
# transformers pool at argmax(input_ids) = the first 49407)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0,
                 initializer_range=0.02, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny-sd shapes (self-test)")
    a = ap.parse_args()
    out = Path(a.outdir)

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg = SD15_UNET, SD15_VAE, SD15_TEXT
    if a.tiny:
        unet_cfg, vae_cfg = mf.UNET_SD, mf.VAE_CFG
        text_cfg = dict(SD15_TEXT, **{k: mf.TEXT_CFG[k] for k in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers", "num_attention_heads",
                                                                  "projection_dim")})
    print("building text encoder", flush=True)
    te = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    mf.reinit(te, a.seed + 1)
    print("building unet", flush=True)
    unet = UNet2DConditionModel(**unet_cfg).eval()
    mf.reinit(unet, a.seed + 2)
    print("building vae", flush=True)
    vae = AutoencoderKL(**vae_cfg).eval()
    mf.reinit(vae, a.seed + 3)
    tok = CLIPTokenizer.from_pretrained(str(mf.TOKENIZER_DIR))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(mf.SD15_PNDM_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    print(f"saving to {out}", flush=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    mf.write_json(out / "scheduler" / "scheduler_config.json", mf.SD15_PNDM_CONFIG)
    mf.copy_tokenizer(out / "tokenizer")
    for f in sorted((out / "text_encoder").glob("*.safetensors")):
        mf.add_text_model_prefix(f)
    _, info = CLIPTextModel.from_pretrained(str(out / "text_encoder"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # madebyollin/taesd's configuration (AutoencoderTiny's defaults), beside the pipeline: `--vae OUT/taesd/…`.
    from diffusers import AutoencoderTiny
    taesd = AutoencoderTiny().eval()
    mf.reinit(taesd, a.seed + 4)
    taesd.save_pretrained(str(out / "taesd"), safe_serialization=True)
    n = {k: sum(p.numel() for p in m.parameters())
         for k, m in (("unet", unet), ("text_encoder", te), ("vae", vae), ("taesd", taesd))}
    print(f"done: parameters {n}")


if __name__ == "__main__":
    main()
