"""Int8 storage for the full-precision matrices of a deployed model (embedders, final adaLN).

A 600M TerDiT has 5.9M parameters outside its ternary layers. In bf16 they take 11 MiB, which caps the
packed checkpoint at 15.0x (2bit) and 18.4x (base3) smaller than fp32. Storing the large ones as int8
with one absmax scale per row (q = round(127 * w / max|w_row|)) halves that, at a bounded error:
|w - q * scale| <= scale / 2 per element, about 0.3% of a row's largest weight. Opt-in and lossy, unlike
the ternary codes.
"""

from __future__ import annotations

import torch

from terdit.errors import TerditError

SCALE_SUFFIX = "_scale"  # "<tensor>_scale": the per-row scales stored next to an int8 tensor
MIN_NUMEL = 65536  # smaller matrices (patch embed, output linear) stay in the float storage dtype


def int8_eligible(value: torch.Tensor) -> bool:
    """A 2-D float tensor of at least MIN_NUMEL elements (read at call time), where int8 rows pay off."""
    return value.is_floating_point() and value.dim() == 2 and value.numel() >= MIN_NUMEL


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [rows, cols] -> (int8 [rows, cols], float32 scale [rows]) with w ~= q * scale[:, None]."""
    if w.dim() != 2 or not w.is_floating_point():
        raise TerditError(f"int8 rows need a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(wf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """(int8 [rows, cols], scale [rows]) -> float32 [rows, cols]; checks dtypes and shapes."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TerditError(f"{name}: int8 rows must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if scale.dim() != 1 or scale.shape[0] != q.shape[0] or not scale.is_floating_point():
        raise TerditError(
            f"{name}{SCALE_SUFFIX}: expected float scales of shape ({q.shape[0]},), got {scale.dtype} "
            f"{tuple(scale.shape)}"
        )
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise TerditError(f"{name}{SCALE_SUFFIX}: scales must be finite and >= 0")
    return q.float() * scale.float()[:, None]
