"""The ternary (1.58-bit) math, in one place.

TerDiT's quantizer (paper eq. 2-4): W~ = alpha * RoundClip(W / (gamma + eps), -1, 1) with
gamma = mean|W|. gamma only sets the rounding threshold; the output scale is the learned alpha.
Training uses a straight-through estimator; export, packing and PTQ reuse `ternarize`.

`act_bits = 8` (`terdit train --act-bits 8`, `set_act_bits`) also rounds each layer's input per token to
8 bits (BitNet b1.58's absmax quantizer, straight-through), the arithmetic of the CPU integer path
(terdit.deploy.cpu_int8), so a model trained that way is exact on it.

Training speed (issue 16): with autograd on, `TernaryLinear` computes the same forward and straight-through
gradients through `qat_linear`: the codes come from one torch.compile'd pass over the weight (gamma from row
sums, then RoundClip as two compares against (gamma + eps) / 2, bit for bit the division's result, see
`codes_given_gamma`) written into a buffer the layer reuses, and alpha scales whichever is smaller, the
weight or the layer's output, in autograd Functions with hand-written backwards. The eager path it replaces
made ~15 passes over the weight. Without autograd (sampling, export, packing) the layer computes exactly what
`quantized_weight` does, bit for bit. `TERDIT_QAT_COMPILE=0` runs the same functions eagerly (also the
fallback where torch.compile fails).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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


# -- the training path: the same quantizer, fused ----------------------------------------------------------------
# Pure functions of tensors (torch.compile fuses each into one or two loops over the weight); `_run` calls them
# compiled or eagerly. They compute ternarize's and ternary_weight's values; only float sums (gamma, the
# gradients) may be ordered differently.


def codes_given_gamma(weight: torch.Tensor, gamma: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """RoundClip(W / (gamma + eps), -1, 1) without the division, for float32 / float64 weights.

    With d = gamma + eps and h = d / 2 (exact), the rounded quotient fl(w / d) exceeds 0.5 exactly when
    |w| > h: the values of w / d that round above 0.5 are those above 0.5 * (1 + 2^-p) (p: mantissa bits; the
    tie rounds to even, 0.5), and the smallest float above h is h * (1 + 2^(1-p)) or more. So the code is
    sign(w) where |w| > h, else 0: bit for bit the definition (up to the sign of zero; NaN gives 0), in two
    compares instead of a division (which made the fused pass compute-bound on CPU). Other dtypes (bf16, fp16
    weights: eager rounds their quotient twice) use the definition itself.
    """
    d = gamma + eps
    if weight.dtype not in (torch.float32, torch.float64):
        return (weight / d).round().clamp(-1, 1)
    h = d * 0.5
    return (weight > h).to(weight.dtype) - (weight < -h).to(weight.dtype)


def _scaled_codes(weight: torch.Tensor, alpha: torch.Tensor, granularity: Granularity, dtype: torch.dtype,
                  scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * codes if `scale` else codes) in `dtype`, and gamma."""
    if granularity == "tensor":  # row sums first: Inductor's one-level sum over a whole matrix (a cascade
        # summation) runs at a quarter of the speed of these two short ones
        gamma = (weight.abs().sum(-1).sum() / weight.numel()).reshape(1)
    else:
        gamma = absmean(weight, granularity)
    codes = codes_given_gamma(weight, gamma)
    if scale:
        codes = alpha.to(codes.dtype).reshape(()) * codes
    return codes.to(dtype), gamma


def _scaled_codes_into(out: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, granularity: Granularity,
                       scale: bool) -> torch.Tensor:
    """_scaled_codes written into `out` (Inductor writes it in place, no temporary); returns gamma."""
    codes, gamma = _scaled_codes(weight, alpha, granularity, out.dtype, scale)
    out.copy_(codes)
    return gamma


def _weight_grads(grad: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of alpha * codes: (alpha * grad to the latent weight (STE), sum(grad * codes) to alpha)."""
    g = grad.to(weight.dtype)
    codes = codes_given_gamma(weight, gamma)
    return g * alpha.to(weight.dtype).reshape(()), (g * codes).sum().reshape(1).to(alpha.dtype)


_COMPILED: dict[Callable, Callable] = {}
_compile_failed = False


def qat_compile_enabled() -> bool:
    """torch.compile for the training path (TERDIT_QAT_COMPILE=0 turns it off; it also switches itself off for the
    process after a failure, e.g. no C++ compiler)."""
    return os.environ.get("TERDIT_QAT_COMPILE", "1") != "0" and not _compile_failed


def _run(fn: Callable, *args):
    """fn(*args) through torch.compile where enabled, else eagerly (the same values up to float rounding)."""
    global _compile_failed
    if qat_compile_enabled() and not torch.compiler.is_compiling():
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn)
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            _compile_failed = True
            warnings.warn(f"terdit: torch.compile failed for ternary training, running eagerly "
                          f"({type(e).__name__}: {str(e)[:200]})", stacklevel=3)
    return fn(*args)


# Inside a compiled block (`terdit train --compile`) the weight side's two passes run as these ops: opaque to the
# block's graph, each one the separately compiled function the eager path calls. Traced into the block instead,
# Inductor's kernels for the block took ~70 ms more per fwd + bwd than the FP block's, against ~12 ms for these
# ops (dim-512 block, 2048 rows, 2 threads): the compiled ternary step went from 1.13x to 1.03x the FP one.
@torch.library.custom_op("terdit::ternary_scaled_codes", mutates_args=())
def _scaled_codes_op(weight: torch.Tensor, alpha: torch.Tensor, granularity: str,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha * codes in `dtype`, and gamma (`_scaled_codes`)."""
    return _run(_scaled_codes, weight, alpha, granularity, dtype, True)


@_scaled_codes_op.register_fake
def _(weight: torch.Tensor, alpha: torch.Tensor, granularity: str, dtype: torch.dtype):
    gamma_shape = (1,) if granularity == "tensor" else (weight.shape[0], 1)
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty(gamma_shape)


@torch.library.custom_op("terdit::ternary_weight_grads", mutates_args=())
def _weight_grads_op(grad: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
                     alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_weight_grads`: the latent weight's and alpha's gradients."""
    return _run(_weight_grads, grad, weight, gamma, alpha)


@_weight_grads_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor):
    return weight.new_empty(weight.shape), alpha.new_empty(1)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class CodesBuffer:
    """A layer's reusable output tensor for its codes, rewritten at every training forward.

    Without it the codes are a new weight-sized tensor at every forward; reusing one cut the median CPU time of
    a dim-512 batch-8 QAT step from 240 to 228 ms and from 272 to 259 ms in two runs (1 thread, loaded VM).
    The buffer is used only while nothing else holds its storage (a graph that has not run backward yet does):
    otherwise a fresh tensor is returned, as without the buffer, so earlier graphs keep their own codes. It holds
    one weight's worth of memory between steps, which every forward holds until backward anyway.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self._free = 0  # the storage's use count when only this object holds it

    def _uses(self, t: torch.Tensor) -> int:
        return _storage_use_count(t.untyped_storage()._cdata)  # type: ignore[misc]

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The buffer (allocated on first use or when the shape changes), or None while it is in use."""
        if _storage_use_count is None or torch.compiler.is_compiling():
            return None
        t = self.tensor
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            self.tensor = t = torch.empty(shape, dtype=dtype, device=device)
            self._free = self._uses(t)
            return t
        return t if self._uses(t) == self._free else None


def training_codes(weight: torch.Tensor, alpha: torch.Tensor, granularity: Granularity = "tensor",
                   dtype: torch.dtype | None = None, scale: bool = True, buffer: CodesBuffer | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha * codes (or the codes, `scale=False`) in `dtype` (default the weight's) and gamma, without autograd:
    what ternary_weight computes, in one fused pass where torch.compile runs; written into `buffer` when free."""
    weight, alpha, dtype = weight.detach(), alpha.detach(), dtype or weight.dtype
    out = buffer.take(weight.shape, dtype, weight.device) if buffer is not None else None
    if out is None:
        return _run(_scaled_codes, weight, alpha, granularity, dtype, scale)
    gamma = _run(_scaled_codes_into, out, weight, alpha, granularity, scale)
    return out.detach(), gamma  # an alias: autograd's bookkeeping lands on it, not on the buffer


class _TernaryWeight(torch.autograd.Function):
    """alpha * codes(W) in `dtype`, with ternary_weight's gradients: alpha * g to W (STE), sum(g * codes) to alpha."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, alpha: torch.Tensor, granularity: Granularity,  # type: ignore[override]
                dtype: torch.dtype, buffer: CodesBuffer | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            w, gamma = torch.ops.terdit.ternary_scaled_codes(weight.detach(), alpha.detach(), granularity, dtype)
        else:
            w, gamma = training_codes(weight, alpha, granularity, dtype, buffer=buffer)
        ctx.save_for_backward(weight, alpha, gamma)
        return w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weight, alpha, gamma = ctx.saved_tensors
        if torch.compiler.is_compiling():
            grad_w, grad_alpha = torch.ops.terdit.ternary_weight_grads(grad, weight, gamma, alpha)
        else:
            grad_w, grad_alpha = _run(_weight_grads, grad, weight, gamma, alpha)
        return grad_w, grad_alpha, None, None, None


class _TernaryLinearScaledOutput(torch.autograd.Function):
    """F.linear(x, alpha * codes(W), bias) for layers whose output is smaller than their weight: the weight side
    is only the codes, alpha scales the narrower of the layer's input and output, and the gradients are
    ternary_weight's. Input side (in <= out): y = (alpha x) C^T + b, one BLAS call as F.linear's;
    dL/dx = alpha (g C), dL/dalpha = sum(x * g C) (= sum(g * x C^T), no output-sized tensor saved or read),
    dL/dW = g^T (alpha x) (STE). Output side (in > out): y = alpha (x C^T) + b, x C^T saved;
    dL/dalpha = sum(g * x C^T), dL/dx = (alpha g) C, dL/dW = (alpha g)^T x. On the input side the element-wise
    work is ~4 input-sized passes instead of ~4 output-sized ones: a 512 -> 3072 layer at 128 rows lost ~0.65 ms
    of its ~3.3 ms over nn.Linear (fwd + bwd, 1 thread, AVX2 EPYC); 512 -> 1408 and square layers, no visible
    change, and so no visible change in a dim-512 step, whose adaLN layers see 8 rows. One Function, so a layer is one
    autograd node: each Python node costs ~20 us per backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, granularity: Granularity, dtype: torch.dtype,
                buffer: CodesBuffer | None) -> torch.Tensor:
        codes = training_codes(weight, alpha, granularity, dtype, scale=False, buffer=buffer)[0]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a = alpha.detach().to(dtype).reshape(())
        b = None if bias is None else bias.detach().to(dtype)
        ctx.input_side = codes.shape[1] <= codes.shape[0]
        if ctx.input_side:
            xa = x2 * a
            y = xa @ codes.t() if b is None else torch.addmm(b, xa, codes.t())
            ctx.save_for_backward(x2, codes, alpha)
        else:
            y0 = x2 @ codes.t()
            y = y0 * a if b is None else torch.addcmul(b, y0, a)
            ctx.save_for_backward(x2, codes, alpha, y0)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x2, codes, alpha, *y0 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        a = alpha.to(g.dtype).reshape(())
        need_x, need_w, need_alpha, need_b = ctx.needs_input_grad[:4]
        acc = torch.promote_types(g.dtype, torch.float32)  # bf16: sum alpha's gradient in float32
        grad_x = grad_w = grad_alpha = None
        if ctx.input_side:
            gc = g @ codes if need_x or need_alpha else None
            if need_x:
                grad_x = (gc * a).view(*grad.shape[:-1], -1).to(x_dtype)
            if need_w:
                grad_w = (g.t() @ (x2 * a)).to(w_dtype)
            if need_alpha:
                grad_alpha = torch.dot(gc.to(acc).flatten(), x2.to(acc).flatten())
        else:
            ga = g * a
            if need_x:
                grad_x = (ga @ codes).view(*grad.shape[:-1], -1).to(x_dtype)
            if need_w:
                grad_w = (ga.t() @ x2).to(w_dtype)
            if need_alpha:
                grad_alpha = torch.dot(g.to(acc).flatten(), y0[0].to(acc).flatten())
        if grad_alpha is not None:
            grad_alpha = grad_alpha.reshape(1).to(alpha.dtype)
        grad_b = g.sum(0).to(b_dtype) if need_b else None
        return grad_x, grad_w, grad_alpha, grad_b, None, None, None


def scale_output(rows: int, in_features: int) -> bool:
    """Whether alpha should scale the output rather than the weight: per output feature the weight side costs
    ~6 passes over `in_features` numbers (gamma, codes, alpha * codes; alpha * g and sum(g * codes) in backward),
    the output side ~3 over `in_features` (gamma, codes) and ~5 over `rows` (alpha * y0; alpha * g, g . y0)."""
    return 5 * rows < 3 * in_features


# below this many weights the eager quantizer is cheaper than a compiled call (measured: TerDiT-Digits, dim 128,
# trains 1.155x its FP twin fused vs 1.085x eager at batch 128; dim 512 gains: 1.071x fused vs 1.186x eager)
FUSED_MIN_WEIGHT = 1 << 17


def qat_linear(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
               granularity: Granularity = "tensor", buffer: CodesBuffer | None = None) -> torch.Tensor:
    """F.linear(x, ternary_weight(weight, alpha), bias) for training: the same forward and gradients (up to
    float rounding), with the weight work fused and alpha applied to the smaller of the weight and the output.
    `buffer`: where the codes go when it is free (TernaryLinear passes its own)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if scale_output(x.numel() // max(x.shape[-1], 1), weight.shape[1]):
        return _TernaryLinearScaledOutput.apply(x, weight, alpha, bias, granularity, dtype, buffer)
    return F.linear(x, _TernaryWeight.apply(weight, alpha, granularity, dtype, buffer), bias)


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
        self._codes_buffer = CodesBuffer()  # training's codes, reused across steps; never saved or copied

    def __getstate__(self) -> dict:
        """copy.deepcopy (the trainer's EMA) and pickling start with an empty codes buffer."""
        state = dict(self.__dict__)
        state["_codes_buffer"] = CodesBuffer()
        return state

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
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (torch.is_grad_enabled() and (self.weight.requires_grad or self.alphas.requires_grad)
                and self.weight.numel() >= FUSED_MIN_WEIGHT):
            return qat_linear(x, self.weight, self.alphas, bias, self.granularity, self._codes_buffer)
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, bias)

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
