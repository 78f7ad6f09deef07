"""`terdit configs` (the named model configs) and `terdit info PATH` (what a model is, weighs and needs)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from terdit.cli.args import add_command
from terdit.defaults import positive_int, setting


@dataclass
class ConfigsArgs:
    """Everything `terdit configs` takes."""

    json: bool = setting(False)


@dataclass
class InfoArgs:
    """Everything `terdit info` takes (see terdit.loading.info.describe)."""

    path: str = setting(help="run folder, deploy / pretrained / pipeline directory, or config name", positional=True,
                        metavar="PATH")
    resolution: int | None = setting(None, "image resolution in pixels for the memory estimate (default: the "
                                     "model's native one)", type=positive_int)
    batch_size: int = setting(1, "images sampled at once (memory estimate)", type=positive_int)
    json: bool = setting(False, "print JSON")


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "configs", "list the named model configs", ConfigsArgs, cmd_configs)

    add_command(sub, "info", "config, parameter counts, bits per weight, size and memory estimate of a model",
                InfoArgs, cmd_info)


def cmd_configs(args: argparse.Namespace) -> int:
    import torch

    from terdit.models import CONFIGS, TerDiT, get_config

    rows = []
    for name in CONFIGS:
        cfg = get_config(name)
        with torch.device("meta"):
            counts = TerDiT(cfg).parameter_counts()
        rows.append({"name": name, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.n_heads,
                     "input": f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels}", **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'name':<14} {'dim':>5} {'depth':>5} {'heads':>5} {'input':>9} {'params':>14} {'ternary':>14}")
        for r in rows:
            print(f"{r['name']:<14} {r['dim']:>5} {r['depth']:>5} {r['heads']:>5} {r['input']:>9} "
                  f"{r['total']:>14,} {r['ternary']:>14,}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from terdit.loading.info import describe, format_report

    info = describe(args.path, resolution=args.resolution, batch_size=args.batch_size)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
