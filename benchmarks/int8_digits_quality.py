"""Quality of the CPU integer path on the digits: samples of the int8 policy (8-bit per-token activations) against
the exact packed path (memory policy), same model, same noise, several sampling seeds.

Each ternary run is exported to a 2-bit deploy folder once; both policies load that folder, so the weights are
identical and only the activation rounding differs. Every (run, seed) is measured with terdit reproduce's
Evaluator: FID in the digits-classifier feature space against all real digits, and class accuracy, at guidance
--cfg. The table gives mean ± sd over all (run, seed) pairs and the paired int8 - exact difference, so the gap can
be read against the seed spread of the exact path.

    terdit train --out runs/t0 --seed 0          # ternary digits runs (any number; --act-bits 8 runs too)
    python benchmarks/int8_digits_quality.py --runs runs/t0 runs/t1 runs/t2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from terdit.deploy import export_model, load_deployed
from terdit.experiments.evaluation import Evaluator
from terdit.experiments.variants import Settings
from terdit.models import runs as runlib

POLICIES = ("memory", "int8")  # the exact packed path, the integer path


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4g}" if values else "-"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def measure(runs: list[Path], seeds: list[int], a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            deploy = Path(tmp) / run.name
            export_model(runlib.load_run_model(run), deploy, "2bit")
            for seed in seeds:
                ev = Evaluator(Settings(out=tmp, num_samples=a.num_samples, sample_steps=a.sample_steps, cfg=[a.cfg],
                                        seed=seed, progress=False), torch.device("cpu"))
                row = {"run": str(run), "seed": seed}
                for policy in POLICIES:
                    m = ev.measure(load_deployed(deploy, policy=policy), a.cfg, None)
                    row[policy] = {"fid": m["fid"], "class_acc": m["class_acc"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{len(rows)} (run, seed) pairs, guidance {rows[0].get('cfg', '')}")
    print(f"{'metric':<10} {'exact (memory)':>18} {'int8':>18} {'int8 - exact':>18}")
    for metric in ("fid", "class_acc"):
        exact = [r["memory"][metric] for r in rows]
        int8 = [r["int8"][metric] for r in rows]
        diff = [i - e for i, e in zip(int8, exact)]
        print(f"{metric:<10} {_mean_sd(exact):>18} {_mean_sd(int8):>18} {_mean_sd(diff):>18}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="ternary digits run folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--num-samples", type=int, default=250)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    rows = measure([Path(r) for r in a.runs], a.seeds, a)
    for r in rows:
        r["cfg"] = a.cfg
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    report(rows)


if __name__ == "__main__":
    main()
