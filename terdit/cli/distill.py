"""`terdit distill`: its own flags come from `DistillArgs`, the run-control ones from `TrainArgs`
(terdit.training), so each default is written once and means the same for both commands."""

from __future__ import annotations

import argparse
import dataclasses

from terdit.cli.args import add_settings, settings_from
from terdit.training.distill import DistillArgs
from terdit.training.trainer import TrainArgs

# `terdit train` flags that mean the same for distill; model-shape and init flags come from the teacher instead.
SHARED_TRAIN_FIELDS = {
    "steps", "batch_size", "grad_accum", "lr", "lr_drop_step", "lr_after_drop", "weight_decay", "ema_decay",
    "grad_clip", "seed",
    "ckpt_every", "keep_checkpoints", "log_every", "sample_every", "sample_cfg", "parallel", "device", "precision",
    "grad_checkpointing", "tensorboard", "progress", "resume", "resolution", "vae", "flip", "vae_sample",
    "class_map", "strict_data",
}


def register(sub: argparse._SubParsersAction) -> None:
    from terdit.training import distill

    p = sub.add_parser("distill", help="ternarize a pretrained DiT by data-free distillation from itself",
                       description=(distill.__doc__ or "").split("\n\n")[0])
    add_settings(p, DistillArgs, only=["teacher", "subfolder"])
    add_settings(p, TrainArgs, only=["out", "data"], required=["out"],
                 helps={"data": "real images or latents instead of the teacher's samples"})
    add_settings(p, DistillArgs, exclude=["teacher", "subfolder"])
    # every other run-control flag is `terdit train`'s own (steps, batch size, EMA, checkpoints, resume, ...)
    add_settings(p, TrainArgs, only=SHARED_TRAIN_FIELDS - {f.name for f in dataclasses.fields(DistillArgs)})
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from terdit.training.distill import distill

    last = distill(settings_from(TrainArgs, args), settings_from(DistillArgs, args))
    if last:
        print(f"done: step {last['step']}, student-teacher loss {last['loss']:.5f}; run in {args.out}")
    return 0
