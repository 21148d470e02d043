#!/usr/bin/env python3
"""Reference image for a full-size parity check (the folder of make_sd15_random.py or make_sdxl_random.py, or a
real SD1.5 / SDXL folder).

    python tools/reference/parity_sd15.py MODELDIR OUT.safetensors [--steps 4] [--size 256] [--seed 0]
                                          [--lora FILE [--lora-scale 1.0]]

The folder's pipeline class (StableDiffusionPipeline or StableDiffusionXLPipeline, from model_index.json; fp32,
CPU) with LCMScheduler.from_config(pipe.scheduler.config), guidance 1.0,
generator torch.Generator("cpu").manual_seed(seed), prompt below, output_type "np".
Writes OUT.safetensors with
  "image"   f32 [1, size, size, 3] in [0, 1] (NHWC)
  "latents" f32 [1, 4, size/8, size/8] the latents after the last step (what is decoded, before / scaling_factor)
and OUT.json with the settings.
--lora: after loading, `pipe.load_lora_weights(FILE, adapter_name="lora")` then `pipe.fuse_lora(lora_scale=S)`
(fused into the UNet and, if the LoRA has text-encoder keys, the text encoder); the wall time of these two calls is
reported separately (`lora_load_fuse_seconds`, also split into load / fuse) and any warning diffusers/peft logs
while loading is an error (every key must match a module). The LoRA layers stay attached but merged, so the denoising
forward costs the same as without.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

PROMPT = "a photo of an astronaut riding a horse on mars"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("modeldir")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", default=None, help="LoRA file for load_lora_weights + fuse_lora")
    ap.add_argument("--lora-scale", type=float, default=1.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import diffusers
    from diffusers import LCMScheduler
    from safetensors.torch import save_file

    cls_name = json.loads((Path(a.modeldir) / "model_index.json").read_text())["_class_name"]
    cls = getattr(diffusers, cls_name)
    extra = {} if "XL" in cls_name else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(a.modeldir, dtype=torch.float32, **extra)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lora_meta = None
    if a.lora:
        import logging
        import warnings

        logs = []

        class H(logging.Handler):
            def emit(self, r):
                if r.levelno >= logging.WARNING:
                    logs.append(f"{r.name}: {r.getMessage()}")

        h = H()
        for n in ("diffusers", "peft", "transformers"):
            logging.getLogger(n).addHandler(h)
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            t0 = time.time()
            pipe.load_lora_weights(a.lora, adapter_name="lora")
            t1 = time.time()
            pipe.fuse_lora(lora_scale=a.lora_scale)
            t2 = time.time()
        for n in ("diffusers", "peft", "transformers"):
            logging.getLogger(n).removeHandler(h)
        logs += [f"warning: {w.message}" for w in wl]
        from peft.tuners.lora import LoraLayer

        comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        counts = {c: sum(isinstance(m, LoraLayer) for m in getattr(pipe, c).modules()) for c in comps}
        # diffusers' "No LoRA keys associated to CLIPTextModel…" is expected for a UNet-only LoRA
        te_counts = sum(v for c, v in counts.items() if c != "unet")
        bad = [m for m in logs if not (te_counts == 0 and "No LoRA keys associated to CLIPTextModel" in m)]
        if bad:
            sys.exit(f"LoRA load warnings: {bad}")
        lora_meta = {"file": str(a.lora), "lora_scale": a.lora_scale, "modules_touched": counts,
                     "load_lora_weights_seconds": t1 - t0, "fuse_lora_seconds": t2 - t1,
                     "lora_load_fuse_seconds": t2 - t0, "threads": a.threads}
        print(f"LoRA {a.lora}: load_lora_weights {t1 - t0:.2f}s + fuse_lora {t2 - t1:.2f}s = {t2 - t0:.2f}s, "
              f"modules {counts}", flush=True)
    last = {}

    def cb(p, i, t, kw):
        last["latents"] = kw["latents"].clone()
        return {}

    t0 = time.time()
    with torch.no_grad():
        img = pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                   generator=torch.Generator("cpu").manual_seed(a.seed), output_type="np",
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images
    dt = time.time() - t0
    out = Path(a.out)
    save_file({"image": torch.from_numpy(np.asarray(img)).float().contiguous(),
               "latents": last["latents"].float().contiguous()}, str(out))
    meta = {"model": str(a.modeldir), "pipeline": cls_name, "scheduler": "LCMScheduler.from_config",
            "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items()
                                 if isinstance(v, (int, float, str, bool, list, type(None)))},
            "prompt": PROMPT, "negative_prompt": None, "num_inference_steps": a.steps,
            "guidance_scale": a.guidance, "seed": a.seed, "width": a.size, "height": a.size,
            "timesteps": pipe.scheduler.timesteps.tolist(), "seconds": dt, "lora": lora_meta}
    with open(out.with_suffix(".json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} image {list(img.shape)} mean {float(np.mean(img)):.4f} in {dt:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
