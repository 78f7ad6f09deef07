"""`terdit train`: its flags are generated from `TrainArgs` (terdit.training.trainer), where the defaults live."""

from __future__ import annotations

import argparse
import pathlib

from terdit.cli.args import add_command, settings_from
from terdit.training.trainer import TrainArgs


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "train", "train a TerDiT from scratch (QAT); no arguments: tiny model on digits",
                TrainArgs, cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from terdit.models.configs import get_config
    from terdit.training.trainer import train

    get_config(args.config)  # an unknown name fails here, before anything is written
    last = train(settings_from(TrainArgs, args))
    if last:
        samples = pathlib.Path(args.out) / "samples.png"
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; run in {args.out}"
              + (f"; samples: {samples}" if samples.is_file() else ""))
    return 0
