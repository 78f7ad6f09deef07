"""One factory for the model's quantizable linear layers, so variants are switches, not copies."""

from __future__ import annotations

from typing import Literal

from torch import nn

from terdit.quant.bitnet import BitLinear
from terdit.quant.ternary import AlphaInit, Granularity, TernaryLinear

LinearKind = Literal["fp", "ternary", "bitnet"]
LINEAR_KINDS: tuple[str, ...] = ("fp", "ternary", "bitnet")


def make_linear(
    kind: str,
    in_features: int,
    out_features: int,
    bias: bool,
    alpha_init: AlphaInit = "absmean",
    granularity: Granularity = "tensor",
) -> nn.Linear:
    """A linear layer of the requested kind: plain float ("fp"), TerDiT's QAT ternary ("ternary") or
    BitNet b1.58's BitLinear ("bitnet": input RMSNorm, 8-bit activations, ternary weights)."""
    if kind == "fp":
        return nn.Linear(in_features, out_features, bias=bias)
    if kind == "ternary":
        return TernaryLinear(in_features, out_features, bias, alpha_init=alpha_init, granularity=granularity)
    if kind == "bitnet":
        return BitLinear(in_features, out_features, bias)
    raise ValueError(f"unknown linear kind {kind!r}; choose from {LINEAR_KINDS}")
