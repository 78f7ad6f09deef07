"""Classifier-free guidance: conditional and unconditional passes batched into one forward."""

from __future__ import annotations

import torch
from torch import nn

from terdit.diffusion.gaussian import ModelFn


def guided_model_fn(
    model: nn.Module,
    labels: torch.Tensor,
    scale: float,
    null_class: int,
    guide_channels: int | None = None,
) -> ModelFn:
    """A model function of (x, t) for labels `labels` with guidance scale `scale`.

    eps = uncond + scale * (cond - uncond) on the first `guide_channels` output channels (default: all
    eps channels, i.e. the input channels); the rest (variance) comes from the conditional pass.
    guide_channels=3 reproduces the public DiT / Large-DiT / TerDiT quirk of guiding 3 of 4 latent
    channels. scale == 1 skips the unconditional pass.
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, labels, return_dict=False)[0]
    null = torch.full_like(labels, null_class)
    y = torch.cat([labels, null])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), y, return_dict=False)[0]
        cond, uncond = out.chunk(2)
        k = x.shape[1] if guide_channels is None else guide_channels
        guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return fn
