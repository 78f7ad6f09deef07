"""Write a deploy directory from a model: packed ternary codes, per-layer alpha, full-precision rest.

Works for a QAT model (TernaryLinear: codes from `ternarize` of the latent weight, exactly as its forward
computes them), for a model loaded with `load_deployed` or packed with `pack_` (PackedLinear: its stored
codes, so packed -> model -> packed is bit-exact), and with format "fp" for full-precision models.
`write_deploy_dir` is the one writer: export, convert and save_pretrained of a packed model all go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from terdit.defaults import dtype_name, parse_dtype
from terdit.deploy.format import WEIGHTS_FILE, DeployInfo, write_config
from terdit.deploy.packed_linear import PackedLinear, ternary_codes
from terdit.errors import TerditError
from terdit.io import atomic_dir, check_output, clean_leftovers, save_tensors
from terdit.models.configs import TerDiTConfig
from terdit.quant.int8 import SCALE_SUFFIX, int8_eligible, quantize_rows
from terdit.quant.packing import FORMATS, pack_codes, padding
from terdit.quant.ternary import TernaryLinear

PACKED_SUFFIXES = ("weight", "alphas", "bias", "packed")


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Block linears whose weights are ternary: QAT (TernaryLinear) or deployed (PackedLinear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (TernaryLinear, PackedLinear))}


def layer_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], float32 alpha [1]) of a ternary layer, as its forward uses them."""
    if not isinstance(layer, (TernaryLinear, PackedLinear)):
        raise TypeError(f"not a ternary layer: {type(layer).__name__}")
    return ternary_codes(layer)


@torch.no_grad()
def deploy_tensors(
    model: nn.Module, fmt: str, dtype: torch.dtype, int8: bool = False
) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """The tensors of model.safetensors, the "packed" table and the int8-rows list of the deploy section."""
    layers = packed_layers(model)
    if fmt == "fp" and layers:
        raise TerditError("format 'fp' is for full-precision models; this model has ternary layers")
    if fmt != "fp" and fmt not in FORMATS:
        raise TerditError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt in FORMATS and not layers:
        raise TerditError(
            "the model has no ternary layers to pack (a full-precision model: use PTQ first, "
            "or export with format 'fp')"
        )
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        codes, alpha = layer_codes(layer)
        out_f, in_f = codes.shape
        tensors[f"{name}.weight"] = pack_codes(codes.cpu(), fmt, f"{name}.weight")[0]
        tensors[f"{name}.alphas"] = alpha.cpu()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().to("cpu", dtype)
        table[name] = {"shape": [out_f, in_f], "pad": padding(fmt, out_f, in_f)}
    prefixes = tuple(f"{n}." for n in layers)
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) and key.rsplit(".", 1)[-1] in PACKED_SUFFIXES:
            continue
        value = value.detach().cpu()
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    return tensors, table, (int8_rows(tensors) if int8 else [])


def int8_rows(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Replace the large float matrices of `tensors` by int8 rows + "<key>_scale" (in place); their keys."""
    keys = [k for k, v in tensors.items() if int8_eligible(v)]
    for key in keys:
        tensors[key], tensors[key + SCALE_SUFFIX] = quantize_rows(tensors[key])
    return keys


def export_model(
    model: nn.Module,
    out: str | Path,
    fmt: str,
    dtype: str | torch.dtype = "fp32",
    source: dict[str, Any] | None = None,
    label_permutation: str | None = None,
    int8: bool = False,
) -> Path:
    """Write `model` (with a `.config` TerDiTConfig) as a deploy directory at `out`, atomically.

    `dtype` is the storage dtype of the full-precision tensors; alphas stay float32 and codes are exact.
    `int8`: store the large full-precision matrices as int8 rows (terdit.quant.int8; lossy, smaller).
    A loaded deploy model keeps its class order (`label_permutation` None); its source is replaced by `source`.
    """
    return write_deploy_dir(model, out, fmt, dtype, source=dict(source or {}),
                            label_permutation=label_permutation, int8=int8)


def write_deploy_dir(
    model: nn.Module,
    directory: str | Path,
    fmt: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    source: dict[str, Any] | None = None,
    label_permutation: str | None = None,
    int8: bool | None = None,
    replace: bool = True,
) -> Path:
    """The one deploy writer: `model` (with a `.config` TerDiTConfig) -> config.json + model.safetensors.

    Every fact left None comes from the model's own `deploy` (a model loaded with `load_deployed`): format,
    storage dtype, source, label permutation and whether large float matrices are int8 rows; a QAT model
    has none, so it needs `fmt` (dtype then defaults to fp32). `replace`: build the directory aside and swap
    it in (export, convert); otherwise write the two files into `directory`, which may hold other files
    (save_pretrained, which adds a model card).
    """
    current: DeployInfo | None = getattr(model, "deploy", None)
    fmt = fmt or (current.format if current else None)
    if fmt is None:
        raise TerditError("no deploy format given and the model has none (choose 2bit, base3 or fp)")
    dt = parse_dtype(dtype or (current.dtype if current else "fp32"))
    if int8 is None:
        int8 = bool(current and current.int8_rows)
    tensors, table, int8_keys = deploy_tensors(model, fmt, dt, int8)
    info = DeployInfo(
        format=fmt,
        dtype=dtype_name(dt),
        packed=table,
        int8_rows=int8_keys,
        label_permutation=label_permutation or (current.label_permutation if current else None),
        source=dict(source if source is not None else (current.source if current else {})),
    )
    if replace:
        return write_deploy(directory, model.config, info, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_deploy_files(directory, model.config, info, tensors)
    return directory


def write_deploy(
    out: str | Path, config: TerDiTConfig, info: DeployInfo, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write config.json and model.safetensors into a new directory `out`, atomically."""
    return atomic_dir(out, lambda tmp: write_deploy_files(tmp, config, info, tensors))


def write_deploy_files(directory: Path, config: TerDiTConfig, info: DeployInfo, tensors: dict[str, torch.Tensor]
                       ) -> None:
    """model.safetensors, then config.json (each atomically) into the existing `directory`."""
    save_tensors(
        directory / WEIGHTS_FILE, tensors, metadata={"format": info.format, "terdit_deploy": str(info.version)}
    )
    write_config(directory, config, info)


def check_deploy_out(out: str | Path, src: str | Path, overwrite: bool) -> Path:
    """Refuse an --out that is the source (or holds it, or lies in it), anything but a deploy directory, or a
    deploy directory without `overwrite`; then clean what a crashed earlier write left next to it."""
    from terdit.deploy.format import is_deploy_dir

    out = check_output(out, inputs=[src], own=is_deploy_dir, kind="deploy directory", overwrite=overwrite)
    clean_leftovers(out.parent, (out.name,))
    return out


def export_run(
    run: str | Path, out: str | Path, fmt: str, dtype: str = "fp32", ema: bool = True, int8: bool = False,
    overwrite: bool = False,
) -> Path:
    """Pack the latest checkpoint of a training run (EMA weights by default) into a new deploy directory;
    an existing one is replaced only with `overwrite`."""
    from terdit.models.runs import latest_checkpoint, load_run_model

    check_deploy_out(out, run, overwrite)
    ckpt = latest_checkpoint(run)
    model = load_run_model(run, ema=ema, checkpoint=ckpt)
    if not model.config.ternary:
        raise TerditError(f"{run}: the run is full precision (linear='fp'); only ternary runs can be packed")
    source = {"kind": "run", "run": str(Path(run).resolve()), "checkpoint": ckpt.name, "ema": ema}
    return export_model(model, out, fmt, dtype, source=source, int8=int8)
