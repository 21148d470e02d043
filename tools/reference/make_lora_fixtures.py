#!/usr/bin/env python3
"""LoRA and single-file fixtures for issue 3 (see tests/fixtures/README.md, section "LoRA and single-file").

Deterministic (fixed seeds, CPU, float32, one torch thread, HF_HUB_OFFLINE=1). Needs the tiny models written by
make_fixtures.py (tests/fixtures/tiny-sd) and peft (pinned in requirements.txt).

    python tools/reference/make_lora_fixtures.py                    # everything
    python tools/reference/make_lora_fixtures.py --only lora        # sections: lora, single
"""

import argparse
import json
import math
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

FIX = mf.FIX
LORA = FIX / "lora"
SINGLE = FIX / "single-file"
TINY_SD = FIX / "tiny-sd"
PROMPT = "a red circle on a blue background"
RANK = 4

# modules the published latent-consistency/lcm-lora-sdv1-5 trains (suffixes of diffusers UNet module names)
LCM_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


# ---------------------------------------------------------------------------------------------- helpers
def load_sd_pipe(path=TINY_SD):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_lcm4(pipe, seed=0):
    with torch.no_grad():
        img = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed)).images
    return torch.from_numpy(np.asarray(img)).float()


def lora_modules(model):
    """name -> module for every Linear / Conv2d."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def rand_pair(g, module, rank):
    """Random (down, up) in kohya orientation: Linear down [r,in], up [out,r]; Conv down [r,in,k,k], up [out,r,1,1].
    Both factors non-zero; delta = up @ down has roughly the magnitude of the weight itself."""
    w = module.weight
    if w.ndim == 2:
        out_f, in_f = w.shape
        down = torch.randn([rank, in_f], generator=g) / math.sqrt(in_f)
        up = torch.randn([out_f, rank], generator=g) * (0.7 / math.sqrt(rank))
    else:
        out_f, in_f, kh, kw = w.shape
        down = torch.randn([rank, in_f, kh, kw], generator=g) / math.sqrt(in_f * kh * kw)
        up = torch.randn([out_f, rank, 1, 1], generator=g) * (0.7 / math.sqrt(rank))
    return down, up


def delta_of(down, up):
    """kohya/peft LoRA delta (before scale) in the weight's shape, computed in f32."""
    d, u = down.float(), up.float()
    if d.ndim == 2:
        return u @ d
    r = d.shape[0]
    return (u.reshape(u.shape[0], r) @ d.reshape(r, -1)).reshape(u.shape[0], *d.shape[1:])


def save_st(path, tensors, metadata=None):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def save_st_sorted(path, tensors, metadata):
    """safetensors writer with a deterministic header: the Rust safetensors library serialises `__metadata__` from a
    HashMap (key order varies between processes), so files with 2+ metadata entries are written here instead:
    header JSON = {"__metadata__": {sorted}, tensors in name order}, padded with spaces to a multiple of 8 bytes,
    tensor data in the same order (the standard format; any safetensors reader loads it)."""
    import struct

    dt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for k in sorted(tensors):
        v = tensors[k].detach().contiguous().cpu()
        b = v.view(torch.uint8).numpy().tobytes() if v.numel() else b""
        header[k] = {"dtype": dt[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_st(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


class LogCapture:
    """Collects diffusers / peft / transformers warnings during load_lora_weights (must be none)."""

    def __init__(self):
        import logging
        import warnings

        self.records = []
        self._warnings = warnings
        self._logging = logging

    def __enter__(self):
        import diffusers.utils.logging as dlog

        cap = self

        class H(self._logging.Handler):
            def emit(self, record):
                if record.levelno >= self._level_floor:
                    cap.records.append(f"{record.name}: {record.getMessage()}")

        H._level_floor = self._logging.WARNING
        self.h = H()
        self.loggers = [dlog.get_logger("diffusers"), self._logging.getLogger("peft"),
                        self._logging.getLogger("transformers")]
        for lg in self.loggers:
            lg.addHandler(self.h)
        self.wctx = self._warnings.catch_warnings(record=True)
        self.w = self.wctx.__enter__()
        self._warnings.simplefilter("always")
        return self

    def __exit__(self, *a):
        for lg in self.loggers:
            lg.removeHandler(self.h)
        self.wctx.__exit__(*a)
        self.records += [f"warning: {w.message}" for w in self.w]
        return False


def lora_layer_counts(pipe, adapter):
    """Number of modules carrying the adapter (peft LoraLayer with `adapter` in lora_A) in unet / text encoder."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        n = 0
        for _, m in getattr(pipe, comp).named_modules():
            if isinstance(m, LoraLayer) and adapter in m.lora_A:
                n += 1
        out[comp] = n
    return out


def peft_scalings(pipe, adapter):
    """module name -> peft scaling (lora_alpha / r) actually used, per component."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        for n, m in getattr(pipe, comp).named_modules():
            if isinstance(m, LoraLayer) and adapter in m.scaling:
                out[f"{comp}.{n}"] = float(m.scaling[adapter])
    return out


# ------------------------------------------------------------------------------------ LDM <-> diffusers names
def unet_name_to_ldm(name, cfg):
    """diffusers UNet2DConditionModel module/parameter name -> original LDM name (without `model.diffusion_model.`).
    cfg: the unet config (layers_per_block, down_block_types/up_block_types). Returns None for unknown names."""
    L = cfg["layers_per_block"]
    p = name.split(".")
    res_inner = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def resnet_rest(rest):
        return [res_inner[rest[0]]] + rest[1:] if rest[0] in res_inner else None

    def join(*parts):
        return ".".join(str(x) for x in parts if x != "")

    if p[0] == "conv_in":
        return join("input_blocks.0.0", *p[1:])
    if p[0] == "time_embedding":
        return join({"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]], *p[2:])
    if p[0] == "conv_norm_out":
        return join("out.0", *p[1:])
    if p[0] == "conv_out":
        return join("out.2", *p[1:])
    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.{(i+1)(L+1)}.0.op.*
            return join(f"input_blocks.{(i + 1) * (L + 1)}.0.op", *p[5:])
        j = int(p[3])
        blk = 1 + i * (L + 1) + j
        if kind == "resnets":
            r = resnet_rest(p[4:])
            return join(f"input_blocks.{blk}.0", *r) if r else None
        if kind == "attentions":
            return join(f"input_blocks.{blk}.1", *p[4:])
    if p[0] == "mid_block":
        kind, j = p[1], int(p[2])
        if kind == "resnets":
            r = resnet_rest(p[3:])
            return join(f"middle_block.{0 if j == 0 else 2}", *r) if r else None
        if kind == "attentions":
            return join("middle_block.1", *p[3:])
    if p[0] == "up_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.* -> output_blocks.{i(L+1)+L}.{1|2}.conv.*
            has_attn = "CrossAttn" in cfg["up_block_types"][i]
            return join(f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv", *p[5:])
        j = int(p[3])
        blk = i * (L + 1) + j
        if kind == "resnets":
            r = resnet_rest(p[4:])
            return join(f"output_blocks.{blk}.0", *r) if r else None
        if kind == "attentions":
            return join(f"output_blocks.{blk}.1", *p[4:])
    return None


def vae_name_to_ldm(name, cfg):
    """diffusers AutoencoderKL parameter name -> LDM name (without `first_stage_model.`)."""
    n_up = len(cfg["up_block_types"])
    p = name.split(".")
    res_inner = {"conv_shortcut": "nin_shortcut"}

    def resnet(prefix, rest):
        return ".".join([prefix, res_inner.get(rest[0], rest[0])] + rest[1:])

    if p[0] in ("quant_conv", "post_quant_conv"):
        return name
    enc = p[0]  # encoder / decoder
    q = p[1:]
    if q[0] in ("conv_in", "conv_out"):
        return name
    if q[0] == "conv_norm_out":
        return ".".join([enc, "norm_out"] + q[1:])
    if q[0] == "mid_block":
        if q[1] == "resnets":
            return resnet(f"{enc}.mid.block_{int(q[2]) + 1}", q[3:])
        if q[1] == "attentions":
            inner = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            rest = q[3:]
            if rest[0] == "to_out":
                rest = rest[1:]  # to_out.0.weight -> proj_out.weight
            return ".".join([f"{enc}.mid.attn_1", inner.get(q[3], q[3])] + rest[1:])
    if q[0] == "down_blocks":
        i = int(q[1])
        if q[2] == "downsamplers":
            return ".".join([f"{enc}.down.{i}.downsample"] + q[4:])
        return resnet(f"{enc}.down.{i}.block.{q[3]}", q[4:])
    if q[0] == "up_blocks":
        i = n_up - 1 - int(q[1])
        if q[2] == "upsamplers":
            return ".".join([f"{enc}.up.{i}.upsample"] + q[4:])
        return resnet(f"{enc}.up.{i}.block.{q[3]}", q[4:])
    return None


def kohya_name(prefix, module_name):
    return prefix + module_name.replace(".", "_")


# ------------------------------------------------------------------------------------------------- LoRAs
def make_kohya(g, modules, select, rank, prefix, namer, alphas, dtype):
    """kohya-layout LoRA over `select` (module names of `modules`): {name}.lora_down.weight, .lora_up.weight and
    (where alphas(i) is not None) a 0-d `.alpha`. Returns (tensors, info {diffusers_name: (kohya, scale)})."""
    t, info = {}, {}
    for i, name in enumerate(select):
        down, up = rand_pair(g, modules[name], rank)
        k = namer(name)
        t[f"{k}.lora_down.weight"] = down.to(dtype)
        t[f"{k}.lora_up.weight"] = up.to(dtype)
        a = alphas(i, name)
        if a is not None:
            t[f"{k}.alpha"] = torch.tensor(a, dtype=dtype)
        info[name] = {"key": k, "alpha": a, "rank": rank, "scale": (a / rank) if a is not None else 1.0}
    return t, info


def clean_md(cfg):
    """LoraConfig.to_dict() made deterministic: sorted target_modules (a set in peft), no local path."""
    md = cfg.to_dict()
    md["target_modules"] = sorted(md["target_modules"])
    md["base_model_name_or_path"] = None
    return md


ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def alpha_lcm(i, name):
    """kohya_diffusers alphas. diffusers 0.42.1 IGNORES the alpha of attention to_q/to_k/to_v/to_out.0 kohya modules
    (their network_alphas names come out mangled as `...attn1.processor.to_q_lora.down.weight` and peft drops them
    from alpha_pattern with a warning), using the adapter-wide lora_alpha = the MOST COMMON alpha of the file instead.
    So attention modules get the most common value (2.0, scale 0.5) and only the other modules vary."""
    if name.endswith(ATTN):
        return 2.0
    return [8.0, 1.0, 2.0, 4.0][i % 4]


def alpha_ldm(i, name):
    """kohya_ldm alphas: most common 4.0 (= rank, scale 1); some modules WITHOUT .alpha (kohya semantics: scale 1;
    diffusers gives them the most common alpha, which is why that must equal the rank); a few non-attention modules
    with 2.0 / 16.0."""
    if name.endswith(ATTN):
        return 4.0
    return [None, 4.0, 2.0, 4.0, 16.0][i % 5]


def make_loras():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    if LORA.exists():
        shutil.rmtree(LORA)
    LORA.mkdir(parents=True)
    pipe = load_sd_pipe()
    unet_cfg = dict(pipe.unet.config)
    um, tm = lora_modules(pipe.unet), lora_modules(pipe.text_encoder)
    files = {}

    # 1. kohya over diffusers names (LCM-LoRA layout), fp16 like the published file
    sel = [n for n in sorted(um) if any(n == s or n.endswith("." + s) for s in LCM_SUFFIXES)]
    t, info = make_kohya(torch.Generator().manual_seed(101), um, sel, RANK, "lora_unet_",
                         lambda n: kohya_name("lora_unet_", n), alpha_lcm, torch.float16)
    save_st(LORA / "kohya_diffusers.safetensors", t)
    files["kohya_diffusers"] = {"layout": "kohya over diffusers module names (lcm-lora-sdv1-5 layout)",
                                "dtype": "float16", "modules": info}

    # 2. kohya over LDM names (A1111/civitai) + LoCon convs + text encoder
    ldm_sel = []
    for n in sorted(um):
        ln = unet_name_to_ldm(n, unet_cfg)
        if ln is None or n.startswith(("conv_in", "conv_out", "time_embedding")):
            continue
        # diffusers maps LDM output_blocks.{k}.1.conv to attentions.* whatever the block, so the upsampler of a
        # block WITHOUT attention (SD1.5's up_blocks.0 = output_blocks.2.1.conv) cannot be loaded by diffusers:
        # left out (documented).
        if n.startswith("up_blocks.0.upsamplers"):
            continue
        if any(n.endswith(s) for s in ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2",
                                        "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "conv_shortcut",
                                        "downsamplers.0.conv", "upsamplers.0.conv")):
            ldm_sel.append(n)
    te_sel = [n for n in sorted(tm) if n.endswith(("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj",
                                                   "mlp.fc1"))]
    g = torch.Generator().manual_seed(102)
    t, info = make_kohya(g, um, ldm_sel, RANK, "lora_unet_",
                         lambda n: kohya_name("lora_unet_", unet_name_to_ldm(n, unet_cfg)),
                         alpha_ldm, torch.float32)
    t2, info2 = make_kohya(g, tm, te_sel, RANK, "lora_te_", lambda n: kohya_name("lora_te_text_model_", n),
                           lambda i, n: 2.0, torch.float32)
    t.update(t2)
    save_st(LORA / "kohya_ldm.safetensors", t)
    files["kohya_ldm"] = {"layout": "kohya over original LDM names (+ lora_te_ text encoder)", "dtype": "float32",
                          "modules": info, "text_encoder_modules": info2}

    # 6. style: second kohya_diffusers LoRA (other modules, rank 8, with text encoder) for stacking
    st_sel = [n for n in sorted(um) if n.endswith(("attn2.to_q", "attn2.to_v", "attn1.to_k", "ff.net.0.proj"))
              or (n.startswith("up_blocks") and n.endswith("conv2"))]
    # NOTE the out_proj: diffusers converts kohya text-encoder attention keys (`to_k_lora`) only when SOME key of the
    # text-encoder state dict contains `to_out_lora` (convert_state_dict_to_diffusers' format sniffing); without an
    # out_proj LoRA, k_proj LoRAs stay unconverted and transformers drops them as UNEXPECTED.
    st_te = [n for n in sorted(tm) if n.endswith(("self_attn.k_proj", "self_attn.out_proj", "mlp.fc2"))]
    g = torch.Generator().manual_seed(106)
    t, info = make_kohya(g, um, st_sel, 8, "lora_unet_", lambda n: kohya_name("lora_unet_", n), lambda i, n: 4.0,
                         torch.float16)
    t2, info2 = make_kohya(g, tm, st_te, 8, "lora_te_", lambda n: kohya_name("lora_te_text_model_", n),
                           lambda i, n: 8.0, torch.float16)
    t.update(t2)
    save_st(LORA / "style.safetensors", t)
    files["style"] = {"layout": "kohya over diffusers module names, rank 8, + lora_te_", "dtype": "float16",
                      "modules": info, "text_encoder_modules": info2}

    # 3. PEFT as save_lora_weights writes it (with adapter metadata), 4. no prefix, 5. old diffusers naming
    p2 = load_sd_pipe()
    unet_targets = [n for n in sorted(um) if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                         "attn2.to_q", "proj_in"))
                    or n in ("down_blocks.0.resnets.0.conv1", "mid_block.resnets.1.conv2")]
    te_targets = [n for n in sorted(tm) if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1"))]
    ucfg = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=unet_targets)
    tcfg = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=te_targets)
    p2.unet.add_adapter(ucfg)
    p2.text_encoder.add_adapter(tcfg)
    g = torch.Generator().manual_seed(103)
    with torch.no_grad():
        for comp in (p2.unet, p2.text_encoder):
            for n, prm in sorted(comp.named_parameters(), key=lambda kv: kv[0]):
                if "lora_A" in n:
                    fan = prm[0].numel()
                    prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(fan))
                elif "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * (0.7 / math.sqrt(RANK)))
    usd = get_peft_model_state_dict(p2.unet)
    tsd = get_peft_model_state_dict(p2.text_encoder)
    with tempfile.TemporaryDirectory() as d:
        StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=usd, text_encoder_lora_layers=tsd,
                                                  unet_lora_adapter_metadata=clean_md(ucfg),
                                                  text_encoder_lora_adapter_metadata=clean_md(tcfg))
        written = sorted(os.listdir(d))
        peft_t, peft_meta = load_st(Path(d) / "pytorch_lora_weights.safetensors")
    save_st_sorted(LORA / "peft.safetensors", peft_t, peft_meta)
    peft_t2, peft_meta2 = load_st(LORA / "peft.safetensors")
    assert peft_meta2 == peft_meta and all(torch.equal(peft_t[k], peft_t2[k]) for k in peft_t)
    peft_meta = dict(sorted(peft_meta.items()))
    files["peft"] = {"layout": "PEFT lora_A/lora_B with unet./text_encoder. prefixes, written by "
                               "StableDiffusionPipeline.save_lora_weights (+ adapter metadata)",
                     "save_lora_weights_wrote": written, "safetensors_metadata": peft_meta,
                     "note": "re-written with a deterministic header (save_st_sorted); tensors and metadata are "
                             "exactly what save_lora_weights wrote",
                     "lora_alpha": 8, "r": RANK, "unet_targets": unet_targets, "text_encoder_targets": te_targets}
    save_st(LORA / "peft_noprefix.safetensors",
            {k[len("unet."):]: v for k, v in peft_t.items() if k.startswith("unet.")})
    files["peft_noprefix"] = {"layout": "peft.safetensors' unet tensors with the `unet.` prefix removed, no metadata"}
    # old diffusers naming: convert_state_dict_to_diffusers (what the diffusers training scripts saved before
    # metadata), restricted to the modules that mapping renames (attention to_q/k/v/out.0, text q/k/v/out_proj)
    old_u = {k: v for k, v in usd.items() if any(f"{s}.lora_" in k for s in ("to_q", "to_k", "to_v", "to_out.0"))}
    old_t = {k: v for k, v in tsd.items() if "self_attn" in k}
    old = {}
    old.update({"unet." + k: v for k, v in convert_state_dict_to_diffusers(old_u).items()})
    # text encoder with the `text_model.` segment that files written with transformers < 5 carry
    # (diffusers strips it when the CLIPTextModel has no `.text_model`)
    old.update({"text_encoder.text_model." + k: v for k, v in convert_state_dict_to_diffusers(old_t).items()})
    save_st(LORA / "diffusers_old.safetensors", old)
    files["diffusers_old"] = {"layout": "convert_state_dict_to_diffusers naming (`unet.*.to_q.lora.down.weight`, "
                                        "`text_encoder.text_model.*.q_proj.lora_linear_layer.down.weight`), no "
                                        "metadata; the attention tensors of peft.safetensors"}
    del p2

    return files


def expected_fused(base, down, up, scale):
    return base.float() + scale * delta_of(down, up)


def make_lora_refs(files):
    """Images (unfused, fused, stack) + fused weights + module counts; checks scale = alpha/rank ourselves."""
    tensors, cases = {}, {}
    base_img = run_lcm4(load_sd_pipe())
    ref_lcm4 = load_st(FIX / "reference" / "pipelines.safetensors")[0]["lcm4"]
    assert torch.equal(base_img, ref_lcm4), "tiny-sd lcm4 does not reproduce reference/pipelines.safetensors"
    for name in ("kohya_diffusers", "kohya_ldm", "peft", "peft_noprefix", "diffusers_old", "style"):
        path = LORA / f"{name}.safetensors"
        pipe = load_sd_pipe()
        orig = {f"unet.{n}": m.weight.detach().clone() for n, m in lora_modules(pipe.unet).items()}
        orig.update({f"text_encoder.{n}": m.weight.detach().clone() for n, m in lora_modules(pipe.text_encoder).items()})
        kw = {"unet_config": pipe.unet.config} if name == "kohya_ldm" else {}
        load_expr = (f"pipe.load_lora_weights(path, adapter_name='{name}'"
                     f"{', unet_config=pipe.unet.config' if kw else ''})")
        if name == "kohya_ldm":
            # without unet_config (what pipe.load_lora_weights passes for SD1.x) the LDM block numbers are not
            # remapped: record what happens
            probe = load_sd_pipe()
            try:
                with LogCapture() as cap0:
                    probe.load_lora_weights(str(path), adapter_name=name)
                ldm_note = {"warnings": cap0.records, "modules_touched": lora_layer_counts(probe, name)}
            except Exception as e:  # noqa: BLE001
                # (the message lists a Python set: not deterministic, so only its type is recorded)
                ldm_note = {"error": type(e).__name__, "note": "the un-remapped names (`down_blocks.1.1.proj_in`, "
                            "`up_blocks.3.0.conv1`, ...) match no module of the UNet"}
            del probe
        if name == "peft_noprefix":
            # pipe.load_lora_weights filters the state dict by the `unet.` prefix: a prefix-less PEFT file loads
            # NOTHING there (only the warning "No LoRA keys associated to UNet2DConditionModel found with the
            # prefix='unet'"). Record that, then load it the way diffusers supports: unet.load_lora_adapter(prefix=None).
            probe = load_sd_pipe()
            with LogCapture() as cap0:
                probe.load_lora_weights(str(path), adapter_name=name)
            noprefix_note = {"pipe.load_lora_weights": {"warnings": cap0.records,
                                                        "modules_touched": lora_layer_counts(probe, name)}}
            del probe
            load_expr = f"pipe.unet.load_lora_adapter(path, prefix=None, adapter_name='{name}')"
            with LogCapture() as cap:
                pipe.unet.load_lora_adapter(str(path), prefix=None, adapter_name=name)
        else:
            with LogCapture() as cap:
                pipe.load_lora_weights(str(path), adapter_name=name, **kw)
        counts = lora_layer_counts(pipe, name)
        scal = peft_scalings(pipe, name)
        img_u = run_lcm4(pipe)
        with LogCapture() as cap2:
            pipe.fuse_lora()
        img_f = run_lcm4(pipe)
        # fused weight - original = scale * up @ down, scale read back per module
        fused_delta = {}
        from peft.tuners.lora import LoraLayer
        n_changed = {"unet": 0, "text_encoder": 0}
        for comp in ("unet", "text_encoder"):
            for n, m in getattr(pipe, comp).named_modules():
                if isinstance(m, LoraLayer):
                    w = m.get_base_layer().weight.detach()
                    if not torch.equal(w, orig[f"{comp}.{n}"]):
                        n_changed[comp] += 1
                    fused_delta[f"{comp}.{n}"] = w - orig[f"{comp}.{n}"]
        fused_w = {f"{comp}.{n}": m.get_base_layer().weight.detach().clone()
                   for comp in ("unet", "text_encoder") for n, m in getattr(pipe, comp).named_modules()
                   if isinstance(m, LoraLayer)}
        # un-fusing in diffusers subtracts the delta again: not bit-exact in f32 (recorded)
        pipe.unfuse_lora()
        unfuse_err, unfuse_exact = 0.0, True
        for comp in ("unet", "text_encoder"):
            for n, m in getattr(pipe, comp).named_modules():
                if isinstance(m, LoraLayer):
                    w = m.get_base_layer().weight.detach()
                    unfuse_err = max(unfuse_err, float((w - orig[f"{comp}.{n}"]).abs().max()))
                    unfuse_exact &= torch.equal(w, orig[f"{comp}.{n}"])
        diff_u = float((img_u - base_img).abs().max())
        diff_uf = float((img_u - img_f).abs().max())
        tensors[f"{name}.unfused"] = img_u
        tensors[f"{name}.fused"] = img_f
        cases[name] = {"file": f"lora/{name}.safetensors", "load": load_expr,
                       "warnings_on_load": cap.records, "warnings_on_fuse": cap2.records,
                       "modules_touched": counts, "weights_changed_by_fuse_lora": n_changed,
                       "peft_scaling_distinct_values": sorted(set(scal.values())),
                       "max_abs_diff_unfused_vs_base_lcm4": diff_u, "max_abs_diff_unfused_vs_fused": diff_uf,
                       "unfuse_lora_restores_weights_bit_exactly": unfuse_exact,
                       "unfuse_lora_max_abs_weight_error": unfuse_err}
        if name == "peft_noprefix":
            cases[name]["via_pipe_load_lora_weights"] = noprefix_note
        if name == "kohya_ldm":
            cases[name]["without_unet_config"] = ldm_note
        files[name]["checks"] = cases[name]
        print(f"  {name}: touched {counts}, changed {n_changed}, warnings {cap.records + cap2.records}, "
              f"|unfused-base| {diff_u:.4f}, |unfused-fused| {diff_uf:.2e}", flush=True)
        has_te = any(k.startswith(("lora_te", "text_encoder.")) for k in load_st(path)[0])
        benign = "No LoRA keys associated to CLIPTextModel found"
        bad = [r for r in cap.records if has_te or benign not in r]
        assert not bad, bad
        assert diff_u > 0.05, f"{name} does not visibly change the image"
        if name in ("kohya_diffusers", "kohya_ldm", "style"):
            # our own arithmetic: fused = W + alpha/rank * up @ down (f32), for every module of the file
            lt, _ = load_st(path)
            worst = 0.0
            for key_info, comp in (("modules", "unet"), ("text_encoder_modules", "text_encoder")):
                for mname, inf in files[name].get(key_info, {}).items():
                    k = inf["key"]
                    want = inf["scale"] * delta_of(lt[f"{k}.lora_down.weight"], lt[f"{k}.lora_up.weight"])
                    got = fused_delta[f"{comp}.{mname}"]
                    err = float((want - got).abs().max() / want.abs().max())
                    worst = max(worst, err)
                    if err > 1e-3:
                        print(f"    MISMATCH {comp}.{mname}: rel err {err:.3g} scale {inf['scale']} "
                              f"diffusers scaling {scal.get(comp + '.' + mname)}")
            cases[name]["max_rel_err_fused_delta_vs_alpha_over_rank"] = worst
        if name == "kohya_diffusers":
            for mname in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                          "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
                          "up_blocks.0.upsamplers.0.conv"):
                tensors[f"fused.unet.{mname}"] = fused_w[f"unet.{mname}"]
        if name == "kohya_ldm":
            for mname in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"):
                tensors[f"fused.text_encoder.{mname}"] = fused_w[f"text_encoder.{mname}"]
            tensors["fused.unet.mid_block.resnets.0.conv1"] = fused_w["unet.mid_block.resnets.0.conv1"]
        del pipe

    # stacking: kohya_diffusers as "lcm" (1.0) + style as "style" (0.8), unfused and fused
    pipe = load_sd_pipe()
    pipe.load_lora_weights(str(LORA / "kohya_diffusers.safetensors"), adapter_name="lcm")
    pipe.load_lora_weights(str(LORA / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.8])
    te_scal = peft_scalings(pipe, "style")
    tensors["stack"] = run_lcm4(pipe)
    pipe.fuse_lora()
    tensors["stack.fused"] = run_lcm4(pipe)
    cases["stack"] = {"load": "load_lora_weights(kohya_diffusers, adapter_name='lcm'); load_lora_weights(style, "
                              "adapter_name='style'); set_adapters(['lcm','style'], adapter_weights=[1.0, 0.8])",
                      "style_scalings_after_set_adapters": sorted(set(te_scal.values())),
                      "style_text_encoder_scalings": sorted({v for k, v in te_scal.items()
                                                             if k.startswith("text_encoder.")}),
                      "max_abs_diff_stack_vs_stack_fused": float((tensors["stack"] - tensors["stack.fused"]).abs().max())}
    print(f"  stack: {cases['stack']}")
    return tensors, cases


def make_lora():
    files = make_loras()
    tensors, cases = make_lora_refs(files)
    save_st(LORA / "reference.safetensors", tensors)
    mf.write_json(LORA / "reference.json", mf.jsonable({"doc": "see tests/fixtures/README.md (LoRA fixtures)",
                                                        "settings": LCM4_SETTINGS, "files": files, "cases": cases}))



# ------------------------------------------------------------------------------------------- single files
def clip_to_ldm(te_sd):
    """transformers CLIPTextModel state dict (keys with or without `text_model.`) -> SD1.x LDM keys."""
    out = {}
    for k, v in te_sd.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    return out


def clip_to_openclip(te_sd, n_hidden, extra_layers_sd, text_projection):
    """transformers CLIPTextModel state dict -> SD2.x OpenCLIP keys (`cond_stage_model.model.*`).
    extra_layers_sd: {i: state dict of encoder layer i (no prefix)} for resblocks beyond the folder's layers."""
    P = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    out = {P + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           P + "positional_embedding": sd["embeddings.position_embedding.weight"],
           P + "ln_final.weight": sd["final_layer_norm.weight"], P + "ln_final.bias": sd["final_layer_norm.bias"],
           P + "text_projection": text_projection}
    layers = {i: {k[len(f"encoder.layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
              for i in range(n_hidden)}
    layers.update(extra_layers_sd)
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
    for i, L in sorted(layers.items()):
        R = f"{P}transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            out[R + f"attn.in_proj_{wb}"] = torch.cat([L[f"self_attn.{q}_proj.{wb}"] for q in ("q", "k", "v")], 0)
        for k, v in L.items():
            if k.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                continue
            mod, wb = k.rsplit(".", 1)
            out[R + f"{ren[mod]}.{wb}"] = v
    return out


def unet_to_ldm(unet_sd, cfg):
    out = {}
    for k, v in unet_sd.items():
        lk = unet_name_to_ldm(k, cfg)
        assert lk is not None, k
        out["model.diffusion_model." + lk] = v
    return out


def vae_to_ldm(vae_sd, cfg):
    out = {}
    for k, v in vae_sd.items():
        lk = vae_name_to_ldm(k, cfg)
        assert lk is not None, k
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention q/k/v/proj_out are 1x1 convs
        out["first_stage_model." + lk] = v
    return out


def f16_round_(module):
    with torch.no_grad():
        for p_ in module.parameters():
            p_.copy_(p_.half().float())
    return module


def check_same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), (what, set(sa) ^ set(sb))
    bad = [k for k in sa if not torch.equal(sa[k].float(), sb[k].float())]
    assert not bad, (what, bad[:10])
    return len(sa)


def single_file_case(name, single_path, folder, tensors, meta):
    """from_single_file(config=folder) must equal the folder's f16-rounded weights; images of both."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    with LogCapture() as cap:
        sf = StableDiffusionPipeline.from_single_file(str(single_path), config=str(folder), local_files_only=True,
                                                      torch_dtype=torch.float32, safety_checker=None,
                                                      requires_safety_checker=False)
    fo = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    counts = {}
    for comp in ("unet", "vae", "text_encoder"):
        f16_round_(getattr(fo, comp))
        counts[comp] = check_same_weights(getattr(sf, comp), getattr(fo, comp), f"{name}.{comp}")
    # Re-materialise every parameter in fresh storage in BOTH pipelines: from_single_file leaves tensors at
    # offsets whose alignment makes torch's CPU GEMM/conv kernels round differently (~1e-6 image difference with
    # bit-identical weights); after the clone the two pipelines give bit-identical images.
    for pipe in (sf, fo):
        for comp in ("unet", "vae", "text_encoder"):
            for p_ in getattr(pipe, comp).parameters():
                p_.data = p_.data.clone()
    imgs = {}
    for tag, pipe in ((f"{name}.lcm4", sf), (f"folder_f16.{name}.lcm4", fo)):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        imgs[tag] = run_lcm4(pipe)
    a, b = imgs.values()
    assert torch.equal(a, b), f"{name}: single file and folder images differ by {(a - b).abs().max()}"
    tensors.update(imgs)
    meta[name] = {"file": f"single-file/{single_path.name}", "config_folder": str(folder.relative_to(FIX)),
                  "load": f"StableDiffusionPipeline.from_single_file('{single_path.name}', config='tests/fixtures/"
                          f"{folder.relative_to(FIX)}', local_files_only=True, torch_dtype=torch.float32)",
                  "warnings": cap.records, "parameters_checked_equal": counts,
                  "scheduler_config": mf.sched_config(sf.scheduler),
                  "images_equal": True, "image_mean": float(a.mean())}
    print(f"  {name}: weights equal {counts}, images equal, warnings {cap.records}", flush=True)


def ldm_extras():
    """Non-model keys that published SD1.x LDM checkpoints carry (the LatentDiffusion DDPM buffers, f32 [1000], and
    model_ema counters); a loader must ignore them. Values as ldm's register_schedule computes them for
    scaled_linear 0.00085..0.012, 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    pv = betas * (1 - acp) / (1 - ac)
    d = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp, "sqrt_alphas_cumprod": ac.sqrt(),
         "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
         "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
         "posterior_variance": pv, "posterior_log_variance_clipped": torch.cat([pv[1:2], pv[1:]]).log(),
         "posterior_mean_coef1": betas * acp.sqrt() / (1 - ac),
         "posterior_mean_coef2": (1 - acp) * (1 - betas).sqrt() / (1 - ac)}
    d = {k: v.float() for k, v in d.items()}
    d["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    d["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return d


def make_tiny_sd_single(tensors, meta):
    fo = load_sd_pipe()
    ck = {}
    ck.update(unet_to_ldm(fo.unet.state_dict(), dict(fo.unet.config)))
    ck.update(vae_to_ldm(fo.vae.state_dict(), dict(fo.vae.config)))
    ck.update(clip_to_ldm(fo.text_encoder.state_dict()))
    ck = {k: v.half() for k, v in ck.items()}
    # as in the published SD1.x checkpoints: the CLIP position_ids buffer (int64 [1,77]); diffusers ignores it
    ck["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ck.update(ldm_extras())
    save_st(SINGLE / "tiny-sd.safetensors", dict(sorted(ck.items())))
    single_file_case("tiny-sd", SINGLE / "tiny-sd.safetensors", TINY_SD, tensors, meta)
    meta["tiny-sd"]["n_keys"] = len(ck)


# stabilityai/stable-diffusion-2(-1) scheduler/scheduler_config.json (DDIM, v-prediction)
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SD2_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 16, 32],
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                cross_attention_dim=16, norm_num_groups=8, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                upcast_attention=True)
SD2_VAE = dict(mf.VAE_CFG, block_out_channels=[8, 16, 16, 16], norm_num_groups=8)
# SD2's text encoder: OpenCLIP ViT-H text tower, 24 resblocks of which diffusers folders keep 23
# (num_hidden_layers 23 = the penultimate layer), gelu, legacy bos 0 / eos 2 ids as in the SD2 config.
SD2_TEXT = dict(mf.TEXT_CFG, num_hidden_layers=23, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD2_FILE_LAYERS = 24


def make_tiny_sd2_folder():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = FIX / "tiny-sd2"
    if out.exists():
        shutil.rmtree(out)
    te24 = CLIPTextModel(CLIPTextConfig(**dict(SD2_TEXT, num_hidden_layers=SD2_FILE_LAYERS))).eval()
    mf.reinit(te24, 31)
    te = CLIPTextModel(CLIPTextConfig(**SD2_TEXT)).eval()
    sd24 = te24.state_dict()
    missing, unexpected = te.load_state_dict(sd24, strict=False)
    assert not missing and all(k.startswith(f"encoder.layers.{SD2_FILE_LAYERS - 1}.") for k in unexpected)
    extra = {SD2_FILE_LAYERS - 1: {k[len(f"encoder.layers.{SD2_FILE_LAYERS - 1}."):]: v for k, v in sd24.items()
                                   if k.startswith(f"encoder.layers.{SD2_FILE_LAYERS - 1}.")}}
    unet = UNet2DConditionModel(**SD2_UNET).eval()
    mf.reinit(unet, 32)
    vae = AutoencoderKL(**SD2_VAE).eval()
    mf.reinit(vae, 33)
    tmp = tempfile.TemporaryDirectory()
    tokdir = Path(tmp.name) / "tok"
    mf.copy_tokenizer(tokdir)
    for fn in ("tokenizer_config.json", "special_tokens_map.json"):
        d = json.loads((tokdir / fn).read_text())
        d["pad_token"] = "!"  # SD2's tokenizer pads with "!" (id 0)
        (tokdir / fn).write_text(json.dumps(d, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(tokdir))
    assert tok.pad_token_id == 0, tok.pad_token_id
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SD2_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)  # fp16 storage (no variant suffix); references load it with dtype=float32
    pipe.save_pretrained(str(out), safe_serialization=True)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SD2_SCHEDULER)
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tokdir, out / "tokenizer")
    tmp.cleanup()
    rewrote = mf.add_text_model_prefix(out / "text_encoder" / "model.safetensors")
    assert rewrote
    te2, info = CLIPTextModel.from_pretrained(str(out / "text_encoder"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return extra


def make_tiny_sd2_single(tensors, meta, extra):
    from diffusers import StableDiffusionPipeline

    folder = FIX / "tiny-sd2"
    fo = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    g = torch.Generator().manual_seed(34)
    text_projection = 0.25 * torch.randn([16, 16], generator=g)
    extra = {i: {k: v.half().float() for k, v in L.items()} for i, L in extra.items()}
    ck = {}
    ck.update(unet_to_ldm(fo.unet.state_dict(), dict(fo.unet.config)))
    ck.update(vae_to_ldm(fo.vae.state_dict(), dict(fo.vae.config)))
    ck.update(clip_to_openclip(fo.text_encoder.state_dict(), SD2_TEXT["num_hidden_layers"], extra, text_projection))
    ck = {k: v.half() for k, v in ck.items()}
    save_st(SINGLE / "tiny-sd2.safetensors", dict(sorted(ck.items())))
    single_file_case("tiny-sd2", SINGLE / "tiny-sd2.safetensors", folder, tensors, meta)
    meta["tiny-sd2"]["n_keys"] = len(ck)
    meta["tiny-sd2"]["note"] = (
        f"the file has {SD2_FILE_LAYERS} OpenCLIP resblocks, the folder's text encoder num_hidden_layers "
        f"{SD2_TEXT['num_hidden_layers']}: diffusers drops resblocks.23.* and text_projection by NAME "
        "(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, hard-coded for 24-block ViT-H), so the folder's text encoder = the "
        "first 23 resblocks + ln_final, i.e. SD2's penultimate-layer text features")


LCM4_SETTINGS = {"model": "tiny-sd", "pipeline": "StableDiffusionPipeline",
                 "scheduler": "LCMScheduler.from_config(pipe.scheduler.config)", "num_inference_steps": 4,
                 "guidance_scale": 1.0, "seed": 0, "generator": 'torch.Generator("cpu").manual_seed(seed)',
                 "width": 64, "height": 64, "prompt": PROMPT, "output_type": "np", "dtype": "float32",
                 "note": "same as the `lcm4` case of reference/pipelines.json"}

SECTIONS = ["lora", "single"]


def make_single():
    if SINGLE.exists():
        shutil.rmtree(SINGLE)
    SINGLE.mkdir(parents=True)
    tensors, meta = {}, {}
    make_tiny_sd_single(tensors, meta)
    extra = make_tiny_sd2_folder()
    make_tiny_sd2_single(tensors, meta, extra)
    save_st(SINGLE / "reference.safetensors", tensors)
    mf.write_json(SINGLE / "reference.json", mf.jsonable({"doc": "see tests/fixtures/README.md (single-file)",
                                                          "settings": LCM4_SETTINGS, "cases": meta}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS))
    only = [s for s in ap.parse_args().only.split(",") if s]
    for s in SECTIONS:
        if s in only:
            globals()[f"make_{s}"]()


if __name__ == "__main__":
    main()
