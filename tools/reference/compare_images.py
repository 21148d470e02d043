"""Compares fewstep PNGs with a diffusers reference image tensor (output_type="np", [N, H, W, 3] in [0, 1]).

Usage: python compare_images.py REF.safetensors KEY OURS.png [OURS-1.png ...]
Prints the mean and max absolute difference per image in 1/255 units (the reference quantised as diffusers'
numpy_to_pil does: round(x * 255)).
"""
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import load_file


def main() -> None:
    ref_path, key, *ours = sys.argv[1:]
    ref = load_file(ref_path)[key]
    ref_u8 = np.round(ref * 255.0).astype(np.int32)
    for i, path in enumerate(ours):
        img = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
        d = np.abs(img - ref_u8[i])
        print(f"{path}: mean |diff| = {d.mean():.4f}/255, max |diff| = {d.max()}/255")


if __name__ == "__main__":
    main()
