"""The one dispatch point for fused packed-weight kernels.

`PackedLinear.forward` asks `find_kernel` first; a registered kernel computes x @ (alpha * codes).T + b
straight from the packed bytes, or returns None for a call it does not take (dtype, autograd, ...), and
the layer then unpacks and multiplies. A kernel is registered for a format and device type, and either
for every policy or for one policy only (a policy's own kernel wins over the any-policy one). On import
(`auto_register`), the Triton kernels of `terdit.deploy.triton_kernels` register themselves for
("2bit" | "base3", "cuda") when CUDA and Triton are available, and the integer CPU kernels of
`terdit.deploy.cpu_int8` for ("2bit" | "base3", "cpu", policy "int8" | "int8-packed") when the CPU has
int8 dot-product instructions (VNNI / AMX). `TERDIT_NO_KERNELS=1` disables all of them for A/B checks
(read at every call, and at import: then nothing is registered).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from terdit.deploy.packed_linear import PackedLinear

# fn(layer, x) -> y, or None to decline (the layer then unpacks); `layer.packed` holds the rows layout of `layer.fmt`.
KernelFn = Callable[["PackedLinear", torch.Tensor], "torch.Tensor | None"]

# (fmt, device type, policy or None for every policy) -> kernel
_REGISTRY: dict[tuple[str, str, str | None], KernelFn] = {}


def register_kernel(fmt: str, device_type: str, fn: KernelFn, policy: str | None = None) -> None:
    """Use `fn` for layers of format `fmt` whose input lives on `device_type` ("cuda", "cpu", ...);
    only for layers of that `policy` when one is given."""
    _REGISTRY[(fmt, device_type, policy)] = fn


def unregister_kernel(fmt: str, device_type: str, policy: str | None = None) -> None:
    _REGISTRY.pop((fmt, device_type, policy), None)


def registered_kernel(fmt: str, device_type: str, policy: str | None = None) -> KernelFn | None:
    """What is registered for (fmt, device_type, policy) exactly, ignoring TERDIT_NO_KERNELS."""
    return _REGISTRY.get((fmt, device_type, policy))


def find_kernel(fmt: str, x: torch.Tensor, policy: str | None = None) -> KernelFn | None:
    """The fused kernel for this format, input and layer policy, or None (the caller unpacks and matmuls)."""
    if os.environ.get("TERDIT_NO_KERNELS") == "1":
        return None
    device_type = x.device.type
    fn = _REGISTRY.get((fmt, device_type, policy)) if policy is not None else None
    return fn if fn is not None else _REGISTRY.get((fmt, device_type, None))


def auto_register() -> list[str]:
    """Register the CPU integer kernels (where the CPU has int8 dot products) and the Triton kernels for
    CUDA (when CUDA and Triton are there); nothing when TERDIT_NO_KERNELS=1.

    Returns the CUDA formats registered; [] on CPU-only machines, without Triton, or if it fails to import
    (then every layer keeps the unpack path, which is always correct).
    """
    if os.environ.get("TERDIT_NO_KERNELS") == "1":
        return []
    from terdit.deploy.cpu_int8 import enable_cpu_int8

    enable_cpu_int8()
    if not torch.cuda.is_available():
        return []
    if importlib.util.find_spec("triton") is None:
        from terdit.extras import install_hint

        warnings.warn("terdit: " + install_hint("triton", "Fast packed layers on CUDA"), stacklevel=2)
        return []
    try:
        from terdit.deploy.triton_kernels import enable_triton_kernels
    except Exception as e:  # a broken Triton install must not break loading models
        warnings.warn(f"terdit: Triton kernels not enabled ({type(e).__name__}: {e})", stacklevel=2)
        return []
    return enable_triton_kernels("cuda")


auto_register()
