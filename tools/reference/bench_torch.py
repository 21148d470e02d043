#!/usr/bin/env python3
"""diffusers + PyTorch on the same stages as `fewstep bench`, for ratios measured in the same run.

    python tools/reference/bench_torch.py MODEL_DIR [--taesd DIR] [--size 256 --size 512]
        [--dtype f32 --dtype bf16] [--repeats 3] [--threads 2] [--output torch.json]

Stages (batch 1, prompt "a photograph of an astronaut riding a horse"): text (CLIPTextModel on one prompt; for
an SDXL folder `encode_prompt`, both encoders), unet (one UNet2DConditionModel call at t = 999; SDXL with its
text_embeds and time_ids), vae (AutoencoderKL.decode of one latent), taesd (AutoencoderTiny.decode), image
(LatentConsistencyModel-style LCM 4 steps, guidance 1: the folder's StableDiffusionPipeline or
StableDiffusionXLPipeline with LCMScheduler, guidance_scale 1 so no unconditional pass, VAE decode), image-taesd (the same with the
TAESD as the pipeline's vae). Each: one warm-up run (counted by torch.utils.flop_counter), then `repeats` timed
runs, median; the peak resident memory of the process during the timed runs (Linux clear_refs/VmHWM, the
same reading as fewstep's). Output: the JSON schema of `fewstep bench --output`.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def measure(fn, repeats):
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_total_flops()
    ok = reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, flops, (peak_mib() if ok else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--taesd")
    ap.add_argument("--size", type=int, action="append")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    ap.add_argument("--stage", action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul-size", type=int, default=4096)
    ap.add_argument("--output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = a.size or [256, 512]
    dtypes = a.dtype or ["f32", "bf16"]
    stages = a.stage or (["text", "unet", "vae", "image"] + (["taesd", "image-taesd"] if a.taesd else []))

    import diffusers
    from diffusers import AutoencoderTiny, LCMScheduler

    cls_name = json.loads((Path(a.model) / "model_index.json").read_text())["_class_name"]
    xl = "XL" in cls_name
    extra = {} if xl else dict(safety_checker=None, requires_safety_checker=False)

    report = {"model": a.model, "threads": a.threads, "cpu": f"torch {torch.__version__} "
              f"({torch.backends.cpu.get_cpu_capability()})", "matmul": [], "stages": []}
    peak = None
    if a.matmul_size:
        n = a.matmul_size
        for d in dtypes:
            x = torch.randn(n, n).to(DTYPES[d])
            y = torch.randn(n, n).to(DTYPES[d])
            with torch.inference_mode():
                times, _, _ = measure(lambda: x @ y, a.repeats)
            med = statistics.median(times)
            r = {"dtype": d, "n": n, "median_s": med, "gflop_per_s": 2 * n ** 3 / med / 1e9}
            print(f"matmul {n}³ {d:>4}: {med:.3f} s, {r['gflop_per_s']:.1f} GFLOP/s", flush=True)
            report["matmul"].append(r)
            if d == "f32":
                peak = r["gflop_per_s"]
    for d in dtypes:
        dt = DTYPES[d]
        pipe = getattr(diffusers, cls_name).from_pretrained(a.model, torch_dtype=dt, **extra)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        tiny = AutoencoderTiny.from_pretrained(a.taesd, torch_dtype=dt).eval() if a.taesd else None
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.inference_mode():
            if xl:
                def encode():
                    return pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
                context, _, pooled, _ = encode()
            else:
                def encode():
                    return pipe.text_encoder(ids)
                context, pooled = encode()[0], None
            for size in sizes:
                # SDXL's micro-conditioning: (original size, crop top-left, target size)
                added = ({"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=dt)}
                         if xl else None)
                lat = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dt)
                t = torch.tensor(999)

                def image(vae):
                    def run():
                        saved = pipe.vae
                        pipe.vae = vae
                        try:
                            pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=size, width=size,
                                 generator=torch.Generator().manual_seed(0), output_type="np")
                        finally:
                            pipe.vae = saved
                    return run

                fns = {
                    "text": encode,
                    "unet": lambda: pipe.unet(lat, t, encoder_hidden_states=context, added_cond_kwargs=added),
                    "vae": lambda: pipe.vae.decode(lat / pipe.vae.config.scaling_factor),
                    "taesd": (lambda: tiny.decode(lat)) if tiny is not None else None,
                    "image": image(pipe.vae),
                    "image-taesd": image(tiny) if tiny is not None else None,
                }
                for stage in stages:
                    times, flops, peak_rss = measure(fns[stage], a.repeats)
                    med = statistics.median(times)
                    rate = flops / med / 1e9
                    row = {"stage": stage, "size": size, "dtype": d, "median_s": med, "times_s": times,
                           "gflop": flops / 1e9, "gflop_per_s": rate,
                           "share_of_matmul_peak": rate / peak if peak else None, "peak_rss_mib": peak_rss}
                    print(f"{stage:<12} {size:>4}² {d:<4} {med:8.3f} s {flops / 1e9:8.1f} GFLOP {rate:6.1f} GFLOP/s"
                          f" peak {peak_rss or 0:7.0f} MiB", flush=True)
                    report["stages"].append(row)
        del pipe, tiny
    if a.output:
        with open(a.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
