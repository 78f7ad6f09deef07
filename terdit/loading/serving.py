"""Open anything that can be sampled from (a training run, later a deploy folder) in one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

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


def load_for_sampling(
    path: str | Path,
    ema: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    vae: str | None = None,
    policy: str = "memory",
) -> tuple[nn.Module, Callable | None, Callable[[Sequence[int]], list[int]]]:
    """(model, decode, map_labels) for a run folder, a deploy / release / pretrained / pipeline folder or a
    Hub id.

    `decode` is the VAE decoder (`vae` overrides the one the run was trained with; None for pixel models);
    `map_labels` turns user-facing class ids into the model's own indices (released TerDiT checkpoints
    index classes in lexicographic order of "0".."999"; ours need no mapping).
    """
    from terdit.deploy.labels import map_labels
    from terdit.models.terdit import TerDiT

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path_s = str(path)
    if Path(path_s).is_dir() and runlib.checkpoint_dirs(path_s):
        model = runlib.load_run_model(runlib.require_run(path_s), ema=ema, device=str(dev)).to(dt)
        decode = vae_decoder(vae, dev) if vae else run_decoder(path_s, dev)
    else:
        if not Path(path_s).exists() and (path_s.startswith((".", "/", "~")) or path_s.count("/") != 1):
            raise TerditError(f"run {path_s} does not exist")
        model = TerDiT.from_pretrained(path_s, ema=ema, device=dev, dtype=dt, policy=policy)
        decode = vae_decoder(vae, dev)
        if decode is None and model.config.in_channels == 4:
            raise TerditError(f"{path_s}: a latent-space model; pass --vae (e.g. stabilityai/sd-vae-ft-ema)")

    def mapped(labels: Sequence[int]) -> list[int]:
        return map_labels(model, torch.as_tensor(list(labels), dtype=torch.long)).tolist()

    return model, decode, mapped
