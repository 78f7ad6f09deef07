"""A digits classifier that stands in for Inception on the 8x8 sklearn digits, so FID / IS / precision /
recall of a CPU digits run are measured end to end offline (a "Fréchet classifier distance").

The MLP 64 -> 128 -> 64 -> 10 trains deterministically in about two seconds on a fixed split of
`sklearn.datasets.load_digits`, and is cached (safetensors) under $TERDIT_CACHE or ~/.cache/terdit in a file
named after a hash of its hyperparameters, so changing any of them retrains instead of reusing stale
weights. Features are the 64 penultimate pre-activations; logits feed the Inception Score (10 classes)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from terdit.data.digits import load_digits_arrays
from terdit.errors import TerditError
from terdit.io import load_tensors, save_tensors

CACHE_ENV = "TERDIT_CACHE"


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Everything that determines the trained weights; its hash names the cache file."""

    hidden: tuple[int, int] = (128, 64)
    steps: int = 300
    lr: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLUs. The features are the last hidden layer *before* its ReLU:
    units that are zero for every input would make the feature covariance singular."""

    def __init__(self, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden[0]), nn.ReLU(),
                                  nn.Linear(hidden[0], hidden[1]))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden[1], 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats, self.head(feats)


def digits_split(split: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits as model-space images (N, 1, 8, 8) in [-1, 1] and labels; the split training data uses."""
    return load_digits_arrays(split, test_fraction, seed)


def digits_uint8(split: str = "all") -> np.ndarray:
    """The digits as an ADM-style uint8 NHWC batch (N, 8, 8, 1): a reference batch for digits runs."""
    return digits_uint8_from(digits_split(split)[0])


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "terdit")


def train_digits_classifier(cfg: DigitsClassifierConfig = DigitsClassifierConfig()) -> DigitsMLP:
    """Full-batch AdamW on the training split, seeded, single-threaded so the result does not depend on the
    machine's thread count. Inputs are quantised through uint8 like every evaluated batch is."""
    x, y = digits_split("train", cfg.test_fraction, cfg.split_seed)
    x = _from_uint8(digits_uint8_from(x))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = DigitsMLP(cfg.hidden)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(cfg.steps):
            noisy = xt + 0.05 * torch.randn(xt.shape, generator=gen)  # mild noise: smoother feature space
            loss = nn.functional.cross_entropy(net(noisy)[1], yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def load_digits_classifier(cfg: DigitsClassifierConfig = DigitsClassifierConfig(),
                           cache: str | Path | None = None) -> DigitsMLP:
    """The cached classifier for `cfg`, trained and cached first if the file is missing or unreadable."""
    path = Path(cache or cache_dir()) / f"digits-classifier-{cfg.key()}.safetensors"
    net = DigitsMLP(cfg.hidden)
    if path.is_file():
        try:
            net.load_state_dict(load_tensors(path))
            return net.eval().requires_grad_(False)
        except (TerditError, RuntimeError):
            pass  # stale or damaged cache: retrain below and overwrite it
    net = train_digits_classifier(cfg)
    try:
        save_tensors(path, net.state_dict(), metadata={"config": json.dumps(asdict(cfg))})
    except OSError as e:  # a read-only cache only costs retraining next time
        warnings.warn(f"cannot cache the digits classifier at {path} ({e}); set ${CACHE_ENV}", stacklevel=2)
    return net


def digits_test_accuracy(net: DigitsMLP | None = None,
                         cfg: DigitsClassifierConfig = DigitsClassifierConfig()) -> float:
    """Accuracy on the held-out split the classifier never saw (after the same uint8 quantisation)."""
    net = net or load_digits_classifier(cfg)
    x, y = digits_split("test", cfg.test_fraction, cfg.split_seed)
    with torch.no_grad():
        _, logits = net(torch.from_numpy(_from_uint8(digits_uint8_from(x))))
    return float((logits.argmax(1).numpy() == y).mean())


def digits_uint8_from(x: np.ndarray) -> np.ndarray:
    """Model-space (N, 1, 8, 8) in [-1, 1] to uint8 NHWC, DiT's rounding: clamp(127.5 x + 128) truncated."""
    u = np.clip(127.5 * np.asarray(x, dtype=np.float32) + 128, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def _from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC (N, 8, 8, 1) to model space (N, 1, 8, 8) float32 in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy()


class DigitsExtractor:
    """Feature extractor for digits batches: uint8 NHWC (N, 8, 8, 1) in, 64 features and 10 logits out.
    Float (N, 1, 8, 8) arrays in [-1, 1] are accepted too (quantised through uint8 first)."""

    name = "digits"
    has_spatial = False

    def __init__(self, net: DigitsMLP | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = (net or load_digits_classifier()).to(self.device).eval()

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        if tuple(shape[1:]) != (8, 8, 1):
            raise TerditError(f"{source}: digits features need 8x8 one-channel images (N, 8, 8, 1), got "
                              f"{tuple(shape)}; use --features inception for RGB images")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        a = np.asarray(images)
        if a.dtype != np.uint8:
            a = digits_uint8_from(a)
        self.check_images(a.shape, "images")
        feats, logits = self.net(torch.from_numpy(_from_uint8(a)).to(self.device))
        return {"pool": feats.cpu().numpy(), "logits": logits.cpu().numpy()}
