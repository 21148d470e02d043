"""diffusers' tiled VAE decoding on the tiny SD's VAE, for fewstep's `AutoencoderKL::decode_tiled` test.

    python tools/reference/make_vae_tiling_fixture.py   # diffusers 0.42.1, torch 2.15.0

The tiny VAE (tests/fixtures/tiny-sd/vae: sample_size 64, 4 stages) tiles with 8 latents every 6, blends
16 pixels and keeps 48. Latents of 13×10 give 3×2 tiles, the last row one latent tall (its blend is cut to
8 pixels). Writes tests/fixtures/reference/vae_tiling.safetensors:
  z        f32 [1,4,13,10] seeded random latents (unscaled)
  tiled    f32 [1,3,104,80] = vae.decode(z) after vae.enable_tiling()
  whole    f32 [1,3,104,80] = vae.decode(z) without tiling (to show that tiling changes the picture)
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def main() -> None:
    vae = AutoencoderKL.from_pretrained(FIXTURES / "tiny-sd" / "vae").eval()
    z = torch.randn(1, 4, 13, 10, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = vae.decode(z).sample
        vae.enable_tiling()
        assert (vae.tile_latent_min_size, vae.tile_sample_min_size) == (8, 64)
        tiled = vae.decode(z).sample
    save_file({"z": z, "tiled": tiled.contiguous(), "whole": whole.contiguous()},
              FIXTURES / "reference" / "vae_tiling.safetensors")
    print("max |tiled - whole|", (tiled - whole).abs().max().item())


if __name__ == "__main__":
    main()
