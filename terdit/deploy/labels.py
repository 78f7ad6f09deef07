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
from typing import Any

import torch

from terdit.models.labels import lexicographic_permutation, permute_labels

__all__ = ["label_permutation_of", "lexicographic_permutation", "map_labels", "permute_labels"]


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
