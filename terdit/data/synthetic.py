"""Small generated image folders and randomly initialised VAEs, for tests and benchmarks (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_vae_model(block_out_channels: tuple[int, ...] = (8, 16), *, seed: int = 0, latent_channels: int = 4):
    """A random diffusers AutoencoderKL with downsampling factor 2 ** (len(block_out_channels) - 1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(4, block_out_channels[0]),
        sample_size=32,
    )


def save_tiny_vae(path: str | Path, block_out_channels: tuple[int, ...] = (8, 16), *, seed: int = 0) -> Path:
    """Write a random tiny VAE as a diffusers directory, loadable with `load_vae(str(path))`."""
    path = Path(path)
    tiny_vae_model(block_out_channels, seed=seed).save_pretrained(path)
    return path


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 picture of smooth random blobs (compresses like a photo, unlike pure noise)."""
    small = rng.random((max(2, height // 8), max(2, width // 8), 3))
    big = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(big)


def make_image_folder(root: str | Path, classes: int = 3, per_class: int = 4, *, seed: int = 0,
                      sizes: tuple[tuple[int, int], ...] = ((48, 64), (80, 60), (40, 40), (100, 72))) -> Path:
    """root/class_<k>/img_<j>.<png|jpg|webp> with varied sizes; all files valid."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    fmts = ("png", "jpg", "webp")
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = sizes[(c + j) % len(sizes)]
            fmt = fmts[(c + j) % len(fmts)]
            Image.fromarray(smooth_image(rng, h, w)).save(d / f"img_{j}.{fmt}", quality=90)
    return root
