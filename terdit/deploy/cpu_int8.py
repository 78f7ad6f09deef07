"""Integer compute for ternary layers on CPU: int8 activations x int8 ternary codes, int32 accumulation.

Ternary weights are exactly alpha * codes with codes in {-1, 0, 1}, i.e. int8 values, so the only rounding
on this path is that of the activations: per token (row), absmax to 8 bits as BitNet b1.58 does
(`terdit.quant.bitnet.quantize_activations`): scale = 127 / max|x|, q = round(x * scale). Then

    y = (q @ codes.T) * (alpha / scale) + bias

with the product accumulated exactly in int32 (`torch._int_mm`, which PyTorch runs on oneDNN's VNNI / AMX
int8 kernels) and alpha and the per-token scale folded into one multiply of the output. On CPUs with int8
dot products (AVX512-VNNI, AVX-VNNI, AMX-INT8) this multiplies 2-3x faster than the bf16 matmul.

Two PackedLinear policies use it (`register_kernel(fmt, "cpu", ..., policy)`):

- "int8": the codes are unpacked once into a resident int8 tensor (1 byte per weight).
- "int8-packed": the weight stays packed (2 or 1.6 bits per weight); each call unpacks it into a shared
  int8 scratch (one 4-byte gather per 4 codes for "2bit"), block of output rows by block, and multiplies.

A call the path does not take (autograd recording with an input that needs grad, a dtype other than
fp32 / bf16 / fp16, a CPU without int8 dot products, TERDIT_NO_KERNELS=1) returns None and the layer runs
the exact float path (unpack, F.linear). PackedAttention and PackedFeedForward quantize their input once
for the projections that share it (wq, wk, wv; w1, w3), and the FFN's w2 input is quantized straight
from the fp32 SwiGLU product, without a rounding to the compute dtype in between.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from terdit.quant.bitnet import ACT_LEVELS
from terdit.quant.packing import DIGITS, FORMATS, _digits, unpack_rows_into

if TYPE_CHECKING:
    from terdit.deploy.packed_linear import PackedLinear

INT8_POLICIES: tuple[str, ...] = ("int8", "int8-packed")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-5  # as terdit.quant.bitnet.quantize_activations
# CPU flags (Linux /proc/cpuinfo names) that give oneDNN fast int8 dot products.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions; without them oneDNN's int8 matmul is no faster
    than float (or falls back to its reference loop), so the integer path stays off.
    `TERDIT_CPU_INT8=0` / `=1` overrides the detection (benchmarks, tests, other platforms)."""
    forced = os.environ.get("TERDIT_CPU_INT8")
    if forced in ("0", "1"):
        return forced == "1"
    return torch.backends.mkldnn.is_available() and any(f in cpu_flags() for f in INT8_FLAGS)


class QuantizedTokens(NamedTuple):
    """Per-token int8 activations: x ~ q / scale, q [rows, K] int8, scale [rows, 1] fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]  # the input's leading shape (output = lead + (out_features,))
    dtype: torch.dtype  # the input's dtype, the output's by default


def quantize_tokens(x: torch.Tensor, overwrite: bool = False) -> QuantizedTokens:
    """Per-token absmax 8-bit quantization of `x` [..., K], BitNet b1.58's (no straight-through: inference).

    The same arithmetic as `terdit.quant.bitnet.quantize_activations` in fp32, in three passes over x and
    one fp32 temporary; `overwrite`: a contiguous fp32 `x` is itself used as the temporary (destroyed)."""
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    reuse = overwrite and x.dtype == torch.float32 and x.is_contiguous()
    xf = x.view(-1, k) if reuse else x.reshape(-1, k).to(torch.float32, copy=True)
    amax = torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True)
    scale = ACT_LEVELS / amax.clamp_(min=EPS)
    q = xf.mul_(scale).round_().clamp_(-ACT_LEVELS, ACT_LEVELS).to(torch.int8)
    return QuantizedTokens(q, scale, lead, x.dtype)


def dequantize_tokens(qt: QuantizedTokens) -> torch.Tensor:
    """q / scale in fp32, the float value the integer path computes with (tests, error measurements)."""
    return (qt.q.to(torch.float32) / qt.scale).view(*qt.lead, qt.q.shape[-1])


def accepts(layer: PackedLinear, x: torch.Tensor) -> bool:
    """Whether the integer path takes this call (else the layer's exact float path does)."""
    return (
        layer.policy in INT8_POLICIES
        and x.device.type == "cpu"
        and layer.packed.device.type == "cpu"
        and x.dtype in FLOAT_DTYPES
        and x.shape[-1] == layer.in_features
        and not (torch.is_grad_enabled() and x.requires_grad)
        and os.environ.get("TERDIT_NO_KERNELS") != "1"
        and has_int8_dot()
    )


@functools.cache
def _code_lut(fmt: str) -> torch.Tensor:
    """byte -> its codes as int8; for "2bit" the 4 codes of a byte as one int32 (a 4-byte gather)."""
    lut = (_digits(fmt) - 1).to(torch.int8).contiguous()
    return lut.view(torch.int32) if fmt == "2bit" else lut


def unpack_codes_into(packed: torch.Tensor, fmt: str, out: torch.Tensor, index: torch.Tensor | None = None):
    """The int8 codes of a [rows, bytes] block of packed rows into the flat int8 buffer `out`, returned as
    [rows, bytes * k] (padding codes included)."""
    n = packed.numel() * DIGITS[fmt]
    out = out[:n]
    target = out.view(torch.int32) if fmt == "2bit" else out  # 2bit: one int32 per byte
    unpack_rows_into(packed, _code_lut(fmt), target, index)
    return out.view(packed.shape[0], -1)


def _rows_linear(q: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor, bias, out: torch.Tensor) -> None:
    """out = (q @ codes.T) * factor + bias, accumulated in int32, scaled in fp32, written in out's dtype."""
    acc = torch._int_mm(q, codes.t())
    torch.mul(acc, factor, out=out)
    if bias is not None:
        out.add_(bias.to(out.dtype))


def int8_linear(layer: PackedLinear, qt: QuantizedTokens, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's output for quantized tokens, in `out_dtype` (default: the input's dtype)."""
    dtype = out_dtype or qt.dtype
    factor = layer.alphas.to(torch.float32) / qt.scale  # [rows, 1]: alpha / scale
    y = torch.empty(qt.q.shape[0], layer.out_features, dtype=dtype)
    k = layer.in_features
    if layer.policy == "int8":
        _rows_linear(qt.q, layer.int8_codes(), factor, layer.bias, y)
    else:  # int8-packed: unpack blocks of output rows into the shared scratch
        block = layer._row_block(torch.int8)
        index = layer.scratch.get(min(block, layer.out_features) * layer.packed.shape[1], torch.int32, "cpu")
        for r0 in range(0, layer.out_features, block):
            r1 = min(layer.out_features, r0 + block)
            packed = layer.packed[r0:r1]
            buf = layer.scratch.get(packed.numel() * DIGITS[layer.fmt], torch.int8, "cpu")
            codes = unpack_codes_into(packed, layer.fmt, buf, index)[:, :k]
            bias = None if layer.bias is None else layer.bias[r0:r1]
            _rows_linear(qt.q, codes, factor, bias, y[:, r0:r1])
    return y.view(*qt.lead, layer.out_features)


def int8_kernel(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor | None:
    """The `register_kernel` entry for the int8 policies: the integer path, or None (exact float path)."""
    if not accepts(layer, x):
        return None
    return int8_linear(layer, quantize_tokens(x))


def enable_cpu_int8(formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Register `int8_kernel` for the int8 policies on CPU (also where the CPU lacks int8 dot products:
    the kernel then declines every call, so the policies still work, on the exact path)."""
    from terdit.deploy.kernels import register_kernel  # here: terdit.deploy.kernels calls this on import

    for fmt in formats:
        for policy in INT8_POLICIES:
            register_kernel(fmt, "cpu", int8_kernel, policy)
    return list(formats)


__all__ = [
    "INT8_POLICIES",
    "QuantizedTokens",
    "accepts",
    "dequantize_tokens",
    "enable_cpu_int8",
    "has_int8_dot",
    "int8_kernel",
    "int8_linear",
    "quantize_tokens",
    "unpack_codes_into",
]
