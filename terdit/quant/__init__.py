"""Quantizers and quantized layers. The ternary math lives in `terdit.quant.ternary`."""

from terdit.quant.layers import LINEAR_KINDS, make_linear
from terdit.quant.ternary import TernaryLinear, absmean, initial_alpha, ternarize, ternary_weight

__all__ = [
    "LINEAR_KINDS",
    "TernaryLinear",
    "absmean",
    "initial_alpha",
    "make_linear",
    "ternarize",
    "ternary_weight",
]
