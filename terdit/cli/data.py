"""Data sub-commands: `terdit extract-latents`. Also runnable alone (``python -m terdit.cli.data``), which
is how ``torchrun --nproc_per_node N -m terdit.cli.data extract-latents ...`` spreads the work."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from terdit.cli.args import add_command, settings_from
from terdit.defaults import device_setting, dtype_setting, nonneg_int, parse_dtype, positive_int, setting
from terdit.errors import TerditError


@dataclass
class ExtractArgs:
    """Everything `terdit extract-latents` takes (terdit.data.latents.extract_latents)."""

    data: str = setting(help="image folder, one sub-folder per class", positional=True)
    vae: str = setting(help="hub id (stabilityai/sd-vae-ft-ema, ...-mse; 'ema'/'mse' for short) or a local diffusers "
                       "directory")
    out: str = setting(help="latent directory to write (or to continue)")
    resolution: int = setting(256, "image side after ADM center crop", type=positive_int)
    flip: bool = setting(False, "also store latents of the mirrored images")
    vae_mode: str = setting("mean", "store the posterior mean, one seeded sample, or mean+std (samples then drawn "
                            "while training)", choices=["mean", "sample", "moments"])
    seed: int = setting(0, "seed for --vae-mode sample", type=int)
    batch_size: int = setting(32, "images per VAE call (per process)", type=positive_int)
    shard_size: int = setting(4096, "images per shard file", type=positive_int)
    num_workers: int = setting(4, "image decoding processes (per process)", type=nonneg_int)
    strict: bool = setting(False, "fail on any unreadable file or empty class")
    class_map: str | None = setting(None, "JSON {folder_name: class_index} instead of sorted folder order")
    store_dtype: str = setting("fp16", "dtype of stored latents", choices=["fp16", "fp32"])
    device: str | None = device_setting("cpu or cuda (default: cuda:LOCAL_RANK if present, else cpu)")
    dtype: str = dtype_setting("VAE compute dtype", default="fp32")
    max_shards: int | None = setting(None, "stop after this many new shards per process", type=positive_int)
    progress: bool = setting(True, "no progress bar")


def _extract(args: argparse.Namespace) -> int:
    from terdit.data.latents import extract_latents

    a = settings_from(ExtractArgs, args)
    manifest = extract_latents(
        a.data, a.out, vae=a.vae, resolution=a.resolution, flip=a.flip, vae_mode=a.vae_mode, seed=a.seed,
        batch_size=a.batch_size, shard_size=a.shard_size, num_workers=a.num_workers, strict=a.strict,
        class_map=a.class_map, store_dtype=a.store_dtype, device=a.device, dtype=parse_dtype(a.dtype, "dtype"),
        max_shards=a.max_shards, progress=a.progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if manifest is None:
            print(f"{a.out}: stopped after --max-shards {a.max_shards}; rerun the same command to continue")
        else:
            print(f"{a.out}: {manifest['num_items']} latents {tuple(manifest['latent_shape'])} in "
                  f"{len(manifest['shards'])} shard(s), {manifest['num_classes']} classes, "
                  f"{manifest['num_skipped']} file(s) skipped")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "extract-latents", "encode an image folder into VAE latents once, for fast training",
                ExtractArgs, _extract,
                description="Encode root/<class>/*.jpg|png|... through a VAE into sharded, memory-mappable latents. "
                            "Resumable (rerun to continue); under torchrun each process takes its share of shards.")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with only the data sub-commands (same error handling as `terdit`)."""
    from terdit.cli import _Parser

    parser = _Parser(prog="terdit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    register(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TerditError as e:
        print(f"terdit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
