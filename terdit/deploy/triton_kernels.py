"""Triton kernels for packed ternary linears: y = x @ (alpha * T).T + b, T decoded from the packed bytes.

The weight stays in the in-memory rows layout that `PackedLinear.packed` already holds (uint8 [N, NB]; byte
b of row n holds the codes of input columns k*b .. k*b+k-1 as radix-4 (2bit, k = 4) or radix-3 (base3,
k = 5) digits, least significant first, digit = code + 1). No second copy and no load-time re-layout, so
resident memory stays at 2 (or 1.6) bits per weight.

Two kernels, chosen by the number of rows M of x:

- skinny (M <= SKINNY_MAX_M, the adaLN projections at small batch): one program per block of output
  columns loads the bytes of its rows once, decodes every digit with shifts/masks (2bit) or div/mod
  (base3) in registers and multiply-accumulates all M rows in fp32. Memory-bound: it reads 1/8 of the
  bytes a bf16 GEMV reads.
- tiled (larger M, the token projections): a GEMM over [BM, BN] output tiles. Each K step loads one
  [BKB, BN] tile of packed bytes and, for each digit i, the x columns k*b + i (a strided [BM, BKB]
  slice) and the decoded [BKB, BN] code tile in x's dtype, fed to `tl.dot` with fp32 accumulation.
  Splitting by digit keeps the loads of the packed tile unrepeated and needs no in-register
  interleave; codes in {-1, 0, 1} are exact in every dtype.

alpha (read from device memory, so no host sync) and the bias are applied in fp32 before the single
rounding to the output dtype. Both kernels handle any N and K (masked tails), fp32/fp16/bf16 inputs,
and strided x. Under `TRITON_INTERPRET=1` they run on CPU tensors (tests); autotuning is then reduced to
one small configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from terdit.deploy.kernels import register_kernel, registered_kernel, unregister_kernel

try:  # triton >= 3.4
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
except ImportError:  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FORMATS: tuple[str, ...] = ("2bit", "base3")
_RADIX = {"2bit": 4, "base3": 3}
_DIGITS = {"2bit": 4, "base3": 5}
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# Rows up to this use the skinny (fp32 FMA) kernel; above it the tl.dot kernel (tensor cores, BM >= 16).
# The crossover is a GPU measurement (benchmarks/gpu_kernels.py prints both paths for the adaLN shapes).
SKINNY_MAX_M = 4


def _tiled_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "BKB": 8, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [  # BM, BN, BKB (bytes per K step: 4*BKB columns for 2bit), warps, stages
        (16, 64, 32, 4, 4),
        (32, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 128, 32, 8, 4),  # with 4 warps these two spill registers on sm_90 (cuobjdump)
        (128, 64, 32, 8, 4),
        (128, 128, 16, 8, 3),
        (128, 128, 32, 8, 3),
        (128, 256, 16, 8, 3),
    ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BKB": bkb, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bkb, w, s in shapes
    ]


def _skinny_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BN": 16, "BKB": 8}, num_warps=4, num_stages=1)]
    shapes = [(32, 32, 4), (64, 16, 4), (64, 32, 4), (128, 16, 4), (128, 32, 8), (256, 16, 8)]
    return [triton.Config({"BN": bn, "BKB": bkb}, num_warps=w, num_stages=3) for bn, bkb, w in shapes]


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row tiles much taller than M (they only multiply masked zeros)."""
    cap = max(16, triton.next_power_of_2(int(named_args["M"])))
    kept = [c for c in configs if c.kwargs["BM"] <= cap]
    return kept or configs[:1]


@triton.jit
def _digit(q, RADIX: tl.constexpr):
    """(lowest digit of q, q without it) for the 2bit (radix 4) or base3 (radix 3) rows layout."""
    if RADIX == 4:
        d = q & 3
        rest = q >> 2
    else:
        d = q % 3
        rest = q // 3
    return d, rest


@triton.autotune(
    configs=_tiled_configs(), key=["M", "N", "K", "RADIX"], prune_configs_by={"early_config_prune": _prune_tiled}
)
@triton.jit
def _ternary_mm_kernel(
    x_ptr, w_ptr, alpha_ptr, bias_ptr, y_ptr,
    M, N, K, NB,
    stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, RADIX: tl.constexpr, DIGITS: tl.constexpr, FP32_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped program order: programs that run together share x row tiles and weight column tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_b = tl.arange(0, BKB)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b0 in range(0, NB, BKB):
        bb = b0 + offs_b
        # [BKB, BN] packed bytes: column n of the tile is row n of the weight
        q = tl.load(w_ptr + offs_n[None, :] * stride_wn + bb[:, None], mask=(bb[:, None] < NB) & n_ok, other=0)
        q = q.to(tl.int32)
        for i in tl.static_range(DIGITS):
            kk = bb * DIGITS + i
            xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < K), other=0.0)
            if DOT_FP32:  # interpreter only: its tl.dot multiplies the raw bits of bf16 operands
                xt = xt.to(tl.float32)
            d, q = _digit(q, RADIX)
            w = (d - 1).to(xt.dtype)  # codes, exact in fp32/fp16/bf16; masked bytes meet zero x
            acc = tl.dot(xt, w, acc, input_precision=FP32_PRECISION)
    y = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


@triton.autotune(configs=_skinny_configs(), key=["M", "N", "K", "RADIX"])
@triton.jit
def _ternary_mv_kernel(
    x_ptr, w_ptr, alpha_ptr, bias_ptr, y_ptr,
    M, N, K, NB,
    stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, RADIX: tl.constexpr, DIGITS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_b = tl.arange(0, BKB)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b0 in range(0, NB, BKB):
        bb = b0 + offs_b
        # [BN, BKB] packed bytes, contiguous along each weight row
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + bb[None, :], mask=n_ok & (bb[None, :] < NB), other=0)
        q = q.to(tl.int32)
        for i in tl.static_range(DIGITS):
            kk = bb * DIGITS + i
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=m_ok & (kk[None, :] < K), other=0.0).to(tl.float32)  # fmt: skip
            d, q = _digit(q, RADIX)
            w = (d - 1).to(tl.float32)
            acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    y = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok & (offs_n[None, :] < N))


def _check_inputs(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int) -> None:
    """ValueError for what the kernels do not take (an unknown format or dtype, a layout, a feature count)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown packed format {fmt!r}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {DTYPES}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError("packed must be a 2-D uint8 tensor with contiguous rows")
    nbytes, digits = packed.shape[1], _DIGITS[fmt]
    if x.shape[-1] != in_features or not nbytes * digits - digits < in_features <= nbytes * digits:
        raise ValueError(f"x has {x.shape[-1]} features; packed {tuple(packed.shape)} holds {in_features} ({fmt})")


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    in_features: int,
    path: str = "auto",
) -> torch.Tensor:
    """x [..., K] @ (alpha * codes).T + bias, codes read from the rows layout `packed` [N, ceil(K/k)].

    `path`: "auto" (skinny for M <= SKINNY_MAX_M rows, else tiled), "skinny" or "tiled" (benchmarks, tests).
    The output has x's dtype. Raises ValueError on inputs the kernels do not take (see `supports`).
    """
    _check_inputs(x, packed, fmt, in_features)
    n_out, nbytes = packed.shape
    digits = _DIGITS[fmt]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return y.view(*x.shape[:-1], n_out)
    if in_features == 0:
        y.copy_((bias if bias is not None else torch.zeros(n_out, device=x.device)).expand(m, n_out))
        return y.view(*x.shape[:-1], n_out)
    alpha = alpha.reshape(1).to(device=x.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else alpha  # any pointer; not read when HAS_BIAS is False
    common = (x2, packed, alpha, bias_arg, y, m, n_out, in_features, nbytes,
              x2.stride(0), x2.stride(1), packed.stride(0), y.stride(0), y.stride(1))  # fmt: skip
    if path == "auto":
        path = "skinny" if m <= SKINNY_MAX_M else "tiled"
    if path == "skinny":
        bm = triton.next_power_of_2(m)
        if bm > 16:
            raise ValueError(f"the skinny kernel takes at most 16 rows, got {m}")

        def grid_mv(meta: dict) -> tuple[int]:
            return (triton.cdiv(n_out, meta["BN"]),)

        _ternary_mv_kernel[grid_mv](
            *common, HAS_BIAS=bias is not None, RADIX=_RADIX[fmt], DIGITS=digits, BM=bm
        )
    elif path == "tiled":
        # fp32 x follows torch's TF32 switch (IEEE by default, as F.linear); fp16/bf16 use tensor cores either way
        prec = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"

        def grid_mm(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n_out, meta["BN"]),)

        _ternary_mm_kernel[grid_mm](
            *common, HAS_BIAS=bias is not None, RADIX=_RADIX[fmt], DIGITS=digits, FP32_PRECISION=prec,
            DOT_FP32=INTERPRET and x.dtype == torch.bfloat16,
        )
    else:
        raise ValueError(f"path must be 'auto', 'skinny' or 'tiled', got {path!r}")
    return y.view(*x.shape[:-1], n_out)


def supports(layer, x: torch.Tensor) -> bool:
    """Whether the kernels take this PackedLinear call; otherwise the layer unpacks and uses F.linear."""
    packed = layer.packed
    return (
        layer.fmt in FORMATS
        and x.dtype in DTYPES
        and x.device == packed.device
        and (INTERPRET or x.device.type == "cuda")
        and x.dim() >= 1
        and x.shape[-1] == layer.in_features
        and packed.dtype == torch.uint8
        and packed.dim() == 2
        and packed.stride(1) == 1
        and (layer.bias is None or layer.bias.device == packed.device)
        and not (torch.is_grad_enabled() and x.requires_grad)  # no backward: autograd goes to F.linear
    )


def packed_linear_kernel(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The `register_kernel` entry: the fused kernel, or None to let PackedLinear unpack and matmul."""
    if not supports(layer, x):
        return None
    return ternary_linear(x, layer.packed, layer.alphas, layer.bias, layer.fmt, layer.in_features)


def enable_triton_kernels(device_type: str = "cuda", formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Register the Triton kernels for `formats` on `device_type` (tests pass "cpu" under the interpreter).

    Returns the formats registered. Called on import of terdit.deploy when CUDA and Triton are available.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"no Triton kernel for format {fmt!r}")
        register_kernel(fmt, device_type, packed_linear_kernel)
    return list(formats)


def disable_triton_kernels(device_type: str = "cuda", formats: tuple[str, ...] = FORMATS) -> None:
    """Unregister these kernels (leaves any other kernel registered for the same key alone)."""
    for fmt in formats:
        if registered_kernel(fmt, device_type) is packed_linear_kernel:
            unregister_kernel(fmt, device_type)


__all__ = [
    "INTERPRET",
    "SKINNY_MAX_M",
    "disable_triton_kernels",
    "enable_triton_kernels",
    "packed_linear_kernel",
    "supports",
    "ternary_linear",
]
