"""Class-index permutations of released checkpoints.

The released TerDiT checkpoints were trained on image folders named "0".."999" read in sorted order, so
their class index for ImageNet id i is the rank of str(i) in lexicographic order (e.g. 89 -> 878,
475 -> 418). `map_labels` turns ImageNet ids into the indices a model expects; sampling calls it so that
`--classes 207` means ImageNet class 207 for every model. The null (CFG) class is left unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """(permutation name or None, num_classes) of a model from `load_deployed` (other models: none), a
    deploy config.json dict or its "deploy" section, or None."""
    if source is None:
        return None, 1000
    if isinstance(source, torch.nn.Module):
        info = getattr(source, "deploy_info", None) or {}
        config = getattr(source, "config", None)
        return info.get("label_permutation"), int(getattr(config, "num_classes", 1000))
    if isinstance(source, Mapping):
        deploy = source.get("deploy", source)
        return deploy.get("label_permutation"), int(source.get("num_classes", 1000))
    raise TypeError(f"map_labels: expected a model, a config dict or None, got {type(source).__name__}")


def map_labels(source: Any, labels: torch.Tensor) -> torch.Tensor:
    """ImageNet ids -> the model's class indices. `source`: a model from `load_deployed` (or any model:
    no permutation), a deploy config.json dict, or None. Labels equal to num_classes (null) pass through."""
    perm_name, n = label_permutation_of(source)
    if perm_name is None:
        return labels
    if perm_name != "lexicographic":
        raise TerditError(f"unknown label permutation {perm_name!r}")
    if bool(((labels < 0) | (labels > n)).any()):
        raise TerditError(f"class ids must be in 0..{n - 1} (or {n} for the null class)")
    table = torch.cat([lexicographic_permutation(n), torch.tensor([n])]).to(labels.device)
    return table[labels.long()].to(labels.dtype)
