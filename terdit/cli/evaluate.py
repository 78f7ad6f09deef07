"""`terdit evaluate` and `terdit make-reference`: ADM's evaluator and its batch format on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from terdit.defaults import default_device
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


def _make_extractor(args: argparse.Namespace):
    import torch

    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise TerditError("--device cuda: no CUDA device is available")
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
    result = evaluate(ref, samples, extractor, batch_size=args.batch_size, progress=not args.no_progress)
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


def register(subparsers) -> None:
    """Add `evaluate` and `make-reference` to the `terdit` command."""
    p = subparsers.add_parser(
        "evaluate", help="FID, sFID, IS, precision and recall of a sample batch (ADM's evaluator)",
        description="Compute ADM's five numbers for SAMPLES.npz against REF.npz (both with arr_0 uint8 NHWC; "
                    "stored mu/sigma statistics in REF are used for FID/sFID as ADM does).")
    p.add_argument("ref", metavar="REF.npz", help="reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("samples", metavar="SAMPLES.npz", help="sample batch (`terdit sample --out X.npz`)")
    p.add_argument("--features", choices=FEATURES, default="inception",
                   help="inception (RGB images, ADM-comparable) or digits (8x8 one-channel digits runs)")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help=f"{WEIGHTS_HELP}; default: ${WEIGHTS_ENV}")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (ADM: 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if present, else cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)

    m = subparsers.add_parser(
        "make-reference", help="write an ADM-format reference batch (arr_0 uint8 NHWC) from images",
        description="SRC is an image folder (center-cropped to --resolution like ADM/DiT's loader), an npz "
                    "with arr_0 (resized when --resolution differs), or 'digits' (the embedded 8x8 digits).")
    m.add_argument("src", metavar="SRC", help="image folder, .npz file, or 'digits'")
    m.add_argument("--out", required=True, metavar="REF.npz", help="output npz")
    m.add_argument("--resolution", type=int, default=None, help="output side length in pixels")
    m.add_argument("--channels", type=int, choices=(1, 3), default=3, help="for image folders: 1 = grayscale")
    m.add_argument("--limit", type=int, default=None, help="keep only the first N images")
    m.set_defaults(func=run_make_reference)
