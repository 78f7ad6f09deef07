"""Inference linear layer whose ternary weight stays packed in memory.

Two policies trade memory for time:

- "memory": the layer keeps only its packed bytes (2 or 1.6 bits per weight). Each forward unpacks the
  weight into a scratch buffer shared by all layers of the model (`Scratch`), multiplies and moves on,
  so at most one layer's unpacked weight exists at any time; layers above SCRATCH_LIMIT_BYTES are done
  in blocks of output rows, so the scratch never exceeds that. Cost: one gather pass over the weight
  per call (about 7% of the matmul for a 600M FFN layer at 1024 tokens on CPU).
- "speed": the first forward unpacks once into a cached tensor in the compute dtype, and later calls
  are a plain matmul. Resident memory is then that of a full-precision model in the compute dtype.
- "int8" / "int8-packed" (CPU): integer compute with 8-bit activations, codes resident as int8 or kept
  packed (see terdit.deploy.cpu_int8); calls the integer path does not take run like "memory".

Inference only: weights have no gradient. If autograd is recording with an input that needs grad, the
memory policy unpacks into a fresh tensor instead of the shared scratch (autograd would keep a reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from terdit.deploy import cpu_int8
from terdit.deploy.kernels import find_kernel
from terdit.models.terdit import Attention, FeedForward
from terdit.quant.packing import DIGITS, code_lut, rows_shape, unpack_rows, unpack_rows_into

POLICIES: tuple[str, ...] = ("memory", "speed", *cpu_int8.INT8_POLICIES)
# Memory policy: a layer whose unpacked weight is larger than this is unpacked and multiplied in blocks of
# output rows, so the shared scratch stays small (4.2B: 16 MiB instead of 96 MiB for an FFN weight).
SCRATCH_LIMIT_BYTES = 16 * 2**20


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
        self._prepacked: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 policy: oneDNN weight, handle

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
        self._prepacked = None

    def int8_codes(self) -> torch.Tensor:
        """The codes as a resident contiguous int8 [out, in] tensor ("int8" policy; unpacked on first use)."""
        cached = self._cached
        if cached is None or cached.dtype != torch.int8:
            buf = torch.empty(self.unpacked_numel, dtype=torch.int8, device=self.packed.device)
            codes = cpu_int8.unpack_codes_into(self.packed, self.fmt, buf)[:, : self.in_features]
            self._cached = cached = codes.contiguous()
        return cached

    def int8_weight(self) -> torch.Tensor:
        """"int8" policy: the codes prepacked for oneDNN's int8 matmul (resident; the int8 codes are then
        dropped), as the handle `cpu_int8` multiplies with; the plain int8 codes where oneDNN is missing."""
        if not torch.backends.mkldnn.is_available():
            return self.int8_codes()
        if self._prepacked is None:
            self._prepacked = cpu_int8.prepack(self.int8_codes())
            self._cached = None
        return self._prepacked[1]

    def int8_path(self, x: torch.Tensor) -> bool:
        """Whether a call with input `x` takes the integer path (int8 policies, see terdit.deploy.cpu_int8)."""
        return find_kernel(self.fmt, x, self.policy) is cpu_int8.int8_kernel and cpu_int8.accepts(self, x)

    def _row_block(self, dtype: torch.dtype) -> int:
        """Output rows unpacked at once under the memory policy (all of them unless over scratch_limit)."""
        row_bytes = self.packed.shape[1] * DIGITS[self.fmt] * dtype.itemsize
        return max(1, min(self.out_features, self.scratch_limit // row_bytes))

    def _unpack(self, out: torch.Tensor, dtype: torch.dtype, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Unpack output rows r0:r1 into the flat buffer `out`; returns the [rows, in] view."""
        r1 = self.out_features if r1 is None else r1
        return self._unpack_bytes(self.packed[r0:r1], out, dtype)[:, : self.in_features]

    def _unpack_bytes(self, packed: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Unpack a [rows, bytes] block of the packed weight into the flat buffer `out`, as [rows, bytes * k]."""
        lut = code_lut(self.fmt, self.alphas, dtype)
        index = None
        if self.policy == "memory":
            index = self.scratch.get(packed.numel(), torch.int32, self.packed.device)
        out = out[: packed.numel() * DIGITS[self.fmt]]
        unpack_rows_into(packed, lut, out, index)
        return out.view(packed.shape[0], -1)

    def weight_for(self, dtype: torch.dtype, need_fresh: bool = False) -> torch.Tensor:
        """alpha * codes as a [out, in] tensor in `dtype` (possibly a strided view), per the policy."""
        if self.policy == "speed":
            cached = self._cached
            if cached is None or cached.dtype != dtype or cached.device != self.packed.device:
                buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
                # base3 rows end in up to 4 padding codes: a dense copy keeps the GEMM on the same path as fp32
                self._cached = cached = self._unpack(buf, dtype).contiguous()
            return cached
        if need_fresh:
            buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
        else:
            buf = self.scratch.get(self.unpacked_numel, dtype, self.packed.device)
        return self._unpack(buf, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = find_kernel(self.fmt, x, self.policy)
        if kernel is not None:
            y = kernel(self, x)
            if y is not None:  # None: the kernel declined this call (dtype, autograd, ...)
                return y
        need_fresh = torch.is_grad_enabled() and x.requires_grad
        block = self._row_block(x.dtype)
        if self.policy == "speed" or need_fresh or block >= self.out_features:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight_for(x.dtype, need_fresh), b)
        # memory policy, large layer: unpack and multiply one block of output rows at a time
        x2 = x.reshape(-1, self.in_features)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0 in range(0, self.out_features, block):
            r1 = min(self.out_features, r0 + block)
            y[:, r0:r1] = self.rows_linear(x2, r0, r1)
        return y.view(*x.shape[:-1], self.out_features)

    def blockwise(self, x: torch.Tensor) -> bool:
        """Whether a call with input `x` takes the unpack-into-scratch path (memory policy, no kernel, no grad)."""
        return (
            self.policy == "memory"
            and find_kernel(self.fmt, x, self.policy) is None
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def rows_linear(self, x2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Output columns r0:r1 of the layer for a 2-D input, unpacking only those weight rows (scratch)."""
        rows = r1 - r0
        buf = self.scratch.get(rows * self.packed.shape[1] * DIGITS[self.fmt], x2.dtype, self.packed.device)
        b = None if self.bias is None else self.bias[r0:r1].to(x2.dtype)
        return F.linear(x2, self._unpack(buf, x2.dtype, r0, r1), b)

    def cols_weight(self, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        """Input columns c0:c1 of the weight, [out, c1 - c0], unpacked into the scratch; c0 must be a
        multiple of the codes per byte (k) so the block starts on a byte."""
        k = DIGITS[self.fmt]
        if c0 % k:
            raise ValueError(f"column block must start at a multiple of {k}, got {c0}")
        packed = self.packed[:, c0 // k : -(-c1 // k)]
        buf = self.scratch.get(packed.numel() * k, dtype, self.packed.device)
        return self._unpack_bytes(packed, buf, dtype)[:, : c1 - c0]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._cached = self._prepacked = None  # moved or cast: the caches are rebuilt on the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"format={self.fmt}, policy={self.policy}"
        )


class PackedAttention(Attention):
    """Attention over PackedLinear projections (the loader swaps it in; same submodules and state-dict keys).

    On the memory policy's unpack path, when the projections are larger than the scratch, q, k and v are
    made and attended one group of heads at a time (the heads are row blocks of wq, wk, wv), so only one
    group's q, k, v exist at once: for 4.2B at 1024 tokens, 15 MiB instead of 36 MiB. Per head this is
    the same computation. Otherwise (small layers, speed policy, a fused kernel, autograd, q/k LayerNorm
    over all heads) it is Attention.forward.
    """

    def __init__(self, attention: Attention) -> None:
        nn.Module.__init__(self)  # adopt the existing submodules instead of building new ones
        self.n_heads, self.head_dim = attention.n_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        self.q_norm, self.k_norm, self.rope = attention.q_norm, attention.k_norm, attention.rope

    def heads_per_block(self, dtype: torch.dtype) -> int:
        return max(1, min(w._row_block(dtype) for w in (self.wq, self.wk, self.wv)) // self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(isinstance(w, PackedLinear) and w.int8_path(x) and w.bias is None for w in (self.wq, self.wk, self.wv)):
            return self.int8_forward(x)
        group = self.heads_per_block(x.dtype)
        projections = (self.wq, self.wk, self.wv)
        if (
            group >= self.n_heads
            or not isinstance(self.q_norm, nn.Identity)
            or not all(isinstance(w, PackedLinear) and w.blockwise(x) for w in projections)
        ):
            return super().forward(x)
        b, n, _ = x.shape
        x2 = x.reshape(-1, self.wq.in_features)
        out = x.new_empty(b, n, self.n_heads, self.head_dim)
        for h0 in range(0, self.n_heads, group):
            h1 = min(self.n_heads, h0 + group)
            r0, r1, shape = h0 * self.head_dim, h1 * self.head_dim, (b, n, h1 - h0, self.head_dim)
            q = self.rope(self.wq.rows_linear(x2, r0, r1).view(shape))
            k = self.rope(self.wk.rows_linear(x2, r0, r1).view(shape))
            v = self.wv.rows_linear(x2, r0, r1).view(shape)
            out[:, :, h0:h1] = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
            del q, k, v  # before the next group's are allocated
        return self.wo(out.view(b, n, -1))

    def int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention.forward with x quantized once for wq, wk and wv (the integer path)."""
        layers = (self.wq, self.wk, self.wv)
        codes, alphas = cpu_int8.layer_codes(*layers), [w.alphas for w in layers]
        q, k, v = cpu_int8.run(cpu_int8.shared_input_fn, x.reshape(-1, x.shape[-1]), codes, alphas)
        del codes
        shape = (*x.shape[:2], self.n_heads, self.head_dim)
        q = self.rope(self.q_norm(q).view(shape))
        k = self.rope(self.k_norm(k).view(shape))
        v = v.view(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class PackedFeedForward(FeedForward):
    """SwiGLU w2(silu(w1 x) * w3 x) over PackedLinear layers (the loader swaps it in; same submodules).

    On the memory policy's unpack path, when the layers are larger than the scratch, the FFN runs one
    block of hidden units at a time: rows of w1 and w3 give that block of silu(w1 x) * w3 x, and the
    matching columns of w2 add its contribution to the output. Neither w1 x, w3 x nor the hidden
    activation ever exists whole (for 4.2B at 1024 tokens: three 32 MiB tensors, the model's largest).
    The block sums change the fp32 summation order of w2 (differences at rounding level). Otherwise
    (small layers, speed policy, a fused kernel, autograd) it is FeedForward.forward.
    """

    def __init__(self, feed_forward: FeedForward) -> None:
        nn.Module.__init__(self)  # adopt the existing submodules instead of building new ones
        self.w1, self.w2, self.w3 = feed_forward.w1, feed_forward.w2, feed_forward.w3

    def hidden_block(self, dtype: torch.dtype) -> int:
        """Hidden units per block: what fits the scratch for w1, w3 and w2, on a byte boundary of w2."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        k = DIGITS[w2.fmt]
        w2_cols = w2.scratch_limit // (w2.out_features * dtype.itemsize)
        block = min(w1._row_block(dtype), w3._row_block(dtype), w2_cols)
        return max(k, block // k * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.w1, self.w2, self.w3
        if all(isinstance(w, PackedLinear) and w.int8_path(x) and w.bias is None for w in (w1, w2, w3)):
            return self.int8_forward(x)
        if not all(isinstance(w, PackedLinear) and w.blockwise(x) for w in (w1, w2, w3)):
            return super().forward(x)
        hidden = w1.out_features
        block = self.hidden_block(x.dtype)
        if block >= hidden:
            return super().forward(x)
        x2 = x.reshape(-1, w1.in_features)
        out = x2.new_zeros(x2.shape[0], w2.out_features)
        for h0 in range(0, hidden, block):
            h1 = min(hidden, h0 + block)
            h = F.silu(w1.rows_linear(x2, h0, h1), inplace=True).mul_(w3.rows_linear(x2, h0, h1))
            out.addmm_(h, w2.cols_weight(h0, h1, x.dtype).t())
            del h  # before the next block's w1 output is allocated
        if w2.bias is not None:
            out.add_(w2.bias.to(out.dtype))
        return out.view(*x.shape[:-1], w2.out_features)

    def int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """FeedForward.forward on the integer path: x quantized once for w1 and w3, and the SwiGLU product
        kept in fp32 and quantized for w2 in place (no rounding to x's dtype in between)."""
        layers = (self.w1, self.w3, self.w2)
        codes, alphas = cpu_int8.layer_codes(*layers), [w.alphas for w in layers]
        y = cpu_int8.run(cpu_int8.swiglu_fn, x.reshape(-1, x.shape[-1]), codes, alphas)
        return y.view(*x.shape[:-1], self.w2.out_features)


def set_policy(model: nn.Module, policy: str) -> None:
    """Switch every PackedLinear of `model` to `policy` (drops cached weights when leaving "speed")."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.set_policy(policy)


def warm_cache(model: nn.Module, dtype: torch.dtype) -> None:
    """Unpack now, so the first forward of a "speed" (or "int8") model does not pay for it."""
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.policy == "speed":
            m.weight_for(dtype)
        elif isinstance(m, PackedLinear) and m.policy == "int8" and m.packed.device.type == "cpu":
            m.int8_weight()


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
