#!/usr/bin/env python3
"""Loads a model folder that `fewstep train` wrote (or models/default/*) with diffusers and compares the image
diffusers makes with the one fewstep made for the same prompt, seed and settings.

    fewstep generate "PROMPT" --model DIR --scheduler ddim --steps 25 --guidance 7.5 --seed 0 --output ours.png
    python tools/reference/diffusers_roundtrip.py DIR ours.png "PROMPT" [--seed 0] [--steps 25] [--guidance 7.5]
        [--scheduler ddim|lcm] [--lora FILE]

StableDiffusionPipeline.from_pretrained(DIR, torch_dtype=float32) (fp16 files are upcast, as fewstep does),
DDIMScheduler (or LCMScheduler) .from_config(pipe.scheduler.config), generator
torch.Generator("cpu").manual_seed(seed), the model's native size. --lora: `pipe.load_lora_weights(FILE)` (an
LCM-LoRA that `fewstep distill` wrote), where any key diffusers/peft cannot place is an error, then
`pipe.fuse_lora()`. Prints the mean and max |difference| in 1/255 units and exits non-zero when the mean is above 0.5 or
the max above 3 (the foundation's pipeline tolerances).
"""

import argparse
import sys

import numpy as np
import torch
import logging

from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline
from PIL import Image

torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ours")
    ap.add_argument("prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", choices=["ddim", "lcm"], default="ddim")
    ap.add_argument("--lora")
    a = ap.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    scheduler = {"ddim": DDIMScheduler, "lcm": LCMScheduler}[a.scheduler]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    if a.lora:
        warnings = []

        class Catch(logging.Handler):
            def emit(self, record):
                # A UNet-only LoRA (as the published LCM-LoRAs) makes diffusers note that the text encoder
                # got no keys; that is not an unplaced key.
                msg = record.getMessage()
                if record.levelno >= logging.WARNING and not msg.startswith("No LoRA keys associated to"):
                    warnings.append(msg)

        for name in ["diffusers", "peft"]:
            logging.getLogger(name).addHandler(Catch())
        pipe.load_lora_weights(a.lora)
        if warnings:
            sys.exit(f"diffusers could not place every key of {a.lora}: {warnings}")
        pipe.fuse_lora()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(
        a.prompt,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        generator=torch.Generator("cpu").manual_seed(a.seed),
        height=size,
        width=size,
        output_type="np",
    ).images[0]
    theirs = np.clip(np.round(image * 255.0), 0, 255)
    ours = np.asarray(Image.open(a.ours).convert("RGB")).astype(np.float64)
    if ours.shape != theirs.shape:
        sys.exit(f"shape: ours {ours.shape}, diffusers {theirs.shape}")
    d = np.abs(ours - theirs)
    print(f"{a.model}: {size}x{size}, mean |diff| {d.mean():.4f}/255, max {d.max():.0f}/255")
    if d.mean() > 0.5 or d.max() > 3:
        sys.exit("images differ beyond the tolerances")


if __name__ == "__main__":
    main()
