"""Throughput of the evaluation pieces: Inception feature extraction (random weights; the speed does not
depend on the values) and precision/recall on 2048-d features. Usage:
    python benchmarks/eval_throughput.py [--device cuda] [--images 256] [--pr-samples 20000]"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from terdit.eval.inception import FIDInception, InceptionExtractor, prepare
from terdit.eval.metrics import precision_recall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--pr-ref", type=int, default=2000)
    ap.add_argument("--pr-samples", type=int, default=4000)
    args = ap.parse_args()

    ex = InceptionExtractor(prepare(FIDInception()), args.device)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch_size, args.resolution, args.resolution, 3), dtype=np.uint8)
    ex(batch[:2])  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(max(1, args.images // args.batch_size)):
        ex(batch)
    inception_s = time.perf_counter() - t
    n_img = max(1, args.images // args.batch_size) * args.batch_size

    ref = rng.random((args.pr_ref, 2048), dtype=np.float32)
    smp = rng.random((args.pr_samples, 2048), dtype=np.float32)
    t = time.perf_counter()
    precision_recall(ref, smp)
    pr_s = time.perf_counter() - t
    print(json.dumps({"device": args.device, "inception_images_per_s": n_img / inception_s,
                      "pr_seconds": pr_s, "pr_ref": args.pr_ref, "pr_samples": args.pr_samples}))


if __name__ == "__main__":
    main()
