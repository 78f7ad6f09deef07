"""`load_deployed`: a deploy directory or a public release -> a TerDiT ready for sampling.

The model is built on the meta device, its ternary layers are swapped for PackedLinear (`pack_`), and only then
is memory allocated: packed bytes for the ternary layers, the compute dtype for the rest. Tensors are
read one at a time straight into their final buffers, so a 4.2B model never holds its full-precision
weights (nor a second copy of the file) in memory.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from terdit.defaults import parse_dtype
from terdit.deploy.cpu_int8 import INT8_POLICIES
from terdit.deploy.format import WEIGHTS_FILE, DeployInfo, read_config
from terdit.deploy.packed_linear import (
    POLICIES,
    PackedLinear,
    chunk_ffn_,
    compile_int8_,
    pack_,
    reserve_scratch,
    warm_cache,
)
from terdit.deploy.public import read_release
from terdit.deploy.tensorfile import TensorFile
from terdit.errors import TerditError
from terdit.models.configs import TerDiTConfig
from terdit.models.kinds import Kind, kind_of
from terdit.models.terdit import TerDiT
from terdit.quant.int8 import SCALE_SUFFIX, dequantize_rows
from terdit.quant.module_swap import names_filter
from terdit.quant.packing import FORMATS, check_rows, disk_to_rows, packed_shape, padding


class TensorSource(Protocol):
    path: Path

    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor: ...


def build_model(
    config: TerDiTConfig, fmt: str, device: torch.device | str, dtype: torch.dtype, policy: str = "memory"
) -> TerDiT:
    """An uninitialised TerDiT whose ternary layers are PackedLinear (for a packed `fmt`): built on the meta
    device, packed by module swap (`pack_`), then given memory on `device`."""
    with torch.device("meta"):
        model = TerDiT(config).to(dtype)
    if fmt in FORMATS:
        pack_(model, fmt, policy=policy, filter_fn=names_filter(model.ternary_layers()))
    return materialize_empty(model, device)


def materialize_empty(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Module.to_empty without its empty_like on meta tensors, which runs torch's Python reference
    implementation and imports sympy (~500 modules, ~35 MB resident in a deployment process)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                setattr(mod, name, nn.Parameter(empty, requires_grad=p.requires_grad))
        for name, b in list(mod._buffers.items()):
            if b is not None:
                persistent = name not in mod._non_persistent_buffers_set
                mod.register_buffer(name, torch.empty(b.shape, dtype=b.dtype, device=device), persistent=persistent)
    return module


def _check(source: TensorSource, key: str, shape: tuple[int, ...], float_ok: bool = True) -> None:
    if key not in source:
        raise TerditError(f"{source.path}: tensor {key!r} is missing")
    got = tuple(source.shape(key))
    if got != tuple(shape):
        raise TerditError(f"{source.path}: tensor {key!r} has shape {got}, expected {tuple(shape)}")
    if float_ok and not source.dtype(key).is_floating_point:
        raise TerditError(f"{source.path}: tensor {key!r} has dtype {source.dtype(key)}, expected a float dtype")


def _read_to(source: TensorSource, key: str, target: torch.Tensor) -> None:
    """Copy tensor `key` into `target` (casting), reading in place when dtype and device already match."""
    if source.dtype(key) == target.dtype and target.device.type == "cpu" and target.is_contiguous():
        source.read_into(key, target)
    else:
        target.copy_(source.read(key))


@torch.no_grad()
def _fill_packed(source: TensorSource, name: str, layer: PackedLinear, fmt: str) -> None:
    key = f"{name}.weight"
    shape = (layer.out_features, layer.in_features)
    _check(source, key, packed_shape(fmt, *shape), float_ok=False)
    if source.dtype(key) != torch.uint8:
        raise TerditError(f"{source.path}: tensor {key!r} has dtype {source.dtype(key)}, expected packed uint8")
    if fmt == "base3" and layer.packed.device.type == "cpu":
        source.read_into(key, layer.packed)  # on-disk base3 is the rows layout
        check_rows(layer.packed, fmt, f"{source.path}: {key}")
    else:
        rows = disk_to_rows(source.read(key), fmt, shape, f"{source.path}: {key}")
        layer.packed.copy_(rows)
    _check(source, f"{name}.alphas", (1,))
    layer.alphas.copy_(source.read(f"{name}.alphas"))
    if layer.bias is not None:
        _check(source, f"{name}.bias", (layer.out_features,))
        _read_to(source, f"{name}.bias", layer.bias.data)


def _fill_int8_rows(source: TensorSource, key: str, target: torch.Tensor) -> None:
    """A float matrix stored as int8 rows + per-row scales (see terdit.quant.int8)."""
    _check(source, key, tuple(target.shape), float_ok=False)
    if source.dtype(key) != torch.int8:
        raise TerditError(f"{source.path}: tensor {key!r} is listed in int8_rows but has dtype {source.dtype(key)}")
    _check(source, key + SCALE_SUFFIX, (target.shape[0],))
    w = dequantize_rows(source.read(key), source.read(key + SCALE_SUFFIX), f"{source.path}: {key}")
    target.data.copy_(w)


@torch.no_grad()
def fill_model(model: TerDiT, source: TensorSource, info: DeployInfo) -> None:
    """Read every tensor of `model` from `source`, checking names, shapes, dtypes and packed values."""
    used: set[str] = set()
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if info.packed and set(info.packed) != set(packed):
        extra = sorted(set(info.packed) ^ set(packed))[:3]
        raise TerditError(f"{source.path}: the packed layers listed in the config do not match the model ({extra})")
    for name, layer in packed.items():
        entry = info.packed.get(name)
        if entry is not None and (
            list(entry.get("shape", [])) != [layer.out_features, layer.in_features]
            or entry.get("pad") != padding(info.format, layer.out_features, layer.in_features)
        ):
            raise TerditError(f"{source.path}: config entry for {name} ({entry}) does not match the model")
        _fill_packed(source, name, layer, info.format)
        used.update(f"{name}.{s}" for s in ("weight", "alphas", "bias"))
    prefixes = tuple(f"{n}." for n in packed)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    int8_keys = set(info.int8_rows)
    for key, target in tensors.items():
        if key.startswith(prefixes):
            continue
        if key in int8_keys:
            _fill_int8_rows(source, key, target)
            used.update((key, key + SCALE_SUFFIX))
            continue
        _check(source, key, tuple(target.shape))
        _read_to(source, key, target.data)
        used.add(key)
    if int8_keys - set(tensors):
        raise TerditError(f"{source.path}: int8_rows lists unknown tensors {sorted(int8_keys - set(tensors))[:3]}")
    unexpected = sorted(set(source.keys()) - used)
    if unexpected:
        raise TerditError(f"{source.path}: unexpected tensors {unexpected[:3]} (a different model config?)")


def load_deployed(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    policy: str = "memory",
) -> TerDiT:
    """A deploy directory (`terdit export` / `convert`) or a public release directory -> TerDiT, eval mode.

    Ternary layers stay packed (see PackedLinear for `policy`: "memory" or "speed"); everything else is
    in `dtype`. The model has TerDiT's forward(x, t, y), plus `deploy`, its typed deploy facts (a
    `DeployInfo`: format, dtype, label permutation, source, packed table), which the model card and
    `write_deploy_dir` read.
    """
    if policy not in POLICIES:
        raise TerditError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    dt = parse_dtype(dtype)
    path = Path(path)
    source: TensorSource
    kind = kind_of(path)
    if kind is Kind.DEPLOY:
        config, info = read_config(path)
        source = TensorFile(path / WEIGHTS_FILE)
    elif kind is Kind.RELEASE:
        config, info, source = read_release(path)
    elif not path.exists():
        raise TerditError(f"{path} does not exist")
    else:
        raise TerditError(
            f"{path}: neither a deploy directory (config.json with a 'deploy' section) nor a "
            f"release directory (model_args.pth)"
        )
    if (info.format in FORMATS) != config.ternary:
        raise TerditError(f"{path}: format {info.format!r} does not fit a model with linear={config.linear!r}")
    model = build_model(config, info.format, device, dt, policy)
    fill_model(model, source, info)
    model.deploy = info
    model.register_to_config(label_permutation=info.label_permutation)  # forward maps ImageNet ids itself
    model.eval().requires_grad_(False)
    chunk_ffn_(model)  # the same rule for full precision: the baseline gets the same saving
    release_free_heap()
    if _malloc_trim() is not None and info.format in FORMATS:  # full-precision models never unpack
        for block in model.layers:
            block.register_forward_hook(_trim_heap_after_block)
    if policy in ("speed", "int8"):
        warm_cache(model, dt)
        release_free_heap()  # the unpacking's temporaries
    else:
        reserve_scratch(model, dt)
    if policy in INT8_POLICIES:
        compile_int8_(model)  # each block compiles on first call, around its int8 layers
    return model


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on other platforms and C libraries."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim; a no-op elsewhere).

    Loading converts layer after layer through short-lived buffers; glibc keeps the freed pages mapped
    between the long-lived packed weights, which showed up as ~150 MB of extra resident memory for 4.2B.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _free_heap_bytes() -> Callable[[], int] | None:
    """Bytes glibc holds free in its heaps (mallinfo2().fordblks), or None where unavailable."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return lambda: fn().fordblks


# Trim after a block only when glibc holds more than this free (its own top-of-heap threshold is up to
# 64 MiB): small models then never pay for re-faulting pages, large ones stay near their live memory.
TRIM_FREE_BYTES = 64 * 2**20
# The policies whose blocks trim: "memory" only. Its unpacked weights come and go with every call; "int8-packed"
# unpacks into the reused scratch, and trimming after its blocks re-faulted the freed activations in the next:
# 600M, batch 4, 2 threads, compiled blocks, 6 alternating rounds in one process: 419 k faults and 1.13 s of
# kernel time a step against 123 k and 0.38 s, the step 1.22x slower (median; 0.97-1.46x), for a peak 20-24 MiB
# lower (797-800 vs 819-823 MiB, one process each). `int8` was measured so before (terdit/deploy/README.md).
TRIM_POLICIES: tuple[str, ...] = ("memory",)


@torch.compiler.disable  # a block compiled by compile_int8_ calls it after its graph, eagerly (ctypes)
def _trim_heap_after_block(block: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Memory policy on CPU: hand the block's freed activations back to the OS before the next block.

    Without it glibc keeps them mapped and fragmented; for 4.2B the heap's high-water mark was about
    twice the largest block's live activations (+110 to +240 MiB of resident memory, varying run to
    run). Re-faulting the pages in the next block costs about 1-3% of a step.
    """
    wq = next((m for m in block.modules() if isinstance(m, PackedLinear)), None)
    if output.device.type != "cpu" or wq is None or wq.policy not in TRIM_POLICIES:
        return
    free = _free_heap_bytes()
    if free is None or free() > TRIM_FREE_BYTES:
        release_free_heap()


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights (in the rows layout) of a deployed model."""
    return sum(m.packed.numel() for m in model.modules() if isinstance(m, PackedLinear))


__all__ = ["build_model", "fill_model", "load_deployed", "packed_bytes"]
