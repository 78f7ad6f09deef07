"""BitNet b1.58's BitLinear, the paper's QAT baseline adapted to DiT (TerDiT Sec. IV-B).

y = (W_t x_q) * gamma * s_x / 127: the input is RMS-normalised, quantised to 8 bits per token by absmax,
the weight ternarised by absmean (the same `ternarize` as TerDiT) with gamma multiplied back, as BitNet
does (no learnable alpha). Both quantisers pass gradients straight through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from terdit.quant.ternary import ternarize

ACT_LEVELS = 127  # 8-bit signed absmax quantisation: [-127, 127] * scale


class _STE(torch.autograd.Function):
    """Forward: the quantised tensor; backward: identity to the float tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def quantize_activations(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantisation with a straight-through gradient."""
    scale = ACT_LEVELS / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    q = (x.detach() * scale).round().clamp(-ACT_LEVELS, ACT_LEVELS) / scale
    return _STE.apply(x, q)


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
