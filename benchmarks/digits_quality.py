"""Do trained digits models draw the class they are asked for?

Trains (or reuses) the default `terdit train` run in ternary and full precision, draws samples for every
class and reports how often a logistic-regression classifier fitted on the real digits' 64 pixels
recognises the intended class. Optionally compares alpha initialisations of the ternary layers.

    python benchmarks/digits_quality.py                    # ternary + full precision, default budget
    python benchmarks/digits_quality.py --alpha-inits absmean randn --steps 1500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from terdit.data.digits import class_accuracy, digits_classifier
from terdit.models import runs as runlib
from terdit.sampling.generate import sample_latents
from terdit.training.trainer import TrainArgs, Trainer


def train_or_reuse(out: Path, steps: int | None, **overrides) -> tuple[Path, float]:
    if runlib.checkpoint_dirs(out):
        return out, float("nan")
    args = TrainArgs(out=str(out), progress=False, tensorboard=False, **overrides)
    if steps is not None:
        args.steps = steps
    t0 = time.perf_counter()
    Trainer(args).run()
    return out, time.perf_counter() - t0


def accuracy(run: Path, per_class: int, cfgs: list[float], steps: int, seed: int, clf) -> dict[str, float]:
    model = runlib.load_run_model(run)
    labels = [c for c in range(model.config.num_classes) for _ in range(per_class)]
    out = {}
    for cfg in cfgs:
        images = sample_latents(model, labels, cfg_scale=cfg, steps=steps, seed=seed)
        out[f"cfg={cfg:g}"] = class_accuracy(images, labels, clf)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench-digits")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: terdit train's default)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha-inits", nargs="*", default=[], help="extra ternary runs with these alpha inits")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    clf = digits_classifier()
    work = Path(args.workdir)
    variants = {"ternary": dict(linear="ternary"), "full-precision": dict(linear="fp")}
    for init in args.alpha_inits:
        variants[f"ternary-alpha-{init}"] = dict(linear="ternary", alpha_init=init)
    results = {}
    for name, overrides in variants.items():
        run, seconds = train_or_reuse(work / name, args.steps, **overrides)
        acc = accuracy(run, args.per_class, args.cfg, args.sample_steps, args.seed, clf)
        # the loss of the last step alone; `terdit reproduce`'s "final loss" is the mean of the last 10%
        last_step_loss = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["loss"]
        results[name] = {"train_seconds": seconds, "last_step_loss": last_step_loss, **acc}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    cols = [f"cfg={c:g}" for c in args.cfg]
    print(f"{'variant':<26} {'train s':>8} {'last-step loss':>14} " + " ".join(f"{c:>9}" for c in cols))
    for name, r in results.items():
        print(f"{name:<26} {r['train_seconds']:>8.0f} {r['last_step_loss']:>14.4f} "
              + " ".join(f"{r[c]:>9.3f}" for c in cols))
    print("accuracy = fraction of samples a logistic regression on real digit pixels assigns their class")


if __name__ == "__main__":
    main()
