#!/usr/bin/env python3
"""A random LoRA with the key set and shapes of the published latent-consistency/lcm-lora-sdv1-5.

    python tools/reference/make_lcm_lora_random.py OUT.safetensors [--seed 0] [--rank 64] [--alpha 8]

Layout (kohya over diffusers module names, as the published pytorch_lora_weights.safetensors):
  lora_unet_{diffusers module path, '.' -> '_'}.lora_down.weight   f16 [64, in] / [64, in, k, k]
  lora_unet_{...}.lora_up.weight                                   f16 [out, 64] / [out, 64, 1, 1]
  lora_unet_{...}.alpha                                            f16 0-d
on EVERY module of the SD1.5 UNet (runwayml/stable-diffusion-v1-5 config) of these kinds: attention
to_q/to_k/to_v/to_out.0 (attn1 and attn2), transformer proj_in/proj_out (1x1 convs: down [64,C,1,1]),
ff.net.0.proj, ff.net.2, resnet conv1/conv2 (3x3: down [64,in,3,3], up [out,64,1,1]), conv_shortcut (1x1),
time_emb_proj, downsamplers.0.conv, upsamplers.0.conv (3x3). NOT conv_in/conv_out, time_embedding, norms, and no
text-encoder keys. 278 modules, 834 keys, 67,252,224 LoRA parameters (printed; "67.5M" in the issue is rounded);
the f16 file is 134,621,524 bytes (~35 s on one core).
ASSUMPTION: the alpha value of the published file is not known here; every module gets the same alpha
(--alpha, default 8.0 -> scale alpha/rank = 0.125). One alpha for all modules avoids diffusers' alpha quirks
(tests/fixtures/README.md).
Values: down ~ N(0,1)/sqrt(fan_in), up ~ N(0,1)/sqrt(rank) (so with scale 0.125 the delta is ~1/8 of a typical
weight), drawn in sorted module order from torch.Generator().manual_seed(seed), stored as f16.
Check it against a model with tools/reference/parity.py MODELDIR OUT --lora FILE (diffusers' load_lora_weights
raises on a target module it cannot find and the script fails on any load warning).
"""

import argparse
import math
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


def sd15_unet_modules():
    """name -> (weight shape) of every Linear/Conv2d of the SD1.5 UNet, built without allocating weights."""
    from diffusers import UNet2DConditionModel
    from make_sd15_random import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=8.0)
    a = ap.parse_args()
    from safetensors.torch import save_file

    mods = sd15_unet_modules()
    sel = [n for n in sorted(mods) if any(n == s or n.endswith("." + s) for s in SUFFIXES)]
    g = torch.Generator().manual_seed(a.seed)
    r = a.rank
    t = {}
    nparam = 0
    for n in sel:
        shp = mods[n]
        k = "lora_unet_" + n.replace(".", "_")
        if len(shp) == 2:
            out_f, in_f = shp
            down = torch.randn([r, in_f], generator=g) / math.sqrt(in_f)
            up = torch.randn([out_f, r], generator=g) / math.sqrt(r)
        else:
            out_f, in_f, kh, kw = shp
            down = torch.randn([r, in_f, kh, kw], generator=g) / math.sqrt(in_f * kh * kw)
            up = torch.randn([out_f, r, 1, 1], generator=g) / math.sqrt(r)
        t[f"{k}.lora_down.weight"] = down.half()
        t[f"{k}.lora_up.weight"] = up.half()
        t[f"{k}.alpha"] = torch.tensor(a.alpha, dtype=torch.float16)
        nparam += down.numel() + up.numel()
    excluded = [n for n in sorted(mods) if n not in sel]
    save_file(t, a.out)
    kinds = {}
    for n in sel:
        s = next(s for s in SUFFIXES if n == s or n.endswith("." + s))
        kinds[s] = kinds.get(s, 0) + 1
    print(f"wrote {a.out}: {len(sel)} modules, {len(t)} keys, {nparam} LoRA parameters ({nparam / 1e6:.2f}M) "
          f"+ {len(sel)} alphas; rank {r}, alpha {a.alpha} (scale {a.alpha / r})")
    print(f"modules per kind: {kinds}")
    print(f"Linear/Conv2d modules NOT covered: {excluded}")


if __name__ == "__main__":
    main()
