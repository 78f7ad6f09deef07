"""The evaluation pipeline end to end on the 8x8 digits, offline on CPU: FID / IS / precision / recall in the
digits classifier's feature space for real held-out digits, for samples of a TerDiT digits run (drawn with
`terdit sample-npz`'s code: DiT's FID protocol) and for pure noise, all against the training digits. The
metrics are only useful if they order these three as real < model < noise; the script checks that, and
also reports how often a logistic regression on raw pixels recognises each sample's class.

    python benchmarks/digits_eval.py [--run RUN] [--num-samples 1000] [--cfg 1.5 4.0] [--json]

Without --run it trains the default digits run (`terdit train` with no arguments, several minutes) into
--train-out, or reuses the run already there. Exit status 1 when the ordering does not hold."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from terdit.data.digits import class_accuracy, digits_classifier
from terdit.eval import DigitsExtractor, evaluate
from terdit.eval.digits import digits_split, digits_uint8
from terdit.sampling.generate import to_uint8
from terdit.sampling.npz import MassSampleArgs, sample_npz


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (N, 8, 8, 1) back to the model's [-1, 1] NCHW, for the pixel classifier."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def default_run(out: Path) -> Path:
    """The run `terdit train` makes with no arguments: reused if `out` already holds a checkpoint."""
    from terdit.models.runs import checkpoint_dirs
    from terdit.training.trainer import TrainArgs, Trainer

    if out.is_dir() and checkpoint_dirs(out):
        print(f"reusing the digits run in {out}")
        return out
    print(f"training the default digits run into {out} (several minutes on CPU)")
    Trainer(TrainArgs(out=str(out))).run()
    return out


def draw(run: Path, n: int, cfg: float, steps: int, seed: int, batch_size: int, work: Path):
    """Samples as `terdit sample-npz` draws them (an open npz with arr_0 and labels)."""
    out = work / f"samples-cfg{cfg}.npz"
    sample_npz(MassSampleArgs(run=str(run), out=str(out), num_samples=n, cfg=cfg, steps=steps, seed=seed,
                              batch_size=batch_size, device="cpu", progress=True))
    return np.load(out)


def per_class_accuracy(images: np.ndarray, labels: np.ndarray, clf) -> tuple[float, list[float]]:
    x = to_model_space(images)
    per = [class_accuracy(x[labels == c], labels[labels == c], clf) if (labels == c).any() else float("nan")
           for c in range(10)]
    return class_accuracy(x, labels, clf), per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a TerDiT digits run (default: train or reuse --train-out)")
    ap.add_argument("--train-out", default="runs/digits", help="where the default run is trained / found")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 4.0], help="guidance scales to evaluate")
    ap.add_argument("--steps", type=int, default=250, help="DDPM steps (DiT's FID protocol: 250)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = ap.parse_args()
    run = Path(args.run) if args.run else default_run(Path(args.train_out))

    extractor = DigitsExtractor()
    clf = digits_classifier()
    ref = digits_uint8("train")
    held_y = digits_split("test")[1]
    rows: dict[str, dict] = {}

    def record(name: str, images: np.ndarray, labels: np.ndarray | None, seconds: float = 0.0) -> None:
        r = evaluate(ref, images, extractor, progress=False)
        row = {"n": len(images), "fid": r.fid, "is": r.inception_score, "precision": r.precision,
               "recall": r.recall, "sample_seconds": round(seconds, 1)}
        if labels is not None:
            row["class_acc"], row["per_class_acc"] = per_class_accuracy(images, labels, clf)
        rows[name] = row

    record("real held-out", digits_uint8("test"), held_y)
    with tempfile.TemporaryDirectory(prefix="digits-eval-") as work:
        for cfg in args.cfg:
            t = time.perf_counter()
            with draw(run, args.num_samples, cfg, args.steps, args.seed, args.batch_size, Path(work)) as z:
                images, labels = z["arr_0"], z["labels"]
            record(f"model cfg {cfg:g}", images, labels, time.perf_counter() - t)
    noise = torch.randn(args.num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    record("gaussian noise", to_uint8(noise), None)

    print(f"\nreference: {len(ref)} training digits; features: digits classifier (64-d); run: {run}; "
          f"{args.steps} DDPM steps")
    print(f"{'batch':<16} {'n':>5} {'FID':>9} {'IS':>6} {'prec':>6} {'recall':>6} {'cls acc':>8}  per-class acc 0..9")
    for name, r in rows.items():
        acc = f"{r['class_acc']:8.3f}" if "class_acc" in r else f"{'-':>8}"
        per = " ".join(f"{a:.2f}" for a in r.get("per_class_acc", []))
        print(f"{name:<16} {r['n']:>5} {r['fid']:>9.3f} {r['is']:>6.2f} {r['precision']:>6.3f} "
              f"{r['recall']:>6.3f} {acc}  {per}")
    real, noise_fid = rows["real held-out"]["fid"], rows["gaussian noise"]["fid"]
    models = {k: v["fid"] for k, v in rows.items() if k.startswith("model")}
    ok = all(real < f < noise_fid for f in models.values())
    print(f"ordering real < model < noise: {'holds' if ok else 'DOES NOT HOLD'} "
          f"({real:.3f} < {', '.join(f'{f:.3f}' for f in models.values())} < {noise_fid:.3f})")
    if args.json:
        print(json.dumps({"run": str(run), "steps": args.steps, "rows": rows, "ordering_holds": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
