"""Sampling: class labels -> images, with guidance, deterministic for a seed; PNG grids and ADM npz."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from terdit.defaults import device_setting, dtype_setting, nonneg_float, positive_int, setting
from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.diffusion.sampler import BACKENDS
from terdit.errors import TerditError
from terdit.io import atomic_write


@dataclass(kw_only=True)
class SamplingSettings:
    """The settings `terdit sample` and `terdit sample-npz` share, each default written once here (the commands
    add their own: guidance scale, output, counts)."""

    run: str = setting(help="run folder, deploy or pretrained folder, or Hub id")
    cfg_channels: int | None = setting(None, "guide only the first N channels (3 = the public code's quirk; "
                                       "default all)", type=positive_int)
    steps: int = setting(250, "sampling steps", type=int)
    sampler: str = setting("ddpm", choices=["ddpm", "ddim"])
    eta: float = setting(0.0, "DDIM eta", type=nonneg_float)
    seed: int = setting(0, type=int)
    ema: bool = setting(True, "use the raw weights, not the EMA")
    # not part of the samples' settings: every backend gives the same samples
    backend: str = setting("auto", "sampling loop: auto (a CUDA graph on CUDA, else eager), eager or cuda-graph",
                           choices=BACKENDS)
    device: str | None = device_setting()
    dtype: str | None = dtype_setting()


def check_sampling_args(num_classes: int, labels: Sequence[int], cfg_scale: float, steps: int,
                        guide_channels: int | None = None, in_channels: int | None = None) -> None:
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise TerditError(f"--classes {bad[0]} is outside [0, {num_classes})")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise TerditError(f"--cfg must be a finite number >= 0, got {cfg_scale}")
    if guide_channels is not None and in_channels is not None and not 1 <= guide_channels <= in_channels:
        raise TerditError(f"--cfg-channels {guide_channels}: the model has {in_channels} channel(s)")
    if not 1 <= steps <= 1000:
        raise TerditError(f"--steps must be in [1, 1000], got {steps}")


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    cfg_scale: float = 4.0,
    steps: int = 250,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    guide_channels: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Samples in the model's space (pixels or latents), shape (N, C, H, W), float32.

    Initial and per-step noise come from one CPU generator seeded with `seed`, so results do not
    depend on the device's RNG. `backend`: "auto" (cuda-graph on CUDA, else eager), "eager" or "cuda-graph"
    (see terdit.diffusion.sampler); all give the same samples.
    """
    cfg = model.config
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    check_sampling_args(cfg.num_classes, labels_t.tolist(), cfg_scale, steps, guide_channels, cfg.in_channels)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    shape = (len(labels_t), cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = torch.randn(shape, generator=gen).to(device, dtype or torch.float32)
    diffusion = GaussianDiffusion.create(steps, learn_sigma=cfg.learn_sigma)
    fn = guided_model_fn(model, labels_t.to(device), cfg_scale, cfg.num_classes, guide_channels)
    was_training = model.training
    model.eval()
    try:
        out = diffusion.sample(fn, noise, sampler=sampler, eta=eta, generator=gen, progress=progress,
                               backend=backend)
    finally:
        model.train(was_training)
    return out.float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C) with ADM/DiT's rounding: clamp(127.5 x + 128)."""
    x = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, `nrow` per row."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A PNG grid of images in [-1, 1]; tiny images (digits) are enlarged so they can be seen."""
    arr = to_uint8(images)
    nrow = nrow or min(len(arr), 8)
    upscale = max(1, 64 // arr.shape[1])
    grid = make_grid(arr, nrow, upscale=upscale)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_npz(images: torch.Tensor, labels: Sequence[int], path: str | Path) -> Path:
    """ADM's layout: `arr_0` uint8 (N, H, W, C), plus `labels`."""
    arr = to_uint8(images)
    lab = np.asarray(labels, dtype=np.int64)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, arr_0=arr, labels=lab)

    return atomic_write(path, write)


def save_samples(images: torch.Tensor, labels: Sequence[int], out: str | Path, nrow: int | None = None) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".npz":
        return save_npz(images, labels, out)
    if out.suffix.lower() == ".png":
        return save_grid(images, out, nrow)
    raise TerditError(f"--out {out}: must end in .png (grid) or .npz (ADM arrays)")


def generate(
    model: nn.Module,
    labels: Sequence[int],
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> torch.Tensor:
    """Images in [-1, 1] for `labels`: sample, then decode (VAE models) if a decoder is given.

    `kwargs` are sample_latents' (cfg_scale, steps, sampler, eta, seed, guide_channels, device, dtype,
    progress)."""
    x = sample_latents(model, labels, backend=backend, **kwargs)
    return decode(x) if decode is not None else x
