"""Training data: the embedded digits, image folders through a VAE, and pre-extracted latents.

Every source is a `TrainingData`: a dataset of (x, label) addressed by virtual index, plus how to
reach the diffusion model's space (`encode`) and come back (`decode`).
"""

from __future__ import annotations

from pathlib import Path

from terdit.data.base import TrainingData
from terdit.data.digits import digits_training_data, load_digits_arrays, to_digit_levels
from terdit.errors import TerditError


def open_training_data(data: str | None = None, **options) -> TrainingData:
    """`None` or "digits": the embedded digits; a path: an image folder (+ VAE) or a latent directory.

    `options` go to `terdit.data.sources.open_image_data` (resolution, vae, seed, flip, vae_sample,
    class_map, num_workers, strict)."""
    if data in (None, "digits"):
        return digits_training_data()
    if not Path(data).exists():
        raise TerditError(f"--data {data}: no such file or directory")
    try:
        from terdit.data.sources import open_image_data
    except ImportError as e:  # pragma: no cover - the image pipeline is part of the package
        raise TerditError(f"--data {data}: image and latent data need terdit.data.sources ({e})") from e
    return open_image_data(data, **options)


__all__ = [
    "TrainingData",
    "digits_training_data",
    "load_digits_arrays",
    "open_training_data",
    "to_digit_levels",
]
