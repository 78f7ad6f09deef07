"""Inference linear layer whose ternary weight stays packed in memory.

Two policies trade memory for time:

- "memory": the layer keeps only its packed bytes (2 or 1.6 bits per weight). Each forward unpacks the
  weight into a scratch buffer shared by all layers of the model (`Scratch`), multiplies and moves on,
  so at most one layer's unpacked weight exists at any time; layers above SCRATCH_LIMIT_BYTES are done
  in blocks of output rows, so the scratch never exceeds that. Cost: one gather pass over the weight
  per call (about 7% of the matmul for a 600M FFN layer at 1024 tokens on CPU).
- "speed": the first forward unpacks once into a cached tensor in the compute dtype, and later calls
  are a plain matmul. Resident memory is then that of a full-precision model in the compute dtype.

Inference only: weights have no gradient. If autograd is recording with an input that needs grad, the
memory policy unpacks into a fresh tensor instead of the shared scratch (autograd would keep a reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from terdit.deploy.kernels import find_kernel
from terdit.quant.packing import DIGITS, code_lut, rows_shape, unpack_rows, unpack_rows_into

POLICIES: tuple[str, ...] = ("memory", "speed")
# Memory policy: a layer whose unpacked weight is larger than this is unpacked and multiplied in blocks of
# output rows, so the shared scratch stays small (4.2B: 32 MiB instead of 96 MiB for an FFN weight).
SCRATCH_LIMIT_BYTES = 32 * 2**20


class Scratch:
    """Reusable unpack buffers, one per (device, dtype), grown to the largest request."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # free the smaller one before allocating
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.get(numel, dtype, device)

    def clear(self) -> None:
        self._bufs.clear()


class PackedLinear(nn.Module):
    """y = x @ (alpha * codes).T + bias, codes packed in the rows layout of `fmt` (terdit.quant.packing)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        fmt: str,
        policy: str = "memory",
        scratch: Scratch | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.in_features, self.out_features, self.fmt, self.policy = in_features, out_features, fmt, policy
        self.register_buffer(
            "packed",
            torch.empty(rows_shape(fmt, out_features, in_features), dtype=torch.uint8, device=device),
        )
        self.register_buffer("alphas", torch.empty(1, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.scratch = scratch if scratch is not None else Scratch()
        self.scratch_limit = SCRATCH_LIMIT_BYTES
        self._cached: torch.Tensor | None = None

    @property
    def unpacked_numel(self) -> int:
        """Elements of the unpacked buffer, including the padding columns of the last byte of each row."""
        return self.packed.shape[0] * self.packed.shape[1] * DIGITS[self.fmt]

    def codes(self) -> torch.Tensor:
        """The int8 ternary codes [out, in] (validating path, for export and tests)."""
        return unpack_rows(self.packed, self.fmt, self.in_features, name="PackedLinear")

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._cached = None

    def _row_block(self, dtype: torch.dtype) -> int:
        """Output rows unpacked at once under the memory policy (all of them unless over scratch_limit)."""
        row_bytes = self.packed.shape[1] * DIGITS[self.fmt] * dtype.itemsize
        return max(1, min(self.out_features, self.scratch_limit // row_bytes))

    def _unpack(self, out: torch.Tensor, dtype: torch.dtype, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Unpack output rows r0:r1 into the flat buffer `out`; returns the [rows, in] view."""
        r1 = self.out_features if r1 is None else r1
        packed = self.packed[r0:r1]
        lut = code_lut(self.fmt, self.alphas, dtype)
        index = None
        if self.policy == "memory":
            index = self.scratch.get(packed.numel(), torch.int32, self.packed.device)
        out = out[: packed.numel() * DIGITS[self.fmt]]
        unpack_rows_into(packed, lut, out, index)
        return out.view(r1 - r0, -1)[:, : self.in_features]

    def weight_for(self, dtype: torch.dtype, need_fresh: bool = False) -> torch.Tensor:
        """alpha * codes as a [out, in] tensor in `dtype` (possibly a strided view), per the policy."""
        if self.policy == "speed":
            cached = self._cached
            if cached is None or cached.dtype != dtype or cached.device != self.packed.device:
                buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
                self._cached = cached = self._unpack(buf, dtype)
            return cached
        if need_fresh:
            buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
        else:
            buf = self.scratch.get(self.unpacked_numel, dtype, self.packed.device)
        return self._unpack(buf, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = find_kernel(self.fmt, x)
        if kernel is not None:
            y = kernel(self, x)
            if y is not None:  # None: the kernel declined this call (dtype, autograd, ...)
                return y
        need_fresh = torch.is_grad_enabled() and x.requires_grad
        b = None if self.bias is None else self.bias.to(x.dtype)
        block = self._row_block(x.dtype)
        if self.policy == "speed" or need_fresh or block >= self.out_features:
            return F.linear(x, self.weight_for(x.dtype, need_fresh), b)
        # memory policy, large layer: unpack and multiply one block of output rows at a time
        buf = self.scratch.get(block * self.packed.shape[1] * DIGITS[self.fmt], x.dtype, self.packed.device)
        x2 = x.reshape(-1, self.in_features)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0 in range(0, self.out_features, block):
            r1 = min(self.out_features, r0 + block)
            w = self._unpack(buf, x.dtype, r0, r1)
            y[:, r0:r1] = F.linear(x2, w, None if b is None else b[r0:r1])
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._cached = None  # moved or cast: the cache is rebuilt on the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"format={self.fmt}, policy={self.policy}"
        )


def set_policy(model: nn.Module, policy: str) -> None:
    """Switch every PackedLinear of `model` to `policy` (drops cached weights when leaving "speed")."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.set_policy(policy)


def warm_cache(model: nn.Module, dtype: torch.dtype) -> None:
    """Unpack now, so the first forward of a "speed" model does not pay for it."""
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.policy == "speed":
            m.weight_for(dtype)


def reserve_scratch(model: nn.Module, dtype: torch.dtype) -> None:
    """Size the shared scratch for the largest block once, instead of growing it during the first forward."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.policy == "memory"]
    if not layers:
        return
    scratch = layers[0].scratch
    device = layers[0].packed.device
    blocks = [min(m.out_features, m._row_block(dtype)) * m.packed.shape[1] for m in layers]
    scratch.reserve(max(n * DIGITS[m.fmt] for n, m in zip(blocks, layers)), dtype, device)
    scratch.reserve(max(blocks), torch.int32, device)
