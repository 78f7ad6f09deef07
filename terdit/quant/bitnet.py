"""BitNet b1.58's BitLinear, the paper's QAT baseline adapted to DiT (TerDiT Sec. IV-B).

y = (W_t x_q) * gamma * s_x / 127: the input is RMS-normalised, quantised to 8 bits per token by absmax,
the weight ternarised by absmean (the same `ternarize` as TerDiT) with gamma multiplied back, as BitNet
does (no learnable alpha). Both quantisers pass gradients straight through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from terdit.quant.ternary import _STE, ACT_LEVELS, quantize_activations, ternarize

__all__ = ["ACT_LEVELS", "BitLinear", "bitnet_weight", "quantize_activations"]


def bitnet_weight(weight: torch.Tensor) -> torch.Tensor:
    """gamma * ternary codes, straight-through to the latent weight."""
    codes, gamma = ternarize(weight.detach())
    return _STE.apply(weight, codes * gamma)


class BitLinear(nn.Linear):
    """RMSNorm (learnable weight, as LLaMA's) -> 8-bit activations -> ternary weights -> float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        h = quantize_activations(h.to(x.dtype))
        w = bitnet_weight(self.weight).to(x.dtype)
        return F.linear(h, w, None if self.bias is None else self.bias.to(x.dtype))
