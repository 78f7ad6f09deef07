"""What a feature extractor is, and running one over a whole image batch with a progress bar."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
from tqdm import tqdm

from terdit.eval.reference import NpzImages


class FeatureExtractor(Protocol):
    """Maps a uint8 NHWC image batch to {"pool": (N, D), "logits": (N, K)} and, when has_spatial,
    "spatial": (N, S). check_images raises TerditError naming `source` for shapes it cannot take."""

    name: str
    has_spatial: bool

    def check_images(self, shape: tuple[int, ...], source: str) -> None: ...

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def extract_features(extractor: FeatureExtractor, images: NpzImages | np.ndarray, batch_size: int = 64,
                     desc: str = "features", progress: bool = True) -> dict[str, np.ndarray]:
    """Run `extractor` over all images in file order (ADM reads batches of 64) and concatenate the outputs."""
    source = str(images.path) if isinstance(images, NpzImages) else "images"
    extractor.check_images(tuple(images.shape), source)
    batches: Iterable[np.ndarray]
    if isinstance(images, NpzImages):
        batches = images.batches(batch_size)
    else:
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    total = -(-len(images) // batch_size)
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False):
        for key, value in extractor(batch).items():
            outputs.setdefault(key, []).append(value)
    return {key: np.concatenate(parts, axis=0) for key, parts in outputs.items()}
