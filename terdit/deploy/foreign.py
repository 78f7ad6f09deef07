"""Packed deploy directories for ternarized *diffusers* transformers (e.g. a distilled DiTTransformer2DModel).

terdit's own deploy directory (terdit.deploy.format) stores a TerDiTConfig; a foreign model keeps its own
class and config instead, so that it loads back into that class and runs in its pipelines (DiTPipeline):

    DIR/config.json           the diffusers config (with "_class_name"), as `from_config` reads it
    DIR/terdit_packed.json    {"version", "format", "dtype", "packed": {layer: {"shape", "pad"}}}
    DIR/model.safetensors     the same tensors as terdit's deploy format (packed "<layer>.weight" uint8,
                              "<layer>.alphas", "<layer>.bias"; everything else under its state-dict name)

On loading, the listed layers become PackedLinear (codes stay packed in memory) in the rebuilt model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from terdit.defaults import dtype_name, parse_dtype
from terdit.deploy.export import deploy_tensors
from terdit.deploy.format import WEIGHTS_FILE
from terdit.deploy.packed_linear import pack_
from terdit.errors import TerditError
from terdit.io import atomic_dir, atomic_write_text, load_tensors, read_json, save_tensors
from terdit.quant.module_swap import names_filter
from terdit.quant.packing import disk_to_rows

CONFIG_FILE = "config.json"
PACKED_FILE = "terdit_packed.json"
VERSION = 1


def is_packed_foreign_dir(path: str | Path) -> bool:
    return (Path(path) / PACKED_FILE).is_file()


def export_foreign(model: nn.Module, out: str | Path, fmt: str = "2bit", dtype: str = "fp32") -> Path:
    """Write a ternarized diffusers model (TernaryLinear layers) as a packed directory at `out`, atomically."""
    if not hasattr(model, "config") or not hasattr(model, "from_config"):
        raise TerditError(f"{type(model).__name__} is not a diffusers model (no config / from_config)")
    dt = parse_dtype(dtype)
    tensors, table, _ = deploy_tensors(model, fmt, dt)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = type(model).__name__
    packed = {"version": VERSION, "format": fmt, "dtype": dtype_name(dt), "packed": table}

    def fill(tmp: Path) -> None:
        save_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": fmt, "terdit_packed": str(VERSION)})
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / PACKED_FILE, json.dumps(packed, indent=2) + "\n")

    return atomic_dir(out, fill)


def load_foreign(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 policy: str = "memory") -> nn.Module:
    """The diffusers model of a packed directory, its ternary layers PackedLinear, in eval mode."""
    import diffusers

    path = Path(path)
    if not is_packed_foreign_dir(path):
        raise TerditError(f"{path}: not a packed diffusers directory (no {PACKED_FILE})")
    config, info = read_json(path / CONFIG_FILE), read_json(path / PACKED_FILE)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise TerditError(f"{path}/{CONFIG_FILE}: diffusers has no model class {config.get('_class_name')!r}")
    fmt, layers = info.get("format"), info.get("packed") or {}
    model = cls.from_config(config)
    for name, entry in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise TerditError(f"{path}/{PACKED_FILE}: {name} is not a layer of {cls.__name__}") from None
        if not isinstance(old, nn.Linear) or [old.out_features, old.in_features] != list(entry["shape"]):
            raise TerditError(f"{path}/{PACKED_FILE}: {name} does not match {cls.__name__}'s layer")
    pack_(model, fmt, policy=policy, filter_fn=names_filter(layers))
    state = load_tensors(path / WEIGHTS_FILE)
    for name, entry in layers.items():
        key = f"{name}.weight"
        if key not in state:
            raise TerditError(f"{path}/{WEIGHTS_FILE}: tensor {key!r} is missing")
        state[f"{name}.packed"] = disk_to_rows(state.pop(key), fmt, tuple(entry["shape"]), f"{path}: {key}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise TerditError(f"{path}/{WEIGHTS_FILE}: does not match {cls.__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad[:3]})")
    floats = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alphas") else v) for k, v in state.items()}
    model.load_state_dict(floats, strict=True)
    return model.to(device).eval()
