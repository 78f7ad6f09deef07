"""Quantizers and quantized layers. The ternary math lives in `terdit.quant.ternary`."""

from terdit.quant.layers import LINEAR_KINDS, make_linear
from terdit.quant.packing import FORMATS, pack_codes, unpack_codes
from terdit.quant.ptq import fake_quantize, quantize_model
from terdit.quant.ternary import TernaryLinear, absmean, initial_alpha, ternarize, ternary_weight

__all__ = [
    "FORMATS",
    "LINEAR_KINDS",
    "TernaryLinear",
    "absmean",
    "fake_quantize",
    "initial_alpha",
    "make_linear",
    "pack_codes",
    "quantize_model",
    "ternarize",
    "ternary_weight",
    "unpack_codes",
]
