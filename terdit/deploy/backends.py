"""Which fused kernels this machine gets: the integer CPU kernels of `terdit.deploy.cpu_int8` for
("2bit" | "base3", "cpu", policy "int8" | "int8-packed") - declining every call where the CPU lacks int8 dot
products (VNNI / AMX) - and the Triton kernels of `terdit.deploy.triton_kernels` for ("2bit" | "base3",
"cuda") when CUDA and Triton are there. `terdit.deploy.packed_linear` runs `auto_register()` on import;
the registry (`terdit.deploy.kernels`) itself imports no kernel, so the kernels can import it."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch


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

