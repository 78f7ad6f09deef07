"""`terdit evaluate` and `terdit make-reference`: ADM's evaluator and its batch format on the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terdit.cli.args import add_command
from terdit.defaults import resolve_device, setting
from terdit.errors import TerditError
from terdit.eval.inception import WEIGHTS_ENV, WEIGHTS_HELP
from terdit.eval.reference import (
    IMAGE_KEY,
    NpzImages,
    images_from_folder,
    load_batch,
    resize_batch,
    write_batch,
)

FEATURES = ("inception", "digits")


@dataclass
class EvaluateArgs:
    """Everything `terdit evaluate` takes."""

    ref: str = setting(help="reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)", positional=True,
                       metavar="REF.npz")
    samples: str = setting(help="sample batch (`terdit sample --out X.npz`)", positional=True, metavar="SAMPLES.npz")
    features: str = setting("inception", "inception (RGB images, ADM-comparable) or digits (8x8 one-channel digits "
                            "runs)", choices=FEATURES)
    inception_weights: str | None = setting(None, f"{WEIGHTS_HELP}; default: ${WEIGHTS_ENV}", metavar="PATH")
    batch_size: int = setting(64, "images per forward pass (ADM: 64)", type=int)
    device: str | None = setting(None, "default: cuda if present, else cpu", choices=("cpu", "cuda"))
    json: bool = setting(False, "print the results as JSON")
    progress: bool = setting(True, "no progress bars")


@dataclass
class MakeReferenceArgs:
    """Everything `terdit make-reference` takes."""

    src: str = setting(help="image folder, .npz file, or 'digits'", positional=True, metavar="SRC")
    out: str = setting(help="output npz", metavar="REF.npz")
    resolution: int | None = setting(None, "output side length in pixels", type=int)
    channels: int = setting(3, "for image folders: 1 = grayscale", type=int, choices=(1, 3))
    limit: int | None = setting(None, "keep only the first N images", type=int)


def _make_extractor(args: argparse.Namespace):
    device = str(resolve_device(args.device))
    if args.features == "digits":
        from terdit.eval.digits import DigitsExtractor

        return DigitsExtractor(device=device)
    from terdit.eval.inception import InceptionExtractor

    return InceptionExtractor.from_weights(args.inception_weights, device)


def run_evaluate(args: argparse.Namespace) -> int:
    from terdit.eval.evaluate import evaluate

    if args.batch_size < 1:
        raise TerditError(f"--batch-size must be at least 1, got {args.batch_size}")
    ref, samples = load_batch(args.ref), load_batch(args.samples)
    extractor = _make_extractor(args)
    result = evaluate(ref, samples, extractor, batch_size=args.batch_size, progress=args.progress)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.format_text())
    return 0


def run_make_reference(args: argparse.Namespace) -> int:
    if args.resolution is not None and args.resolution < 1:
        raise TerditError(f"--resolution must be positive, got {args.resolution}")
    src = Path(args.src)
    if src.is_dir():
        if args.resolution is None:
            raise TerditError(f"{src}: an image folder needs --resolution")
        images = images_from_folder(src, args.resolution, channels=args.channels)
    elif src.is_file():
        images = NpzImages(src).read()
        if args.resolution is not None:
            images = resize_batch(images, args.resolution)
    elif args.src == "digits":
        from terdit.eval.digits import digits_uint8

        images = digits_uint8("all")
        if args.resolution not in (None, 8):
            raise TerditError("digits: the embedded digits are 8x8; leave out --resolution or pass 8")
    else:
        raise TerditError(f"{src}: no such image folder or npz file (or 'digits' for the embedded digits)")
    if args.limit is not None:
        images = images[: args.limit]
    out = write_batch(args.out, np.ascontiguousarray(images))
    print(f"wrote {out}: {IMAGE_KEY} {images.shape} uint8")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `evaluate` and `make-reference` to the `terdit` command."""
    add_command(subparsers, "evaluate", "FID, sFID, IS, precision and recall of a sample batch (ADM's evaluator)",
                EvaluateArgs, run_evaluate,
                description="Compute ADM's five numbers for SAMPLES.npz against REF.npz (both with arr_0 uint8 "
                            "NHWC; stored mu/sigma statistics in REF are used for FID/sFID as ADM does).")
    add_command(subparsers, "make-reference", "write an ADM-format reference batch (arr_0 uint8 NHWC) from images",
                MakeReferenceArgs, run_make_reference,
                description="SRC is an image folder (center-cropped to --resolution like ADM/DiT's loader), an npz "
                            "with arr_0 (resized when --resolution differs), or 'digits' (the embedded 8x8 digits).")
