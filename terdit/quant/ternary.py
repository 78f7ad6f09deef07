"""The ternary (1.58-bit) math, in one place.

TerDiT's quantizer (paper eq. 2-4): W~ = alpha * RoundClip(W / (gamma + eps), -1, 1) with
gamma = mean|W|. gamma only sets the rounding threshold; the output scale is the learned alpha.
Training uses a straight-through estimator; export, packing and PTQ reuse `ternarize`.

`act_bits = 8` (`terdit train --act-bits 8`, `set_act_bits`) also rounds each layer's input per token to
8 bits (BitNet b1.58's absmax quantizer, straight-through), the arithmetic of the CPU integer path
(terdit.deploy.cpu_int8), so a model trained that way is exact on it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
AlphaInit = Literal["absmean", "randn", "ones"]
Granularity = Literal["tensor", "row"]
ACT_LEVELS = 127  # 8-bit signed absmax quantisation: [-127, 127] * scale


# BitNet's 8-bit activation quantizer lives here, not in bitnet.py, so that TernaryLinear(act_bits=8) and
# BitLinear share it without the two modules importing each other.
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


def absmean(weight: torch.Tensor, granularity: Granularity = "tensor") -> torch.Tensor:
    """gamma: mean |W| over the whole matrix (shape [1]) or per output row (shape [out, 1])."""
    if granularity == "tensor":
        return weight.abs().mean().reshape(1)
    if granularity == "row":
        return weight.abs().mean(dim=-1, keepdim=True)
    raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")


def ternarize(
    weight: torch.Tensor, granularity: Granularity = "tensor", eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, +1} (same dtype as `weight`) and gamma.

    round() is round-half-to-even, as torch.round and the public code use.
    """
    gamma = absmean(weight, granularity)
    codes = (weight / (gamma + eps)).round().clamp_(-1, 1)
    return codes, gamma


class _TernarySTE(torch.autograd.Function):
    """Forward: ternary codes. Backward: the gradient passes unchanged to the latent weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, granularity: Granularity) -> torch.Tensor:  # type: ignore[override]
        return ternarize(weight, granularity)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def ternary_weight(weight: torch.Tensor, alpha: torch.Tensor, granularity: Granularity = "tensor"):
    """alpha * codes, differentiable: dL/dW = alpha * dL/dW~ (STE), dL/dalpha = sum(dL/dW~ * codes)."""
    codes = _TernarySTE.apply(weight, granularity)
    return alpha.to(codes.dtype) * codes


def initial_alpha(weight: torch.Tensor, how: AlphaInit, generator: torch.Generator | None = None) -> float:
    """Starting value of alpha.

    - "randn": N(0, 1), as the public TerDiT code (can start negative or tiny).
    - "absmean": gamma of the initial weight, so alpha * codes starts on the scale of the float
      initialisation. adaLN weights start at zero (adaLN-Zero) and have no gamma; there alpha
      starts at 1/sqrt(in_features), the scale of a default nn.Linear weight.
    - "ones": 1.0.
    """
    if how == "randn":
        return float(torch.randn(1, generator=generator))
    if how == "ones":
        return 1.0
    if how == "absmean":
        gamma = float(weight.detach().abs().mean())
        return gamma if gamma > 0 else 1.0 / math.sqrt(weight.shape[1])
    raise ValueError(f"alpha_init must be 'absmean', 'randn' or 'ones', got {how!r}")


class TernaryLinear(nn.Linear):
    """Weight-only ternary linear layer for quantization-aware training.

    Holds the latent full-precision `weight` [out, in], a learnable scalar `alphas` [1] (the public
    checkpoint name) and an optional full-precision bias. Activations stay in floating point.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        alpha_init: AlphaInit = "absmean",
        granularity: Granularity = "tensor",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.alpha_init = alpha_init
        self.granularity = granularity
        self.alphas = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.act_bits: int | None = None  # 8: BitNet-style 8-bit activations (see set_act_bits)

    @torch.no_grad()
    def reset_alpha(self, generator: torch.Generator | None = None) -> None:
        """Set alpha from the current weight; call after the weight's own initialisation."""
        if self.weight.is_meta:
            return
        self.alphas.fill_(initial_alpha(self.weight, self.alpha_init, generator))

    def quantized_weight(self) -> torch.Tensor:
        return ternary_weight(self.weight, self.alphas, self.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = quantize_activations(x)
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        acts = "" if self.act_bits is None else f", act_bits={self.act_bits}"
        return f"{super().extra_repr()}, ternary, alpha_init={self.alpha_init}, gamma={self.granularity}{acts}"


ACT_BITS: tuple[int, ...] = (8,)  # activation widths with a quantizer (and an integer path) behind them


def set_act_bits(model: nn.Module, bits: int | None) -> int:
    """Quantize the inputs of every TernaryLinear of `model` to `bits` (8) per token, or not (None).
    Returns the number of layers changed."""
    if bits is not None and bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS} or None, got {bits!r}")
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    for m in layers:
        m.act_bits = bits
    return len(layers)
