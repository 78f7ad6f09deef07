"""The one dispatch point for fused packed-weight kernels.

`PackedLinear.forward` asks `find_kernel` first; a registered kernel computes x @ (alpha * codes).T + b
straight from the packed bytes, or returns None for a call it does not take (dtype, autograd, ...), and
the layer then unpacks and multiplies. A kernel is registered for a format and device type, and either
for every policy or for one policy only (a policy's own kernel wins over the any-policy one). The registry
knows no kernel itself (so nothing here imports them): `terdit.deploy.backends.auto_register` registers
this machine's kernels when the packed layer is imported. `TERDIT_NO_KERNELS=1` disables all of them for
A/B checks (read at every call, and at registration: then nothing is registered).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

# fn(layer, x) -> y, or None to decline (the layer then unpacks); `layer.packed` holds the rows layout of `layer.fmt`
# (`layer.packed_data()` where an "int8" layer on CPU may have released it for its prepacked weight).
KernelFn = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]

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
