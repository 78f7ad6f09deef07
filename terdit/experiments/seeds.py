"""Several training seeds: their numbers summarized, two variants compared against the noise between seeds.

A claim is judged on the means over seeds, and only where the difference is larger than the noise the seeds
themselves show; otherwise the verdict is "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

HELD, NOT_HELD, INCONCLUSIVE, NOT_TESTED = "held", "did not hold", "inconclusive", "not tested"
# metrics of an evaluation summarized over seeds (those a results entry has)
METRICS = ("fid", "fid_curve", "inception_score", "precision", "recall", "class_acc", "eval_loss")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of the finite values, and all of them."""
    v = _finite(values)
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v), "values": list(values)}


def compare(a: Sequence[float | None], b: Sequence[float | None], factor: float = 1.0) -> dict[str, Any]:
    """Does A < factor x B hold, given per-seed values of both?

    d = mean(A) - factor * mean(B); noise = sqrt(sd(A)^2 + (factor * sd(B))^2), the spread of a single seed's
    difference. Held when d < -noise, did not hold when d > noise, inconclusive in between (also when a side
    has no value: not tested). With one seed the noise is 0 and the verdict is the plain comparison."""
    sa, sb = summary(a), summary(b)
    if not sa["n"] or not sb["n"]:
        return {"outcome": NOT_TESTED, "a_stats": sa, "b_stats": sb, "factor": factor}
    d = sa["mean"] - factor * sb["mean"]
    noise = math.hypot(sa["std"], factor * sb["std"])
    outcome = HELD if d < -noise else NOT_HELD if d > noise else INCONCLUSIVE
    if noise == 0 and d == 0:
        outcome = INCONCLUSIVE
    paired = [x < factor * y for x, y in zip(a, b) if x is not None and y is not None
              and math.isfinite(x) and math.isfinite(y)]
    return {"outcome": outcome, "difference": d, "noise": noise, "a_stats": sa, "b_stats": sb, "factor": factor,
            "seeds_holding": sum(paired), "seeds_compared": len(paired)}


def all_of(outcomes: Sequence[str]) -> str:
    """A claim made of several comparisons: held if all hold, did not hold if any fails, else inconclusive."""
    if not outcomes or NOT_TESTED in outcomes:
        return NOT_TESTED
    if NOT_HELD in outcomes:
        return NOT_HELD
    return HELD if all(o == HELD for o in outcomes) else INCONCLUSIVE


def summarize_variant(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One variant's entries of every seed (results.json's per-seed rows) as means and spreads.

    Evaluations are matched by (step, cfg); a seed missing one is left out of that summary."""
    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {"label": first["label"], "kind": first["kind"], "seeds": sorted(per_seed)}
    keys = list(dict.fromkeys((e["step"], e["cfg"]) for v in per_seed.values() for e in v["evals"]))
    evals = []
    for step, cfg in keys:
        rows = [next((e for e in v["evals"] if e["step"] == step and e["cfg"] == cfg), None)
                for v in per_seed.values()]
        rows = [r for r in rows if r is not None]
        entry: dict[str, Any] = {"step": step, "cfg": cfg, "num_samples": rows[0]["num_samples"],
                                 "seeds": len(rows)}
        for m in METRICS:
            if any(m in r for r in rows):
                entry[m] = summary([r.get(m) for r in rows])
        for m in ("fid_ci", "class_acc_ci"):
            cis = [r[m] for r in rows if r.get(m)]
            if cis:
                entry[m + "_halfwidth"] = float(np.median([(hi - lo) / 2 for lo, hi in cis]))
        per_class = [r["per_class_acc"] for r in rows if r.get("per_class_acc")]
        if per_class:
            entry["per_class_acc"] = [float(x) for x in np.mean(per_class, axis=0)]
        evals.append(entry)
    out["evals"] = evals
    if first["kind"] == "trained":
        for k in ("final_loss", "train_s", "s_per_step"):
            out[k] = summary([v.get(k) for v in per_seed.values()])
        out["loss_steps"] = first["loss_steps"]
        losses = [v["loss"] for v in per_seed.values() if len(v["loss"]) == len(first["loss"])]
        out["loss_mean"] = [float(x) for x in np.mean(losses, axis=0)] if losses else []
        out["loss_std"] = [float(x) for x in np.std(losses, axis=0)] if losses else []
    return out


def convergence(variant: dict[str, Any], last_step: int, every: int, cfg: float) -> dict[str, Any] | None:
    """Has the variant's FID curve (mean over seeds, fid_curve) flattened by the last checkpoint?

    Criterion: the change over the last evaluation interval is within the seed spread at the last step."""
    curve = {e["step"]: e["fid_curve"] for e in variant["evals"] if e["cfg"] == cfg and "fid_curve" in e}
    prev = max((st for st in curve if st < last_step), default=None)
    if last_step not in curve or prev is None or curve[last_step]["mean"] is None or curve[prev]["mean"] is None:
        return None
    change = curve[last_step]["mean"] - curve[prev]["mean"]
    spread = curve[last_step]["std"]
    return {"from_step": prev, "to_step": last_step, "fid_before": curve[prev]["mean"],
            "fid_after": curve[last_step]["mean"], "change": change, "seed_sd": spread,
            "flattened": abs(change) <= spread, "interval": every}
