"""Class-index permutations of released checkpoints.

The released TerDiT checkpoints were trained on image folders named "0".."999" read in sorted order, so
their class index for ImageNet id i is the rank of str(i) in lexicographic order (e.g. 89 -> 878,
475 -> 418). The permutation belongs to the model: a loaded release has `config.label_permutation`, and its
forward (TerDiT.model_labels -> `permute_labels`) maps ImageNet ids itself, so `--classes 207`, terdit's
pipeline and diffusers' DiTPipeline all mean ImageNet class 207 for every model. `map_labels` does the same
for a deploy config read without a model. The null (CFG) class is left unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from terdit.errors import TerditError


def lexicographic_permutation(num_classes: int) -> torch.Tensor:
    """perm[i] = rank of str(i) among str(0..num_classes-1) in sorted string order."""
    order = sorted(range(num_classes), key=str)
    perm = torch.empty(num_classes, dtype=torch.long)
    perm[torch.tensor(order)] = torch.arange(num_classes)
    return perm


def label_permutation_of(source: Any) -> tuple[str | None, int]:
    """(permutation name or None, num_classes) of a deploy config.json dict or its "deploy" section; a model
    (which permutes its labels in forward) or None has none."""
    if source is None or isinstance(source, torch.nn.Module):
        return None, 1000
    if isinstance(source, Mapping):
        deploy = source.get("deploy", source)
        return deploy.get("label_permutation"), int(source.get("num_classes", 1000))
    raise TypeError(f"map_labels: expected a model, a config dict or None, got {type(source).__name__}")


def map_labels(source: Any, labels: torch.Tensor) -> torch.Tensor:
    """ImageNet ids -> the class indices of a deploy config.json dict's model. For a model (or None) this is
    the identity: a TerDiT applies its own permutation in forward. Labels equal to num_classes pass through."""
    perm_name, n = label_permutation_of(source)
    if perm_name is None:
        return labels
    return permute_labels(perm_name, n, labels)


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
