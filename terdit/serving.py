"""Open anything that can be sampled from (a training run, later a deploy folder) in one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from terdit import run as runlib
from terdit.errors import TerditError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TerditError(f"--device {device}: CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise TerditError(f"--device {device}: {e}") from e


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TerditError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _identity_labels(labels: Sequence[int]) -> list[int]:
    return list(labels)


def run_decoder(run: str | Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The VAE decoder a run was trained with (None for pixel-space runs such as digits)."""
    vae = runlib.load_train_args(run).get("vae")
    if not vae:
        return None
    from terdit.data.vae import load_vae

    return load_vae(vae, device=device).decode


def load_for_sampling(
    path: str | Path, ema: bool = True, device: str | None = None, dtype: str | None = None
) -> tuple[nn.Module, Callable | None, Callable[[Sequence[int]], list[int]]]:
    """(model, decode, map_labels) for a run folder.

    `map_labels` turns user-facing class ids into the model's own indices (the identity for our runs).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(path)
    model = runlib.load_run_model(path, ema=ema, device=str(dev)).to(dt)
    return model, run_decoder(path, dev), _identity_labels
