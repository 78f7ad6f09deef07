"""Post-training quantization (PTQ) of a full-precision model's block linears, the paper's baseline.

Two weight-only, round-to-nearest quantizers, per tensor or per output channel (row):

- "ternary": codes from `ternarize` (the same absmean threshold as TerDiT's QAT). The scale is not
  learned here, so it is set to the value that minimises the L2 error for those codes,
  alpha* = <W, C> / <C, C> = mean |W| over the nonzero codes. gamma (mean |W| over all weights) is only the
  threshold: using it as the scale would shrink every weight that survives rounding.
- "2bit": 4-level uniform asymmetric min-max: scale = (max - min) / 3,
  q = clamp(round((W - min) / scale), 0, 3), W~ = q * scale + min. Both extremes are exactly representable.

Quantized weights are returned dequantized ("fake quantized") in the original dtype, so the result runs
through the unchanged full-precision model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from terdit.errors import TerditError
from terdit.quant.ternary import ternarize

METHODS: tuple[str, ...] = ("ternary", "2bit")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel")
BLOCK_LINEARS: tuple[str, ...] = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.1",
)


def _reduce_dims(granularity: str) -> dict:
    if granularity == "tensor":
        return {}
    if granularity == "channel":
        return {"dim": -1, "keepdim": True}
    raise TerditError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


@torch.no_grad()
def quantize_ternary(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1}, L2-optimal scale alpha) with W ~ alpha * codes; alpha is [1] or [out, 1]."""
    _reduce_dims(granularity)
    w = weight.float()
    codes, _ = ternarize(w, "tensor" if granularity == "tensor" else "row")
    if granularity == "tensor":
        num, den = (w * codes).sum().reshape(1), codes.abs().sum().reshape(1)
    else:
        num, den = (w * codes).sum(-1, keepdim=True), codes.abs().sum(-1, keepdim=True)
    alpha = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
    return codes, alpha


@torch.no_grad()
def quantize_uniform(
    weight: torch.Tensor, bits: int = 2, granularity: str = "tensor"
) -> tuple[torch.Tensor, ...]:
    """(levels q in 0..2^bits-1, scale, offset) of asymmetric min-max quantization: W ~ q * scale + offset."""
    dims = _reduce_dims(granularity)
    w = weight.float()
    lo = w.amin(**dims) if dims else w.min().reshape(1)
    hi = w.amax(**dims) if dims else w.max().reshape(1)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((w - lo) / safe).round().clamp(0, levels)
    return q, scale, lo


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, method: str, granularity: str = "tensor") -> torch.Tensor:
    """The dequantized weight, in `weight`'s dtype."""
    if method == "ternary":
        codes, alpha = quantize_ternary(weight, granularity)
        out = alpha * codes
    elif method == "2bit":
        q, scale, lo = quantize_uniform(weight, 2, granularity)
        out = q * scale + lo
    else:
        raise TerditError(f"method must be one of {METHODS}, got {method!r}")
    return out.to(weight.dtype)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # ||W~ - W|| / ||W||


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The block linears TerDiT makes ternary (attention, FFN, adaLN), as plain nn.Linear."""
    out = {}
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.split(".", 2)[-1] in BLOCK_LINEARS:
            if type(module) is not nn.Linear:
                raise TerditError(
                    f"{name}: PTQ needs a full-precision model, found {type(module).__name__} "
                    f"(this model is already quantized)"
                )
            out[name] = module
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, granularity: str = "tensor") -> list[LayerReport]:
    """Fake-quantize the block linears of a full-precision TerDiT in place; returns per-layer errors."""
    layers = quantizable_linears(model)
    if not layers:
        raise TerditError("no block linears to quantize")
    reports = []
    for name, lin in layers.items():
        w = lin.weight
        wq = fake_quantize(w, method, granularity)
        norm = float(w.float().norm())
        err = float((wq.float() - w.float()).norm()) / norm if norm > 0 else 0.0
        w.copy_(wq)
        reports.append(LayerReport(name, tuple(w.shape), err))
    return reports
