"""The one dispatch point for fused packed-weight kernels.

`PackedLinear.forward` asks `find_kernel` first; a registered kernel computes x @ (alpha * codes).T + b
straight from the packed bytes, or returns None for a call it does not take (dtype, autograd, ...), and
the layer then unpacks and multiplies. On import (`auto_register`), the Triton kernels of
`terdit.deploy.triton_kernels` register themselves for ("2bit" | "base3", "cuda") when CUDA and Triton
are available; on CPU nothing is registered. `TERDIT_NO_KERNELS=1` disables all of them for A/B checks
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

_REGISTRY: dict[tuple[str, str], KernelFn] = {}


def register_kernel(fmt: str, device_type: str, fn: KernelFn) -> None:
    """Use `fn` for layers of format `fmt` whose input lives on `device_type` ("cuda", "cpu", ...)."""
    _REGISTRY[(fmt, device_type)] = fn


def unregister_kernel(fmt: str, device_type: str) -> None:
    _REGISTRY.pop((fmt, device_type), None)


def registered_kernel(fmt: str, device_type: str) -> KernelFn | None:
    """What is registered for (fmt, device_type), ignoring TERDIT_NO_KERNELS."""
    return _REGISTRY.get((fmt, device_type))


def find_kernel(fmt: str, x: torch.Tensor) -> KernelFn | None:
    """The fused kernel for this format and input, or None (then the caller unpacks and matmuls)."""
    if os.environ.get("TERDIT_NO_KERNELS") == "1":
        return None
    return _REGISTRY.get((fmt, x.device.type))


def auto_register() -> list[str]:
    """Register the Triton kernels for CUDA when CUDA and Triton are there (and TERDIT_NO_KERNELS != 1).

    Returns the formats registered; [] on CPU-only machines, without Triton, or if it fails to import
    (then every layer keeps the unpack path, which is always correct).
    """
    if os.environ.get("TERDIT_NO_KERNELS") == "1" or not torch.cuda.is_available():
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
