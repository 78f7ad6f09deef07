"""What the training loop gets from any data source, and the per-item random decisions they share.

Contract (every source follows it, so the loop never needs to know where data came from):

* ``dataset[v]`` takes a *virtual index* ``v = epoch * len(dataset) + i`` and returns ``(x, y)`` for item
  ``i = v % len(dataset)``; ``x`` is a float tensor, ``y`` an int class index.
* Random per-item decisions (horizontal flip, VAE posterior noise) are pure functions of ``(seed, v)``
  (see :func:`item_hash`), never of a global RNG, worker id or batch composition. So the image-folder
  path and the stored-latent path take the same decision for the same ``v``, a resumed run repeats the
  data of an uninterrupted one, and any number of DataLoader workers gives the same batches.
* ``encode`` (when not None) maps a batch of ``x`` on the training device into model space;
  ``decode`` maps model space back to images in [-1, 1] for sample grids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1


@dataclass
class TrainingData:
    """A training data source as the training loop sees it."""

    dataset: Dataset
    num_classes: int
    sample_shape: tuple[int, int, int]
    encode: Callable[[Tensor], Tensor] | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    description: str = ""


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def item_hash(seed: int, v: int, stream: int = 0) -> int:
    """A well-mixed 63-bit integer determined only by (seed, virtual index, stream).

    ``stream`` separates independent decisions about one item (0: flip, 1: VAE noise, ...)."""
    z = _splitmix64((seed & _MASK64) ^ 0x5DEECE66D)
    z = _splitmix64(z ^ (v & _MASK64))
    z = _splitmix64(z ^ (stream & _MASK64))
    return z >> 1


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (numpy's SeedSequence hashing), for draws keyed by
    (seed, step, rank, ...); shifted as a Python int, as numpy 1.x has no uint64 >> int."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]) >> 1


def flip_decision(seed: int, v: int) -> bool:
    """Whether virtual index ``v`` is horizontally flipped; the same answer for every data path."""
    return bool(item_hash(seed, v, 0) & 1)
