"""The CUDA-graph sampler under its old name: `sample_latents_fast` is `sample_latents(backend=...)`.

The CUDA-graph loop itself is a backend of terdit's one sampling loop (`terdit.diffusion.sampler`, backend
"cuda-graph", the default on CUDA); this module keeps the old entry point and its `mode` names
("graph" = backend "cuda-graph", "eager", "auto") for existing callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from terdit.diffusion.sampler import predraw_noise
from terdit.errors import TerditError
from terdit.sampling.generate import sample_latents

MODES: tuple[str, ...] = ("auto", "graph", "eager")
_BACKEND_OF_MODE = {"auto": "auto", "graph": "cuda-graph", "eager": "eager"}


def sample_latents_fast(model: nn.Module, labels: Sequence[int] | torch.Tensor, *args: Any, mode: str = "auto",
                        warmup: int = 1, **kwargs: Any) -> torch.Tensor:
    """`sample_latents` (same arguments, same samples: N, C, H, W fp32) with backend "cuda-graph" ("graph", CUDA
    only), "eager" or "auto" (graph on CUDA). `warmup` is kept for compatibility: the loop always warms up with
    one eager step before capture."""
    if mode not in MODES:
        raise TerditError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    del warmup
    return sample_latents(model, labels, *args, backend=_BACKEND_OF_MODE[mode], **kwargs)


__all__ = ["MODES", "predraw_noise", "sample_latents_fast"]
