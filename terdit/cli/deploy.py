"""Deployment sub-commands: export, convert, quantize, bench. Registered by terdit.cli."""

from __future__ import annotations

import argparse
import json
import sys

from terdit.cli.args import add_overwrite_arg
from terdit.defaults import DTYPES, default_device
from terdit.deploy.packed_linear import POLICIES
from terdit.quant.packing import FORMATS
from terdit.quant.ptq import GRANULARITIES, METHODS


def _export(args: argparse.Namespace) -> int:
    from terdit.deploy.export import export_run

    out = export_run(args.run, args.out, args.format, args.dtype, ema=not args.no_ema, int8=args.int8,
                     overwrite=args.overwrite)
    extra = ", large matrices in int8 rows" if args.int8 else ""
    print(f"wrote {out} ({args.format}, float tensors in {args.dtype}{extra})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from terdit.deploy.convert import convert_release

    out = convert_release(args.src, args.out, args.format, args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from terdit.deploy.quantize import quantize_run

    out = quantize_run(args.run, args.out, args.method, args.granularity, ema=not args.no_ema,
                       overwrite=args.overwrite)
    print(f"wrote {out} ({args.method}, per {args.granularity})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from terdit.deploy.bench import format_table, run_bench

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    result = run_bench(
        args.config,
        args.format,
        args.policy,
        args.device,
        args.dtype,
        args.batch_size,
        args.repeats,
        args.skip_fp,
        args.workdir,
        args.seed,
        log=log,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="pack a ternary run into a deploy directory")
    p.add_argument("run", help="training run folder")
    p.add_argument("--format", choices=FORMATS, default="2bit")
    p.add_argument("--out", required=True, help="deploy directory to write")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="storage dtype of the float tensors"
    )
    p.add_argument("--no-ema", action="store_true", help="pack the raw weights instead of the EMA")
    add_overwrite_arg(p, "deploy directory")
    p.add_argument(
        "--int8",
        action="store_true",
        help="store the large full-precision matrices (embedders, final adaLN) as int8 rows with per-row "
        "scales: lossy (<= half a step per weight), about 5 MiB smaller for 600M",
    )
    p.set_defaults(func=_export)

    p = subparsers.add_parser("convert", help="public TerDiT / Large-DiT checkpoint -> deploy directory")
    p.add_argument("src", help="release folder with model_args.pth and consolidated*.pth")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--format",
        choices=[*FORMATS, "fp"],
        default=None,
        help="default: 2bit for TerDiT (bytes kept as released), fp for Large-DiT",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: the release's own")
    add_overwrite_arg(p, "deploy directory")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("quantize", help="post-training quantization of a full-precision model")
    p.add_argument("run", help="full-precision run folder (or a Large-DiT release / fp deploy directory)")
    p.add_argument("--method", choices=METHODS, default="ternary")
    p.add_argument("--granularity", choices=GRANULARITIES, default="tensor")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--no-ema", action="store_true")
    add_overwrite_arg(p, "quantized run folder")
    p.set_defaults(func=_quantize)

    p = subparsers.add_parser("bench", help="deployment efficiency: full precision vs packed ternary")
    p.add_argument("--config", default="TerDiT-600M")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["2bit"])
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=["memory", "speed"])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype")
    p.add_argument("--batch-size", type=int, default=2, help="images per step; CFG doubles the forward rows")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (median reported)")
    p.add_argument("--skip-fp", action="store_true", help="do not build/measure the full-precision model")
    p.add_argument("--workdir", default=None, help="keep the generated checkpoints here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: _bench(_with_device(a)))


def _with_device(args: argparse.Namespace) -> argparse.Namespace:
    if args.device is None:
        args.device = default_device()
    return args
