"""One factory for the model's quantizable linear layers, so variants are switches, not copies."""

from __future__ import annotations

from typing import Literal

from torch import nn

from terdit.quant.ternary import AlphaInit, Granularity, TernaryLinear

LinearKind = Literal["fp", "ternary"]
LINEAR_KINDS: tuple[str, ...] = ("fp", "ternary")


def make_linear(
    kind: str,
    in_features: int,
    out_features: int,
    bias: bool,
    alpha_init: AlphaInit = "absmean",
    granularity: Granularity = "tensor",
) -> nn.Linear:
    """A linear layer of the requested kind: plain float ("fp") or QAT ternary ("ternary")."""
    if kind == "fp":
        return nn.Linear(in_features, out_features, bias=bias)
    if kind == "ternary":
        return TernaryLinear(in_features, out_features, bias, alpha_init=alpha_init, granularity=granularity)
    raise ValueError(f"unknown linear kind {kind!r}; choose from {LINEAR_KINDS}")
