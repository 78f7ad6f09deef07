"""Lower bounds on the memory a batch needs, so an impossible batch size is refused before any work
instead of swapping, hanging or failing after minutes."""

from __future__ import annotations

import os

import torch

from terdit.errors import TerditError


def activation_floor(cfg, batch: int, training: bool) -> int:
    """Bytes of one fp32 residual stream for `batch` images, kept for every block when training: a floor
    (training keeps several such tensors per block for backward); 0 for a config that does not say (a
    distilled diffusers student's)."""
    if not all(hasattr(cfg, k) for k in ("input_size", "patch_size", "dim", "depth")):
        return 0
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    return batch * tokens * cfg.dim * (cfg.depth if training else 1) * 4


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the machine's RAM for the CPU; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_batch_fits(cfg, batch: int, device: torch.device, arg: str, training: bool = False) -> None:
    need, have = activation_floor(cfg, batch, training), device_memory(torch.device(device))
    if have is not None and need > have:
        raise TerditError(f"{arg}: a batch of {batch} needs more than {need / 2**30:.0f} GiB, the "
                          f"{torch.device(device).type} has {have / 2**30:.0f} GiB; use a smaller batch")
