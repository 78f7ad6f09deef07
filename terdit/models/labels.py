"""Class orders of released checkpoints: ImageNet ids -> a model's own class indices.

The released TerDiT checkpoints were trained on image folders named "0".."999" read in sorted order, so
their class index for ImageNet id i is the rank of str(i) in lexicographic order (e.g. 89 -> 878,
475 -> 418). The permutation belongs to the model (TerDiT.model_labels applies it in forward), so it lives
in the model layer; terdit.deploy.labels builds on it for configs read without a model.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from terdit.errors import TerditError


def lexicographic_permutation(num_classes: int) -> torch.Tensor:
    """perm[i] = rank of str(i) among str(0..num_classes-1) in sorted string order."""
    order = sorted(range(num_classes), key=str)
    perm = torch.empty(num_classes, dtype=torch.long)
    perm[torch.tensor(order)] = torch.arange(num_classes)
    return perm


def permute_labels(perm_name: str, n: int, labels: torch.Tensor) -> torch.Tensor:
    """ImageNet ids (0..n-1, or n for the null class) -> indices in the named class order."""
    if perm_name != "lexicographic":
        raise TerditError(f"unknown label permutation {perm_name!r}")
    # inside a CUDA-graph capture (the sampler's cuda-graph backend) nothing may wait for the GPU or copy from
    # pageable memory: the check is skipped there (the sampler checked the ids) and the table is cached on the device
    capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and bool(((labels < 0) | (labels > n)).any()):
        raise TerditError(f"class ids must be in 0..{n - 1} (or {n} for the null class)")
    return _label_table(n, labels.device)[labels.long()].to(labels.dtype)


@lru_cache(maxsize=8)
def _label_table(n: int, device: torch.device) -> torch.Tensor:
    return torch.cat([lexicographic_permutation(n), torch.tensor([n])]).to(device)
