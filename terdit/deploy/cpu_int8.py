"""Integer compute for ternary layers on CPU: int8 activations x int8 ternary codes, int32 accumulation.

Ternary weights are exactly alpha * codes with codes in {-1, 0, 1}, i.e. int8 values, so the only rounding
on this path is that of the activations: per token (row), absmax to 8 bits as BitNet b1.58 does
(`terdit.quant.bitnet.quantize_activations`): scale = 127 / max|x|, q = round(x * scale). Then

    y = (q @ codes.T) * (alpha / scale) + bias

with the product accumulated exactly in int32 and alpha and the per-token scale folded into one multiply
of the output. On CPUs with int8 dot products (AVX512-VNNI, AVX-VNNI, AMX-INT8) the int8 matmul took
0.43-0.5x the time of the bf16 one at 1 thread (600M shapes, AMD EPYC with VNNI and AVX512-BF16).

Two PackedLinear policies use it (`register_kernel(fmt, "cpu", ..., policy)`):

- "int8": the codes are unpacked once and prepacked for oneDNN's int8 matmul (`qlinear_pointwise`,
  uint8 activations q + 128 with zero point 128; 1 byte per weight, resident; a bf16 output where its fast
  kernels write one, `onednn_out_dtype`). The opaque prepacked tensor is reached through the custom op
  `terdit::qlinear_u8` and an int64 handle, so torch.compile fuses around it (it cannot take the prepacked
  tensor itself). Layers that see one row per image (TerDiT's adaLN) stay packed, on "int8-packed"'s path
  (`terdit.deploy.packed_linear.layer_policy`).
- "int8-packed": the weight stays packed (2 or 1.6 bits per weight); each call unpacks it into the model's
  shared int8 scratch (one 4-byte gather per 4 codes for "2bit", ~10% of the int8 matmul; in blocks of
  output rows, `packed_acc`) and multiplies with `torch._int_mm` (prepacking per call would cost another pass;
  `_int_mm` took the same time as oneDNN's at 1 thread, but scaled worse to 2 threads on a loaded VM); inside a
  compiled block the unpack-and-multiply is the custom op `terdit::packed_int8_mm`.

A call the path does not take (autograd recording with an input that needs grad, a dtype other than
fp32 / bf16 / fp16, a CPU without int8 dot products, TERDIT_NO_KERNELS=1) returns None and the layer runs
the exact float path (unpack, F.linear). Each layer is its own unit (packing is a module swap; the model's
blocks keep their forward): layers called one after the other on the same input (wq, wk, wv; w1, w3) quantize
it once (`SharedTokens`), and the SwiGLU product reaching w2 is the model's own, in the compute dtype. The
quantization and the matmul with its output scaling run through torch.compile (Inductor fuses each into a
loop or two around the int8 matmul; eager PyTorch spent ~80% on top of the matmuls in separate passes), compiled
once per shape on first use; TERDIT_CPU_COMPILE=0, or a failed compile, runs the same functions eagerly. That is
the per-layer path; a deployed TerDiT compiles whole blocks instead (`packed_linear.compile_int8_`, through
`traced_kernel`), where Inductor fuses what lies between the layers too.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from terdit.deploy.kernels import register_kernel
from terdit.quant.bitnet import ACT_LEVELS
from terdit.quant.packing import DIGITS, FORMATS, _digits, unpack_rows_into

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


# Whether oneDNN's fast int8 matmul kernels write bf16 here (`onednn_out_dtype`): its brgemm int8 matmul takes a
# bf16 output on AVX-512 cores (avx512_core and above: every CPU with AVX512-VNNI or AMX), while on AVX2 a bf16
# output sends it to its reference loop. Read once, as a constant that compiled code guards on.
NATIVE_BF16_OUT = bool({"avx512_vnni", "amx_int8"} & cpu_flags())


class QuantizedTokens(NamedTuple):
    """Per-token int8 activations: x ~ q / scale, q [rows, K] int8, scale [rows, 1] fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]  # the input's leading shape


def _quant(x2: torch.Tensor, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, K] float -> (q int8, scale fp32 [rows, 1]): BitNet's arithmetic on x in fp32, without first
    converting x (the absmax is exact in x's dtype; x * scale promotes to fp32). `unsigned`: q + 128 as
    uint8 (oneDNN's fast int8 kernels take unsigned activations with a zero point)."""
    amax = torch.maximum(x2.amax(-1, keepdim=True), x2.amin(-1, keepdim=True).neg()).float()
    scale = ACT_LEVELS / amax.clamp(min=EPS)
    q = (x2 * scale).round_().clamp_(-ACT_LEVELS, ACT_LEVELS)  # in place: one fp32 temporary, not three
    return (q.add_(128).to(torch.uint8) if unsigned else q.to(torch.int8)), scale


def quantize_tokens(x: torch.Tensor) -> QuantizedTokens:
    """Per-token absmax 8-bit quantization of `x` [..., K], BitNet b1.58's (no straight-through: inference);
    the same values as `terdit.quant.bitnet.quantize_activations` on x in fp32."""
    q, scale = _quant(x.reshape(-1, x.shape[-1]))
    return QuantizedTokens(q, scale, tuple(x.shape[:-1]))


def dequantize_tokens(qt: QuantizedTokens) -> torch.Tensor:
    """q / scale in fp32, the float value the integer path computes with (tests, error measurements)."""
    return (qt.q.to(torch.float32) / qt.scale).view(*qt.lead, qt.q.shape[-1])


_PREPACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_next_handle = itertools.count()


def _register(registry: weakref.WeakValueDictionary, obj, out_features: int) -> torch.Tensor:
    """Put `obj` (held weakly) in `registry` under a fresh key; return the key as an int64 tensor of shape
    [out_features] (stride 0): an op's argument that torch.compile traces as a plain tensor, whose shape gives
    the fake function the output width."""
    key = next(_next_handle)
    registry[key] = obj
    return torch.tensor([key]).expand(out_features)


def prepack(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """oneDNN's blocked int8 layout of `codes` [out, in] (same bytes) and a handle for `_mm`: an int64
    tensor of shape [out] (stride 0) naming it, so torch.compile sees a plain tensor, never the opaque one.
    The caller keeps the first element alive (the registry holds it weakly)."""
    packed = torch.ops.onednn.qlinear_prepack(codes, None)
    return packed, _register(_PREPACKED, packed, codes.shape[0])


@torch.library.custom_op("terdit::qlinear_u8", mutates_args=())
def qlinear_u8(q: torch.Tensor, handle: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """alpha * ((q - 128) @ codes.T) in `dtype`, oneDNN's int8 matmul (VNNI / AMX): exact int32 accumulation,
    scaled in fp32 and rounded once to `dtype` as the kernel writes its output (bf16: no fp32 copy)."""
    w = _PREPACKED[int(handle[0])]
    zero = torch.zeros(1, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 128, w, alpha.float(), zero, None, 1.0, 0, dtype, "none", [], ""
    )


@qlinear_u8.register_fake
def _(q: torch.Tensor, handle: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty(q.shape[0], handle.shape[0], dtype=dtype)


def onednn_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype oneDNN's int8 matmul writes: bf16 for a bf16 model where its fast kernels do (`NATIVE_BF16_OUT`;
    half the output bytes, no fp32 [rows, out] buffer per layer), else fp32. With the op emulated on an AVX2
    host, bf16 outputs took ~40 MiB off a compiled 600M step's peak at batch 4 while the FFN ran whole; with
    its FFN in 512-token chunks (`packed_linear.chunk_ffn_`) the peak did not change (1116-1123 vs 1113-1133
    MiB, one process each, three steps)."""
    return dtype if dtype == torch.bfloat16 and NATIVE_BF16_OUT else torch.float32


def _mm(q: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
        dtype: torch.dtype) -> torch.Tensor:
    """(q @ codes.T) * alpha / scale (+ bias) in `dtype`: accumulated exactly in int32, scaled in fp32. `w`: int8
    codes (torch._int_mm, q int8) or a `prepack` handle (oneDNN, q uint8). Where the matmul writes `dtype`
    (`onednn_out_dtype`) or the scaling does (`scale_fn`, after `_int_mm`), the output is rounded there and again
    after the token scale or the bias, so that no fp32 buffer of the output's size is made; otherwise once, at
    the end."""
    if w.dtype == torch.int64:
        y = torch.ops.terdit.qlinear_u8(q, w, alpha, onednn_out_dtype(dtype)).div_(scale)
        return (y if bias is None else y.add_(bias)).to(dtype)  # in place: eagerly, one output buffer
    return scale_fn(torch._int_mm(q, w.t()), scale, alpha, bias, dtype)


# The integer path's two units, as pure functions of tensors so that torch.compile can fuse each one's
# quantization and output scaling around the int8 matmul (Inductor calls _int_mm as an external kernel).
def quant_fn(x2: torch.Tensor, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the input [rows, K] -> (q, scale) (once per input that several layers share)."""
    return _quant(x2, unsigned)


def mm_fn(q: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
          dtype: torch.dtype) -> torch.Tensor:
    """Quantized tokens times the codes, scaled (+ bias), in the compute `dtype`."""
    return _mm(q, scale, w, alpha, bias, dtype)


def scale_fn(acc: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """An int32 product (`_int_mm`; "int8-packed"'s `packed_acc`) times alpha / scale (+ bias), written in the
    compute `dtype` (no fp32 copy of the output)."""
    y = torch.mul(acc, alpha.float() / scale, out=torch.empty(acc.shape, dtype=dtype))
    return (y if bias is None else y.add_(bias)).to(dtype)


class SharedTokens:
    """The last input the integer path quantized, kept for the next layer called with the same tensor.

    Layers that read one input (attention's wq, wk, wv; SwiGLU's w1, w3) are called one after the other on the
    same tensor object; the first quantizes it and the others reuse its int8 tokens, which is what quantizing
    once for the group did when the blocks were packed subclasses (attention took 13% longer at 600M without
    it). The entry matches only the same tensor object with the same storage, shape, strides and dtype, and,
    outside inference mode, the same version counter (an in-place change invalidates it). Inference tensors have
    no version counter: a module that changes a linear's input in place *between two packed layers* under
    torch.inference_mode would reuse stale tokens (terdit's and diffusers' blocks never do; for such a module
    call `clear` or use another policy).
    """

    def __init__(self) -> None:
        # (weak reference to the input, its key, (q, scale)), replaced as a whole: one read sees one entry,
        # so threads sharing a model never pair one input with another's tokens
        self._entry: tuple[weakref.ref[torch.Tensor], tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def key(x: torch.Tensor, unsigned: bool) -> tuple:
        version = None if x.is_inference() else x._version
        return (unsigned, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, version)

    def get(self, x: torch.Tensor, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale) of `x` [..., K], quantized now unless the last call quantized this very tensor."""
        key = self.key(x, unsigned)
        entry = self._entry
        if entry is not None and entry[0]() is x and entry[1] == key:
            return entry[2]
        self._entry = None  # the old tokens go before the new ones are made
        tokens = run(quant_fn, x.reshape(-1, x.shape[-1]), unsigned)
        self._entry = (weakref.ref(x), key, tokens)
        return tokens

    def clear(self) -> None:
        self._entry = None


_COMPILED: dict[Callable, Callable] = {}
_compile_failed = False


def compile_enabled() -> bool:
    """torch.compile for the integer path (TERDIT_CPU_COMPILE=0 turns it off; it also switches itself off
    for the process after a failure, e.g. no C++ compiler)."""
    return os.environ.get("TERDIT_CPU_COMPILE", "1") != "0" and not _compile_failed


def compile_failed(e: Exception) -> None:
    """Switch torch.compile off for the integer path in this process, with one warning."""
    global _compile_failed
    if _compile_failed:
        return
    _compile_failed = True
    warnings.warn(f"terdit: torch.compile failed for the CPU integer path, running eagerly "
                  f"({type(e).__name__}: {str(e)[:200]})", stacklevel=3)


def traced_kernel(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The integer path as plain tensor code, for a layer traced inside its compiled block
    (`terdit.deploy.packed_linear.compile_int8_`, which checked the CPU and settings): "int8" multiplies with
    its prepacked weight, "int8-packed" through `packed_int8_mm`. None where this call is not for it (policy,
    device, dtype, autograd, weights or handle not prepared), and the layer's usual path runs."""
    if layer.policy == "int8":
        prepacked = layer._prepacked
        w = prepacked[1] if prepacked is not None else layer._cached
    else:
        w = layer.packed_handle if layer.policy == "int8-packed" else None
    if (
        w is None
        or w.dtype not in (torch.int64, torch.int8)
        or x.device.type != "cpu"
        or x.dtype not in FLOAT_DTYPES
        or (torch.is_grad_enabled() and x.requires_grad)
    ):
        return None
    x2 = x.reshape(-1, layer.in_features)
    if layer.policy == "int8-packed":
        q, scale = _quant(x2)
        y = scale_fn(torch.ops.terdit.packed_int8_mm(q, w), scale, layer.alphas, layer.bias, x.dtype)
    else:
        q, scale = _quant(x2, w.dtype == torch.int64)
        y = _mm(q, scale, w, layer.alphas, layer.bias, x.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


def run(fn: Callable, *args):
    """fn(*args), through torch.compile where enabled (each shape compiles once, on first use), else eager."""
    if compile_enabled():
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn, dynamic=False)
        try:
            return compiled(*args)
        except Exception as e:  # the eager function computes the same values
            compile_failed(e)
    return fn(*args)


def accepts(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the integer path takes this call (else the layer's exact float path does)."""
    return (
        layer.policy in INT8_POLICIES
        and x.device.type == "cpu"
        and layer.packed.device.type == "cpu"
        and x.dtype in FLOAT_DTYPES
        and x.shape[-1] == layer.in_features
        and not (torch.is_grad_enabled() and x.requires_grad)
        and integer_path_on()
    )


def integer_path_on() -> bool:
    """Whether this process takes the integer path for its inference calls at all (int8 dot products, kernels
    not disabled with TERDIT_NO_KERNELS=1); where not, the int8 policies unpack floats per call, as "memory"."""
    return os.environ.get("TERDIT_NO_KERNELS") != "1" and has_int8_dot()


@functools.cache
def _code_lut(fmt: str) -> torch.Tensor:
    """byte -> its codes as int8 [256, k]; for "2bit" the 4 codes of a byte as one int32 [256] (a 4-byte
    gather from a 1-D table, ~5x faster than gathering [256, 1] rows)."""
    lut = (_digits(fmt) - 1).to(torch.int8).contiguous()
    return lut.view(torch.int32).view(-1) if fmt == "2bit" else lut


def unpack_codes_into(packed: torch.Tensor, fmt: str, out: torch.Tensor, index: torch.Tensor | None = None):
    """The int8 codes of a [rows, bytes] block of packed rows into the flat int8 buffer `out`, returned as
    [rows, bytes * k] (padding codes included). `index`: optional int32 scratch of >= packed.numel()."""
    n = packed.numel()
    out = out[: n * DIGITS[fmt]]
    if fmt != "2bit":
        unpack_rows_into(packed, _code_lut(fmt), out, index)
        return out.view(packed.shape[0], -1)
    idx = packed.reshape(-1).to(torch.int32) if index is None else index[:n].copy_(packed.reshape(-1))
    torch.index_select(_code_lut(fmt), 0, idx, out=out.view(torch.int32))
    return out.view(packed.shape[0], -1)


# "int8-packed" unpacks a layer's codes into the model's shared int8 scratch in blocks of output rows: whole
# layers up to the memory policy's scratch limit (`PackedLinear.scratch_limit`), and for inputs of at most
# FEW_ROWS rows (TerDiT's adaLN: two per image) blocks of FEW_ROWS_BLOCK_BYTES. There the matmul is a matrix-
# vector product and the unpacking is no slower in blocks (a 9216 x 1536 weight: 11-14 ms either way, AVX2 EPYC,
# 1-2 threads), and the scratch stays at 2 MiB instead of a whole adaLN weight and its int32 gather index
# (600M: 18 MiB, resident from the first step on).
FEW_ROWS = 64
FEW_ROWS_BLOCK_BYTES = 2**20


def packed_acc(layer: nn.Module, q: torch.Tensor) -> torch.Tensor:
    """"int8-packed": int8 tokens q [rows, K] times the layer's codes, int32 [rows, out], unpacking the codes
    block by block of output rows into the shared scratch (int8 codes are half the bf16 weight the memory policy
    unpacks; the scratch is reused call after call: no fresh pages to fault in). In an FFN run on chunks of
    tokens (`hold_offset`, set by `packed_linear.chunk_ffn_`) a whole layer's codes stay at their own place in
    the scratch, unpacked once for all chunks."""
    rows, n = q.shape[0], layer.out_features
    block = layer._row_block(torch.int8, FEW_ROWS_BLOCK_BYTES if rows <= FEW_ROWS else None)
    device = layer.packed.device
    index = layer.scratch.get(block * layer.packed.shape[1], torch.int32, device)
    if block == n and layer.hold_offset is not None:  # an FFN on chunks of tokens: codes kept across chunks
        packed = layer.packed
        flat = layer.scratch.held(layer, (packed.data_ptr(), packed._version), layer.hold_offset,
                                  layer.unpacked_numel, torch.int8, device,
                                  lambda out: unpack_codes_into(packed, layer.fmt, out, index))
        return torch._int_mm(q, flat.view(n, -1)[:, : layer.in_features].t())
    buf = layer.scratch.get(block * layer.packed.shape[1] * DIGITS[layer.fmt], torch.int8, device)

    def codes(r0: int, r1: int) -> torch.Tensor:
        return unpack_codes_into(layer.packed[r0:r1], layer.fmt, buf, index)[:, : layer.in_features]

    if block == n:
        return torch._int_mm(q, codes(0, n).t())
    acc = q.new_empty(rows, n, dtype=torch.int32)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        acc[:, r0:r1] = torch._int_mm(q, codes(r0, r1).t())
    return acc


_PACKED_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def packed_handle(layer: nn.Module) -> torch.Tensor:
    """An int64 tensor of shape [out] (stride 0) naming the "int8-packed" `layer` for `packed_int8_mm`, so a
    compiled block calls its unpack-and-multiply as one opaque op (`compile_int8_`); the layer keeps it."""
    return _register(_PACKED_LAYERS, layer, layer.out_features)


@torch.library.custom_op("terdit::packed_int8_mm", mutates_args=())
def packed_int8_mm(q: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """`packed_acc` of the layer `handle` names: inside a compiled block Inductor calls it as an external kernel
    (as it does `_int_mm`), with the quantization before it and the scaling after it fused into the block's
    own loops, and the unpacking keeps using the model's scratch (traced, it would get fresh buffers)."""
    return packed_acc(_PACKED_LAYERS[int(handle[0])], q)


@packed_int8_mm.register_fake
def _(q: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[0], handle.shape[0], dtype=torch.int32)


def packed_mm(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """"int8-packed" per layer: `packed_acc`, scaled (+ bias) in `dtype`."""
    return run(scale_fn, packed_acc(layer, q), scale, layer.alphas, layer.bias, dtype)


def int8_kernel(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The `register_kernel` entry for the int8 policies: the integer path, or None (exact float path).
    The input's quantization is shared with the next layer called on the same tensor (`SharedTokens`)."""
    if not accepts(layer, x):
        return None
    if layer.policy == "int8":
        w = layer.int8_weight()  # resident: a prepack handle, or int8 codes where oneDNN is missing
        q, scale = layer.scratch.tokens.get(x, w.dtype == torch.int64)
        y = run(mm_fn, q, scale, w, layer.alphas, layer.bias, x.dtype)
    else:
        q, scale = layer.scratch.tokens.get(x, False)
        y = packed_mm(layer, q, scale, x.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


def enable_cpu_int8(formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Register `int8_kernel` for the int8 policies on CPU (also where the CPU lacks int8 dot products:
    the kernel then declines every call, so the policies still work, on the exact path)."""

    for fmt in formats:
        for policy in INT8_POLICIES:
            register_kernel(fmt, "cpu", int8_kernel, policy)
    return list(formats)


__all__ = [
    "INT8_POLICIES",
    "QuantizedTokens",
    "SharedTokens",
    "accepts",
    "compile_enabled",
    "dequantize_tokens",
    "enable_cpu_int8",
    "has_int8_dot",
    "integer_path_on",
    "int8_kernel",
    "quantize_tokens",
    "run",
    "traced_kernel",
    "mm_fn",
    "packed_acc",
    "packed_handle",
    "packed_int8_mm",
    "packed_mm",
    "onednn_out_dtype",
    "quant_fn",
    "scale_fn",
    "unpack_codes_into",
]
