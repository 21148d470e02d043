"""Regenerates tests/fixtures/unet-extra/: a very small UNet2DConditionModel exercising the config forms the
SD/LCM fixtures do not (per-block lists for layers_per_block, cross_attention_dim and
transformer_layers_per_block, a depth-2 transformer, an odd time_cond_proj_dim, use_linear_projection,
upcast_attention) and a latent size that is not a multiple of 2^(stages-1) (the up blocks' explicit
upsample size), with diffusers' outputs.

    python tools/reference/make_unet_extra.py   # diffusers 0.42.1, torch 2.15.0 (tools/reference/requirements.txt)
"""
import json
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

torch.set_num_threads(1)
torch.manual_seed(0)
out_dir = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "unet-extra")
unet = UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
    layers_per_block=[1, 2, 1],
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=[8, 8, 8], attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 1],
    use_linear_projection=True, upcast_attention=True, time_cond_proj_dim=5, norm_num_groups=4,
)
with torch.no_grad():
    for p in unet.parameters():  # move GroupNorm/LayerNorm affine params off 1/0 so they are tested too
        p.add_(torch.randn_like(p) * 0.05)
unet.eval()
unet.half().save_pretrained(out_dir)  # f16 file to keep it small; references use the f16-rounded weights in f32
unet.float()
g = torch.Generator("cpu").manual_seed(1)
sample = torch.randn(2, 4, 6, 5, generator=g)
ctx = torch.randn(2, 7, 8, generator=g)
cond = torch.randn(2, 5, generator=g)
ref = {"sample": sample, "encoder_hidden_states": ctx, "timestep_cond": cond}
with torch.no_grad():
    ref["out_t999"] = unet(sample, 999, ctx, timestep_cond=cond).sample
    ref["out_t12.5"] = unet(sample, 12.5, ctx, timestep_cond=cond).sample
save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out_dir, "reference.safetensors"))
with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(
        "Made by `tools/reference/make_unet_extra.py`: a UNet of per-block list configs, a depth-2 transformer, "
        "time_cond_proj_dim 5 (f16 weights, computed in f32), and reference outputs for a [2,4,6,5] sample (not a multiple of 4, so the up "
        "blocks upsample to the skip sizes). `reference.safetensors`: sample, encoder_hidden_states [2,7,8], "
        "timestep_cond [2,5], out_t999 (int timestep 999), out_t12.5 (float timestep 12.5).\n"
    )
