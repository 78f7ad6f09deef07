"""What sampling needs of a model (the model, its VAE decoder, its class mapping), opened in one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from terdit.defaults import resolve_device, resolve_dtype
from terdit.errors import TerditError
from terdit.models import runs as runlib


def run_decoder(run: str | Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The VAE decoder a run was trained with (None for pixel-space runs such as digits)."""
    return vae_decoder(runlib.load_train_args(run).get("vae"), device)


def vae_decoder(spec: str | None, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not spec or spec == "none":
        return None
    from terdit.data.vae import load_vae

    return load_vae(spec, device=device).decode


class Sampleable(NamedTuple):
    """What sampling needs of a model; unpacks as (model, decode, map_labels)."""

    model: nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # the VAE decoder; None for pixel-space models
    map_labels: Callable[[Sequence[int]], list[int]]  # user-facing class ids -> the model's own indices


def load_for_sampling(
    path: str | Path,
    ema: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    vae: str | None = None,
    policy: str = "memory",
) -> Sampleable:
    """(model, decode, map_labels) for a run folder, a deploy / release / pretrained / pipeline folder or a
    Hub id, opened by `open_model`.

    `decode` is the VAE decoder (`vae` overrides the one the run was trained with; None for pixel models);
    `map_labels` turns user-facing class ids into the model's own indices (released TerDiT checkpoints
    index classes in lexicographic order of "0".."999"; ours need no mapping).
    """
    from terdit.deploy.labels import map_labels
    from terdit.loading.open import open_model
    from terdit.models.kinds import Kind, is_hub_id, kind_of

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not Path(path).exists() and not is_hub_id(path, owner=True):
        raise TerditError(f"run {path} does not exist")
    model = open_model(path, ema=ema, device=dev, dtype=dt, policy=policy)
    if kind_of(path) is Kind.RUN:
        decode = vae_decoder(vae, dev) if vae else run_decoder(path, dev)
    else:
        decode = vae_decoder(vae, dev)
        if decode is None and model.config.in_channels == 4:
            raise TerditError(f"{path}: a latent-space model; pass --vae (e.g. stabilityai/sd-vae-ft-ema)")

    def mapped(labels: Sequence[int]) -> list[int]:
        return map_labels(model, torch.as_tensor(list(labels), dtype=torch.long)).tolist()

    return Sampleable(model, decode, mapped)
