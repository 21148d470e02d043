#!/usr/bin/env python3
"""SDXL and SD 2.x fixtures for issue 4 (see tests/fixtures/README.md, section "SDXL and SD 2.x").

Deterministic (fixed seeds, CPU, float32, one torch thread, HF_HUB_OFFLINE=1). Needs tests/fixtures/tiny-sd2 from
make_lora_fixtures.py. Writes tests/fixtures/tiny-sdxl/, tiny-sdxl-lcm/ and sdxl/.

    python tools/reference/make_sdxl_fixtures.py                    # everything
    python tools/reference/make_sdxl_fixtures.py --only models      # sections: models, components, pipelines,
                                                                    #           lora, single
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import make_lora_fixtures as ml  # noqa: E402

FIX = mf.FIX
XL = FIX / "tiny-sdxl"
XL_LCM = FIX / "tiny-sdxl-lcm"
OUT = FIX / "sdxl"
SD2 = FIX / "tiny-sd2"
PROMPT = "a red circle on a blue background"
PROMPTS = [PROMPT, "a photo of an astronaut riding a horse on mars"]

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, verbatim
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
# latent-consistency/lcm-sdxl scheduler/scheduler_config.json (LCMScheduler), verbatim
LCM_SDXL_SCHEDULER = {"_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                      "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
                      "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                      "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1,
                      "thresholding": False, "timestep_scaling": 10.0, "timestep_spacing": "leading",
                      "trained_betas": None}

TE_HIDDEN = 16
# the two encoders must differ in width, as ViT-L (768) and ViT-bigG (1280) do: diffusers' from_single_file tells
# them apart by the position-embedding width
TE2_HIDDEN = 24
TE2_PROJ = 24
TIME_DIM = 8
# SDXL base's UNet config in miniature: same block types, layers_per_block 2, per-block transformer depth,
# linear projections, text_time addition embedding (6 time ids × addition_time_embed_dim + pooled width).
XL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32],
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
               transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4], use_linear_projection=True,
               cross_attention_dim=TE_HIDDEN + TE2_HIDDEN, norm_num_groups=8, addition_embed_type="text_time",
               addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_PROJ)
XL_LCM_UNET = dict(XL_UNET, time_cond_proj_dim=32)
# An asymmetric UNet as the distilled SDXLs (SSD-1B, Segmind-Vega) have: per-layer transformer depths, some 0,
# and up blocks that are not the down blocks' mirror (reverse_transformer_layers_per_block).
XL_ASYM_UNET = dict(XL_UNET, transformer_layers_per_block=[1, [1, 2], [2, 0]],
                    reverse_transformer_layers_per_block=[[0, 2, 1], [1, 0, 2], 1])
XL_VAE = dict(ml.SD2_VAE, scaling_factor=0.13025, force_upcast=True)
# SDXL's text_encoder: CLIP ViT-L (quick_gelu, SD1's ids); text_encoder_2: OpenCLIP ViT-bigG as
# CLIPTextModelWithProjection (gelu, legacy bos 0 / eos 2 / pad 1 ids as in the published config).
XL_TE1 = dict(mf.TEXT_CFG, hidden_size=TE_HIDDEN, projection_dim=TE_HIDDEN, hidden_act="quick_gelu")
XL_TE2 = dict(mf.TEXT_CFG, hidden_size=TE2_HIDDEN, projection_dim=TE2_PROJ, intermediate_size=53, hidden_act="gelu", num_hidden_layers=3,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)

RANK = 4
ALPHA = 2.0  # one alpha for every module (scale 0.5): diffusers replaces per-module attention alphas otherwise


# ----------------------------------------------------------------------------------------------- models
def bang_tokenizer(dst):
    """The CLIP tokenizer files with pad_token "!" (id 0), as SD2's and SDXL's tokenizer_2."""
    from transformers import CLIPTokenizer

    mf.copy_tokenizer(dst)
    for fn in ("tokenizer_config.json", "special_tokens_map.json"):
        d = json.loads((dst / fn).read_text())
        d["pad_token"] = "!"
        (dst / fn).write_text(json.dumps(d, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(dst))
    assert tok.pad_token_id == 0, tok.pad_token_id
    return tok


def build_unet(cfg, seed):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**cfg).eval()
    mf.reinit(unet, seed)
    return unet


def relative_links(dst, src, names):
    for n in names:
        os.symlink(os.path.relpath(src / n, dst), dst / n)


def save_xl(out, te1, te2, unet, vae, dtype):
    """Writes an SDXL pipeline folder as StableDiffusionXLPipeline.save_pretrained does (in `dtype`, no variant
    suffix), with SDXL base's scheduler config verbatim, the CLIP tokenizer and tokenizer_2 padding with "!", and
    text_encoder's keys under `text_model.` (transformers 4.x, as the published folder); text_encoder_2 is left as
    transformers 5.23 writes it. Both encoders are reloaded to check that no key is missing or unexpected."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = tempfile.TemporaryDirectory()
    tok2 = bang_tokenizer(Path(tmp.name) / "tok2")
    tok = CLIPTokenizer.from_pretrained(str(mf.TOKENIZER_DIR))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.to(dtype)
    pipe.save_pretrained(str(out), safe_serialization=True)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    mf.copy_tokenizer(out / "tokenizer")
    shutil.rmtree(out / "tokenizer_2")
    shutil.copytree(Path(tmp.name) / "tok2", out / "tokenizer_2")
    tmp.cleanup()
    for f in sorted((out / "text_encoder").glob("*.safetensors")):
        assert mf.add_text_model_prefix(f)
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        _, info = cls.from_pretrained(str(out / sub), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (sub, info)


def build_xl(te1_cfg, te2_cfg, unet_cfg, vae_cfg, seed):
    """The four SDXL modules with every parameter re-drawn by make_fixtures.reinit."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel(CLIPTextConfig(**te1_cfg)).eval()
    mf.reinit(te1, seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)).eval()
    mf.reinit(te2, seed + 2)
    unet = build_unet(unet_cfg, seed + 3)
    vae = AutoencoderKL(**vae_cfg).eval()
    mf.reinit(vae, seed + 4)
    return te1, te2, unet, vae


def make_models():
    for d in (XL, XL_LCM):
        if d.exists():
            shutil.rmtree(d)
    # fp16 storage (no variant suffix); references load it with dtype=float32
    save_xl(XL, *build_xl(XL_TE1, XL_TE2, XL_UNET, XL_VAE, 40), torch.float16)

    # tiny-sdxl-lcm: the full LCM SDXL UNet (time_cond_proj_dim, as latent-consistency/lcm-sdxl) with tiny-sdxl's
    # other components (symlinks) and lcm-sdxl's LCMScheduler config.
    XL_LCM.mkdir(parents=True)
    lcm_unet = build_unet(XL_LCM_UNET, 45).half()
    lcm_unet.save_pretrained(str(XL_LCM / "unet"), safe_serialization=True)
    (XL_LCM / "scheduler").mkdir()
    mf.write_json(XL_LCM / "scheduler" / "scheduler_config.json", LCM_SDXL_SCHEDULER)
    relative_links(XL_LCM, XL, ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"])
    index = json.loads((XL / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    mf.write_json(XL_LCM / "model_index.json", index)
    print("models written", flush=True)


def load_xl(path=XL, scheduler=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=torch.float32)
    assert pipe.watermark is None  # invisible-watermark is not installed: no watermark step
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- components
def make_components():
    from diffusers import StableDiffusionPipeline

    t = {}
    pipe = load_xl()
    ids1 = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    t["text.input_ids"] = ids1.input_ids
    t["text_2.input_ids"] = ids2.input_ids
    with torch.no_grad():
        o1 = pipe.text_encoder(ids1.input_ids, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2.input_ids, output_hidden_states=True)
        t["text.penultimate"] = o1.hidden_states[-2]
        t["text.skip1"] = o1.hidden_states[-3]
        t["text_2.penultimate"] = o2.hidden_states[-2]
        t["text_2.text_embeds"] = o2.text_embeds
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True,
                                                      negative_prompt=["blurry", "blurry"])
        assert torch.equal(pe, torch.cat([t["text.penultimate"], t["text_2.penultimate"]], -1))
        assert torch.equal(pooled, t["text_2.text_embeds"])
        t["encode.prompt_embeds"], t["encode.negative_prompt_embeds"] = pe, npe
        t["encode.pooled"], t["encode.negative_pooled"] = pooled, npooled
        g = torch.Generator().manual_seed(46)
        sample = torch.randn([2, 4, 8, 8], generator=g)
        ctx = torch.randn([2, 77, TE_HIDDEN + TE2_HIDDEN], generator=g)
        text_embeds = torch.randn([2, TE2_PROJ], generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 8.0, 896.0, 640.0]])
        t.update({"unet.sample": sample, "unet.encoder_hidden_states": ctx, "unet.text_embeds": text_embeds,
                  "unet.time_ids": time_ids})
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        for tt, key in ((999, "out_t999"), (1, "out_t1")):
            t[f"unet.{key}"] = pipe.unet(sample, torch.tensor(tt), ctx, added_cond_kwargs=added).sample
        lcm = load_xl(XL_LCM)
        cond = lcm.get_guidance_scale_embedding(torch.tensor([7.5, 7.5]), embedding_dim=32)
        t["lcm_unet.timestep_cond"] = cond
        t["lcm_unet.out_t999"] = lcm.unet(sample, torch.tensor(999), ctx, timestep_cond=cond,
                                          added_cond_kwargs=added).sample
        # the asymmetric UNet: a diffusers folder (f16) and its LDM-named twin (UNet keys only)
        asym = build_unet(XL_ASYM_UNET, 49).half()
        asym_dir = OUT / "asym-unet"
        if asym_dir.exists():
            shutil.rmtree(asym_dir)
        asym.save_pretrained(str(asym_dir), safe_serialization=True)
        asym = asym.float()
        t["asym_unet.out_t999"] = asym(sample, torch.tensor(999), ctx, added_cond_kwargs=added).sample
        ldm = ml.unet_to_ldm({k: v for k, v in asym.state_dict().items() if not k.startswith("add_embedding.")},
                             dict(asym.config))
        ldm.update(add_embedding_to_ldm(asym.state_dict()))
        ml.save_st(OUT / "asym-unet-ldm.safetensors", {k: v.half() for k, v in sorted(ldm.items())})
        # SD2's text encoder (23 layers = OpenCLIP's penultimate) on the same prompts, "!" padding
        sd2 = StableDiffusionPipeline.from_pretrained(str(SD2), dtype=torch.float32)
        ids = sd2.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        t["sd2.text.input_ids"] = ids.input_ids
        t["sd2.text.last_hidden_state"] = sd2.text_encoder(ids.input_ids).last_hidden_state
        # VAE: scaling 0.13025 is the pipeline's business; the module is an ordinary AutoencoderKL
        lat = torch.randn([1, 4, 8, 8], generator=g)
        t["vae.latents"] = lat
        t["vae.decoded"] = pipe.vae.decode(lat).sample
    OUT.mkdir(parents=True, exist_ok=True)
    mf.save_st(OUT / "components.safetensors", {k: v.contiguous() for k, v in t.items()})
    print("components written", flush=True)


# -------------------------------------------------------------------------------------------- pipelines
def run_xl(pipe, kwargs, seed):
    calls = []

    def hook(mod, args, kw):
        ac = kw["added_cond_kwargs"]
        calls.append({"timestep": mf.jsonable(args[1] if len(args) > 1 else kw["timestep"]),
                      "sample_shape": list(args[0].shape), "timestep_cond": kw.get("timestep_cond") is not None,
                      "time_ids": mf.jsonable(ac["time_ids"]), "text_embeds_shape": list(ac["text_embeds"].shape)})

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    captured = {}

    def cb(p, i, t, kw):
        if i == 0:
            captured["prompt_embeds"] = kw["prompt_embeds"].clone()
            captured["add_text_embeds"] = kw["add_text_embeds"].clone()
        return {}

    with torch.no_grad():
        img = pipe(**kwargs, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                   callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"]).images
    h.remove()
    return torch.from_numpy(np.asarray(img)).float(), calls, captured


PIPE_CASES = [
    # name, model, scheduler (None = the folder's), kwargs, seed
    ("sdxl_lcm4", XL, "LCMScheduler", dict(num_inference_steps=4, guidance_scale=1.0), 0),
    ("sdxl_lcm4_48x64_batch2", XL, "LCMScheduler",
     dict(num_inference_steps=4, guidance_scale=1.0, height=48, width=64, num_images_per_prompt=2), 7),
    ("sdxl_euler_cfg", XL, None, dict(num_inference_steps=8, guidance_scale=5.0, negative_prompt="blurry"), 3),
    ("sdxl_euler_zeros", XL, None, dict(num_inference_steps=6, guidance_scale=5.0), 4),
    ("sdxl_lcm_full", XL_LCM, None, dict(num_inference_steps=4, guidance_scale=8.5), 1),
]


def sched_cls(name):
    import diffusers

    return getattr(diffusers, name) if name else None


def make_pipelines():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tensors, cases = {}, []
    for name, model, sched, kw, seed in PIPE_CASES:
        pipe = load_xl(model, sched_cls(sched))
        kw = dict(kw, prompt=PROMPT)
        kw.setdefault("height", 64)
        kw.setdefault("width", 64)
        img, calls, cap = run_xl(pipe, kw, seed)
        tensors[name] = img
        tensors[f"{name}.prompt_embeds"] = cap["prompt_embeds"]
        tensors[f"{name}.add_text_embeds"] = cap["add_text_embeds"]
        cases.append({"name": name, "model": model.name, "pipeline": "StableDiffusionXLPipeline",
                      "scheduler": type(pipe.scheduler).__name__, "scheduler_config": mf.sched_config(pipe.scheduler),
                      "seed": seed, "call_kwargs": mf.jsonable(kw), "unet_calls": calls, "n_unet_calls": len(calls)})
        print(f"  {name}: {len(calls)} UNet calls, mean {float(img.mean()):.4f}", flush=True)
    # SDXL img2img, the LCM-LoRA recipe: StableDiffusionXLImg2ImgPipeline of tiny-sdxl's components with
    # LCMScheduler, 4 steps at strength 0.5 = 2 UNet calls (499, 259), on reference/init64.png
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    base = load_xl(XL)
    i2i = StableDiffusionXLImg2ImgPipeline(**base.components)
    i2i.scheduler = LCMScheduler.from_config(base.scheduler.config)
    i2i.set_progress_bar_config(disable=True)
    assert i2i.watermark is None
    init = Image.open(mf.REF / "init64.png").convert("RGB")
    kw = dict(prompt=PROMPT, image=init, strength=0.5, num_inference_steps=4, guidance_scale=1.0)
    img, calls, cap = run_xl(i2i, kw, 6)
    tensors["sdxl_img2img"] = img
    kw_json = {k: v for k, v in kw.items() if k != "image"}
    cases.append({"name": "sdxl_img2img", "model": "tiny-sdxl", "pipeline": "StableDiffusionXLImg2ImgPipeline",
                  "scheduler": "LCMScheduler", "scheduler_config": mf.sched_config(i2i.scheduler), "seed": 6,
                  "call_kwargs": dict(kw_json, width=64, height=64), "init_image": "reference/init64.png",
                  "unet_calls": calls, "n_unet_calls": len(calls)})
    print(f"  sdxl_img2img: {len(calls)} UNet calls at {[c['timestep'] for c in calls]}", flush=True)
    # SD 2.x: v-prediction DDIM with CFG and a negative prompt (the folder's own scheduler)
    sd2 = StableDiffusionPipeline.from_pretrained(str(SD2), dtype=torch.float32)
    assert isinstance(sd2.scheduler, DDIMScheduler) and sd2.scheduler.config.prediction_type == "v_prediction"
    sd2.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=10, guidance_scale=7.5, height=64,
              width=64)
    with torch.no_grad():
        img = sd2(**kw, output_type="np", generator=torch.Generator("cpu").manual_seed(5)).images
    tensors["sd2_ddim_cfg"] = torch.from_numpy(np.asarray(img)).float()
    cases.append({"name": "sd2_ddim_cfg", "model": "tiny-sd2", "pipeline": "StableDiffusionPipeline",
                  "scheduler": "DDIMScheduler", "scheduler_config": mf.sched_config(sd2.scheduler), "seed": 5,
                  "call_kwargs": kw})
    mf.save_st(OUT / "pipelines.safetensors", tensors)
    mf.write_json(OUT / "pipelines.json", mf.jsonable({"doc": "see tests/fixtures/README.md (SDXL)",
                                                      "cases": cases}))
    print("pipelines written", flush=True)


# ------------------------------------------------------------------------------------------------ LoRAs
TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def xl_lora_tensors(pipe, seed, unet=True, te=True):
    """kohya-layout LoRA as the published lcm-lora-sdxl (unet modules under diffusers names) plus lora_te1_/lora_te2_
    modules, every module with alpha ALPHA."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    parts = []
    if unet:
        parts.append(("lora_unet_", pipe.unet, ml.LCM_SUFFIXES))
    if te:
        parts += [("lora_te1_", pipe.text_encoder, TE_SUFFIXES), ("lora_te2_", pipe.text_encoder_2, TE_SUFFIXES)]
    for prefix, model, suffixes in parts:
        mods = ml.lora_modules(model)
        select = sorted(n for n in mods if n.endswith(suffixes))
        names = (lambda n, p=prefix: ml.kohya_name(p, n)) if prefix == "lora_unet_" else \
            (lambda n, p=prefix: ml.kohya_name(p, "text_model." + n if not n.startswith("text_model.") else n))
        tt, _ = ml.make_kohya(g, mods, select, RANK, prefix, names, lambda i, n: ALPHA, torch.float16)
        t.update(tt)
    return t


def make_lora():
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = load_xl(XL, sched_cls("LCMScheduler"))
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    files = {"lora_xl.safetensors": xl_lora_tensors(pipe, 47),
             "lora_xl_te.safetensors": xl_lora_tensors(pipe, 48, unet=False)}
    for fn, t in files.items():
        ml.save_st(OUT / fn, dict(sorted(t.items())))
    tensors, cases = {}, {}
    base, _, _ = run_xl(pipe, kw, 0)
    with ml.LogCapture() as cap:
        pipe.load_lora_weights(str(OUT), weight_name="lora_xl.safetensors", adapter_name="xl")
    assert not cap.records, cap.records
    counts = {c: sum(1 for _, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_A") and "xl" in m.lora_A)
              for c in ("unet", "text_encoder", "text_encoder_2")}
    assert counts["text_encoder"] > 0 and counts["text_encoder_2"] > 0, counts
    img, _, _ = run_xl(pipe, kw, 0)
    tensors["lora_xl"] = img
    pipe.fuse_lora()
    fused, _, _ = run_xl(pipe, kw, 0)
    tensors["lora_xl.fused"] = fused
    pipe.unfuse_lora()
    with ml.LogCapture() as cap:
        pipe.load_lora_weights(str(OUT), weight_name="lora_xl_te.safetensors", adapter_name="te")
    # benign for a second, text-encoder-only adapter: no UNet keys, peft's report of the base parameters a LoRA
    # state dict does not hold, the second peft_config
    benign = ("No LoRA keys associated to UNet2DConditionModel", "LOAD REPORT", "Already found a `peft_config`")
    bad = [r for r in cap.records if not any(b in r for b in benign)]
    assert not bad, bad
    assert all("| MISSING |" in line or "|" not in line or "Status" in line or "---" in line
               for r in cap.records if "LOAD REPORT" in r for line in r.splitlines()[1:]), cap.records
    pipe.set_adapters(["xl", "te"], adapter_weights=[1.0, 0.8])
    two, _, _ = run_xl(pipe, kw, 0)
    tensors["lora_xl+te0.8"] = two
    cases = {"settings": mf.jsonable(dict(kw, seed=0, scheduler="LCMScheduler.from_config")),
             "modules": counts, "base_mean": float(base.mean()),
             "lora_xl": "load_lora_weights(lora_xl.safetensors)", "lora_xl.fused": "then fuse_lora()",
             "lora_xl+te0.8": "unfuse_lora(); load lora_xl_te.safetensors; set_adapters([xl, te], [1.0, 0.8])",
             "max_fused_vs_unfused": float((img - fused).abs().max())}
    mf.save_st(OUT / "lora_reference.safetensors", tensors)
    mf.write_json(OUT / "lora_reference.json", cases)
    print(f"lora written: modules {counts}", flush=True)


# ------------------------------------------------------------------------------------------ single file
def clip_to_sgm_openclip(te_sd, projection_weight):
    """CLIPTextModelWithProjection state dict -> SGM `conditioner.embedders.1.model.*` (OpenCLIP layout; the
    projection is stored as OpenCLIP's `x @ text_projection`, the transpose of transformers' Linear weight)."""
    sd = {k.removeprefix("text_model."): v for k, v in te_sd.items() if k != "text_projection.weight"}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    out = ml.clip_to_openclip(sd, n, {}, projection_weight.T.contiguous())
    return {k.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): v for k, v in out.items()}


def add_embedding_to_ldm(unet_sd):
    """SDXL's `add_embedding.linear_1/2` are LDM's `label_emb.0.0/0.2`."""
    ren = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = {}
    for k, v in unet_sd.items():
        for d, l in ren.items():
            if k.startswith(d + "."):
                out["model.diffusion_model." + l + k[len(d):]] = v
    return out


def make_single():
    from diffusers import StableDiffusionXLPipeline

    fo = load_xl()
    ck = {}
    ucfg = dict(fo.unet.config)
    usd = fo.unet.state_dict()
    ck.update(add_embedding_to_ldm(usd))
    ck.update(ml.unet_to_ldm({k: v for k, v in usd.items() if not k.startswith("add_embedding.")}, ucfg))
    ck.update(ml.vae_to_ldm(fo.vae.state_dict(), dict(fo.vae.config)))
    for k, v in fo.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        ck["conditioner.embedders.0.transformer." + k] = v
    te2 = fo.text_encoder_2.state_dict()
    ck.update(clip_to_sgm_openclip(te2, te2["text_projection.weight"]))
    ck = {k: v.half() for k, v in ck.items()}
    path = OUT / "tiny-sdxl.safetensors"
    ml.save_st(path, dict(sorted(ck.items())))
    with ml.LogCapture() as cap:
        sf = StableDiffusionXLPipeline.from_single_file(str(path), config=str(XL), local_files_only=True,
                                                        torch_dtype=torch.float32)
    counts = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        counts[comp] = ml.check_same_weights(getattr(sf, comp), getattr(fo, comp), comp)
    for pipe in (sf, fo):
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for p_ in getattr(pipe, comp).parameters():
                p_.data = p_.data.clone()
    from diffusers import LCMScheduler

    imgs = []
    for pipe in (sf, fo):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        img, _, _ = run_xl(pipe, dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64,
                                      width=64), 0)
        imgs.append(img)
    assert torch.equal(imgs[0], imgs[1]), float((imgs[0] - imgs[1]).abs().max())
    mf.write_json(OUT / "single_file.json", {"n_keys": len(ck), "parameters_checked_equal": counts,
                                              "warnings": cap.records, "images_equal_to": "sdxl_lcm4"})
    print(f"single file: {len(ck)} keys, weights equal {counts}, warnings {cap.records}", flush=True)


SECTIONS = ["models", "components", "pipelines", "lora", "single"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS))
    only = [s for s in ap.parse_args().only.split(",") if s]
    for s in SECTIONS:
        if s in only:
            globals()[f"make_{s}"]()


if __name__ == "__main__":
    main()
