"""A tiny random AutoencoderTiny (diffusers layout) and its outputs, for fewstep's TAESD tests.

    python tools/reference/make_taesd_fixture.py

Writes tests/fixtures/taesd-tiny/{config.json, diffusion_pytorch_model.safetensors} (16 channels instead of
64, TAESD's block counts) and tests/fixtures/reference/taesd.safetensors:
  image   f32 [1,3,64,64] in [-1,1] (reference/init64.png preprocessed as diffusers does)
  latents f32 [1,4,8,8]  = AutoencoderTiny.encode(image).latents
  z       f32 [1,4,8,8]  seeded random latents
  decoded f32 [1,3,64,64] = AutoencoderTiny.decode(z).sample (in [-1,1] before clamping)
"""
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def main() -> None:
    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        latent_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():  # moderate random weights so every layer matters
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))
    out = ROOT / "taesd-tiny"
    vae.save_pretrained(out, safe_serialization=True)
    img = np.asarray(Image.open(ROOT / "reference" / "init64.png").convert("RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
    z = torch.randn([1, 4, 8, 8], generator=g)
    with torch.no_grad():
        latents = vae.encode(image).latents
        decoded = vae.decode(z).sample
    save_file({"image": image.contiguous(), "latents": latents.contiguous(), "z": z, "decoded": decoded.contiguous()},
              ROOT / "reference" / "taesd.safetensors")
    print("latents std", float(latents.std()), "decoded std", float(decoded.std()))


if __name__ == "__main__":
    main()
