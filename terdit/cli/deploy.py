"""Deployment sub-commands: export, convert, quantize, bench; each one's flags come from its settings dataclass."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from terdit.cli.args import add_command, settings_from
from terdit.defaults import default_device, device_setting, dtype_setting, overwrite_setting, setting
from terdit.deploy.packed_linear import POLICIES
from terdit.quant.packing import FORMATS
from terdit.quant.ptq import GRANULARITIES, METHODS


@dataclass(kw_only=True)
class ExportArgs:
    """Everything `terdit export` takes (terdit.deploy.export.export_run)."""

    run: str = setting(help="training run folder", positional=True)
    format: str = setting("2bit", choices=FORMATS)
    out: str = setting(help="deploy directory to write")
    dtype: str = dtype_setting("storage dtype of the float tensors", default="fp32")
    ema: bool = setting(True, "pack the raw weights instead of the EMA")
    overwrite: bool = overwrite_setting("deploy directory")
    int8: bool = setting(False, "store the large full-precision matrices (embedders, final adaLN) as int8 rows with "
                         "per-row scales: lossy (<= half a step per weight), about 5 MiB smaller for 600M")


@dataclass
class ConvertArgs:
    """Everything `terdit convert` takes (terdit.deploy.convert.convert_release)."""

    src: str = setting(help="release folder with model_args.pth and consolidated*.pth", positional=True)
    out: str = setting()
    format: str | None = setting(None, "default: 2bit for TerDiT (bytes kept as released), fp for Large-DiT",
                                 choices=[*FORMATS, "fp"])
    dtype: str | None = dtype_setting("default: the release's own")
    overwrite: bool = overwrite_setting("deploy directory")


@dataclass(kw_only=True)
class QuantizeArgs:
    """Everything `terdit quantize` takes (terdit.deploy.quantize.quantize_run)."""

    run: str = setting(help="full-precision run folder (or a Large-DiT release / fp deploy directory)",
                       positional=True)
    method: str = setting("ternary", choices=METHODS)
    granularity: str = setting("tensor", choices=GRANULARITIES)
    out: str = setting(help="run folder to write")
    ema: bool = setting(True)
    overwrite: bool = overwrite_setting("quantized run folder")


@dataclass
class BenchArgs:
    """Everything `terdit bench` takes (terdit.deploy.bench.run_bench)."""

    config: str = setting("TerDiT-600M")
    format: list[str] = setting(help="", choices=FORMATS, nargs="+", default_factory=lambda: ["2bit"])
    policy: list[str] = setting(help="", choices=POLICIES, nargs="+", default_factory=lambda: ["memory", "speed"])
    device: str | None = device_setting("cpu | cuda (default: cuda if present)")
    dtype: str = dtype_setting("compute dtype", default="fp32")
    batch_size: int = setting(2, "images per step; CFG doubles the forward rows", type=int)
    repeats: int = setting(3, "timed steps after one warm-up (median reported)", type=int)
    skip_fp: bool = setting(False, "do not build/measure the full-precision model")
    workdir: str | None = setting(None, "keep the generated checkpoints here")
    seed: int = setting(0, type=int)
    json: bool = setting(False)


def _export(args: argparse.Namespace) -> int:
    from terdit.deploy.export import export_run

    a = settings_from(ExportArgs, args)
    out = export_run(a.run, a.out, a.format, a.dtype, ema=a.ema, int8=a.int8, overwrite=a.overwrite)
    extra = ", large matrices in int8 rows" if a.int8 else ""
    print(f"wrote {out} ({a.format}, float tensors in {a.dtype}{extra})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from terdit.deploy.convert import convert_release

    a = settings_from(ConvertArgs, args)
    out = convert_release(a.src, a.out, a.format, a.dtype, overwrite=a.overwrite)
    print(f"wrote {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from terdit.deploy.quantize import quantize_run

    a = settings_from(QuantizeArgs, args)
    out = quantize_run(a.run, a.out, a.method, a.granularity, ema=a.ema, overwrite=a.overwrite)
    print(f"wrote {out} ({a.method}, per {a.granularity})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from terdit.deploy.bench import format_table, run_bench

    a = settings_from(BenchArgs, args)
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    result = run_bench(a.config, a.format, a.policy, a.device or default_device(), a.dtype, a.batch_size,
                       a.repeats, a.skip_fp, a.workdir, a.seed, log=log)
    print(json.dumps(result, indent=2) if a.json else format_table(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "export", "pack a ternary run into a deploy directory", ExportArgs, _export)

    add_command(subparsers, "convert", "public TerDiT / Large-DiT checkpoint -> deploy directory",
                ConvertArgs, _convert)

    add_command(subparsers, "quantize", "post-training quantization of a full-precision model", QuantizeArgs, _quantize)

    add_command(subparsers, "bench", "deployment efficiency: full precision vs packed ternary", BenchArgs, _bench)

