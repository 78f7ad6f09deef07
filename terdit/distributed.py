"""The one process-group helper: `torchrun`'s group (NCCL on CUDA, gloo on CPU) and the few collectives that
training, sample-npz and extract-latents use."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from terdit.errors import TerditError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this process joined the group (and so leaves it in `close`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (all_gather_object)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        return broadcast_object(obj, self)

    def agree(self, error: str | None) -> None:
        """Every process learns whether any failed; all raise the first message, so none waits forever."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise TerditError(errors[0])

    def close(self) -> None:
        """Leave the group if this process joined it (a caller's group is left alone)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def join_process_group(device_type: str, timeout: datetime.timedelta | None = None) -> None:
    """``init_process_group`` with the backend for the device (NCCL on CUDA, gloo on CPU).

    torch._dynamo is imported first on purpose: importing it after the group exists (diffusers and
    torch.compile do) leaves it holding references to the group, so ``destroy_process_group`` no longer
    frees it. The gloo worker threads then outlive the interpreter and, when one drops the tensors of the
    last collective during shutdown, the process aborts ("terminate called without an active exception").
    The price is dynamo's import (~140 MB resident) in multi-process runs that would not otherwise load it."""
    import torch._dynamo  # noqa: F401  (see above)

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        join_process_group(device_type)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def join_group(device_type: str, timeout: datetime.timedelta | None = None) -> DistInfo:
    """torchrun's group (joined if WORLD_SIZE > 1 and no group exists yet: then `owned`), or a group the
    caller already made; a single process otherwise. Unlike `init_distributed` it sets no CUDA device."""
    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        join_process_group(device_type, timeout=timeout)
        owned = True
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return DistInfo(owned=owned)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
