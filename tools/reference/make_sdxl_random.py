#!/usr/bin/env python3
"""Build a random-weight SDXL base with the REAL configuration and save it as a diffusers folder.

    python tools/reference/make_sdxl_random.py OUTDIR [--seed 0] [--dtype float32|bfloat16] [--tiny]

Layout and configs as stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder = CLIP ViT-L/14,
text_encoder_2 = OpenCLIP ViT-bigG/14 as CLIPTextModelWithProjection, tokenizer, tokenizer_2 padding with "!",
SDXL's Euler scheduler config), safetensors without variant suffix, written by make_sdxl_fixtures.save_xl.
Weights: every parameter re-drawn by make_fixtures.reinit (no zero-initialised layers).
`--tiny` swaps in the tiny-sdxl shapes, for a quick self-test of this script.
Full size: UNet 2.57B params (10.3 GB in f32), text encoders 123M + 695M, VAE 84M.
"""

import argparse
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sdxl_fixtures as mx  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys diffusers 0.42.1 reads)
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 center_input_sample=False, cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                 mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
                 projection_class_embeddings_input_dim=2816, sample_size=128,
                 transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
                 use_linear_projection=True)
# vae/config.json
SDXL_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=True, in_channels=3, out_channels=3,
                latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
# text_encoder/config.json and text_encoder_2/config.json (legacy bos 0 / eos 2 / pad 1 ids in both)
SDXL_TE1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
SDXL_TE2 = dict(SDXL_TE1, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tiny", action="store_true", help="tiny-sdxl shapes (self-test)")
    a = ap.parse_args()
    cfgs = (mx.XL_TE1, mx.XL_TE2, mx.XL_UNET, mx.XL_VAE) if a.tiny else (SDXL_TE1, SDXL_TE2, SDXL_UNET, SDXL_VAE)
    print("building (random weights)", flush=True)
    parts = mx.build_xl(*cfgs, a.seed)
    print(f"saving to {a.outdir}", flush=True)
    mx.save_xl(Path(a.outdir), *parts, getattr(torch, a.dtype))
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
