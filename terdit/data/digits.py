"""The 8x8 handwritten digits that ship inside scikit-learn: the default, offline training data."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from terdit.data.base import TrainingData
from terdit.errors import TerditError

DIGITS_LEVELS = 16  # sklearn's digits take integer values 0..16


def load_digits_arrays(split: str = "all", test_fraction: float = 0.2, seed: int = 0):
    """(images in [-1, 1] of shape (N, 1, 8, 8) float32, labels int64); "train"/"test" is a fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / DIGITS_LEVELS * 2 - 1)[:, None]
    y = d.target.astype(np.int64)
    if split == "all":
        return x, y
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    idx = {"test": order[:n_test], "train": order[n_test:]}.get(split)
    if idx is None:
        raise TerditError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    return x[np.sort(idx)], y[np.sort(idx)]


def to_digit_levels(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] back to sklearn's 0..16 pixel scale (for classifiers trained on raw digits)."""
    return ((x.clamp(-1, 1) + 1) / 2 * DIGITS_LEVELS).float()


class TensorPairs(Dataset):
    """In-memory (x, y) tensors addressed by virtual index; no augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, v: int):
        i = v % len(self.y)
        return self.x[i], int(self.y[i])


def digits_training_data(split: str = "all") -> TrainingData:
    x, y = load_digits_arrays(split)
    return TrainingData(
        dataset=TensorPairs(torch.from_numpy(x), torch.from_numpy(y)),
        num_classes=10,
        sample_shape=(1, 8, 8),
        description=f"sklearn digits ({split}, {len(y)} images, 8x8x1 pixels)",
    )


def digits_classifier():
    """Logistic regression on the 64 raw pixels (0..16) of all real digits: the judge of sample classes."""
    from sklearn.linear_model import LogisticRegression

    d = _sklearn_digits()
    return LogisticRegression(max_iter=5000).fit(d.data, d.target)


def _sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def class_accuracy(images: torch.Tensor, labels, classifier=None) -> float:
    """Fraction of generated digits (model space, (N, 1, 8, 8)) that the classifier assigns their label."""
    clf = classifier or digits_classifier()
    pred = clf.predict(to_digit_levels(images).reshape(len(images), -1).cpu().numpy())
    return float((pred == np.asarray(labels)).mean())
