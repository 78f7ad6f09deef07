"""Data sub-commands: `terdit extract-latents`. Also runnable alone (``python -m terdit.cli.data``), which
is how ``torchrun --nproc_per_node N -m terdit.cli.data extract-latents ...`` spreads the work."""

from __future__ import annotations

import argparse
import os
import sys

from terdit.cli.args import nonneg_int, positive_int
from terdit.defaults import DTYPES
from terdit.errors import TerditError


def _extract(args: argparse.Namespace) -> int:
    from terdit.data.latents import extract_latents

    manifest = extract_latents(
        args.data, args.out, vae=args.vae, resolution=args.resolution, flip=args.flip, vae_mode=args.vae_mode,
        seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.num_workers,
        strict=args.strict, class_map=args.class_map, store_dtype=args.store_dtype, device=args.device,
        dtype=DTYPES[args.dtype], max_shards=args.max_shards, progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if manifest is None:
            print(f"{args.out}: stopped after --max-shards {args.max_shards}; "
                  "rerun the same command to continue")
        else:
            print(f"{args.out}: {manifest['num_items']} latents {tuple(manifest['latent_shape'])} in "
                  f"{len(manifest['shards'])} shard(s), {manifest['num_classes']} classes, "
                  f"{manifest['num_skipped']} file(s) skipped")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract-latents",
        help="encode an image folder into VAE latents once, for fast training",
        description="Encode root/<class>/*.jpg|png|... through a VAE into sharded, memory-mappable latents. "
                    "Resumable (rerun to continue); under torchrun each process takes its share of shards.",
    )
    p.add_argument("data", help="image folder, one sub-folder per class")
    p.add_argument("--vae", required=True,
                   help="hub id (stabilityai/sd-vae-ft-ema, ...-mse; 'ema'/'mse' for short) "
                        "or a local diffusers directory")
    p.add_argument("--out", required=True, help="latent directory to write (or to continue)")
    p.add_argument("--resolution", type=positive_int, default=256, help="image side after ADM center crop")
    p.add_argument("--flip", action="store_true", help="also store latents of the mirrored images")
    p.add_argument("--vae-mode", choices=["mean", "sample", "moments"], default="mean",
                   help="store the posterior mean, one seeded sample, "
                        "or mean+std (samples then drawn while training)")
    p.add_argument("--seed", type=int, default=0, help="seed for --vae-mode sample")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (per process)")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="images per shard file")
    p.add_argument("--num-workers", type=nonneg_int, default=4, help="image decoding processes (per process)")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable file or empty class")
    p.add_argument("--class-map", help="JSON {folder_name: class_index} instead of sorted folder order")
    p.add_argument("--store-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of stored latents")
    p.add_argument("--device", help="cpu or cuda (default: cuda:LOCAL_RANK if present, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="VAE compute dtype")
    p.add_argument("--max-shards", type=positive_int, help="stop after this many new shards per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_extract)


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
