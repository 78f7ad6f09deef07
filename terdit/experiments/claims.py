"""The paper's claims (and two of terdit's own), each judged held / did not hold / inconclusive / not tested.

Every criterion compares seed means against the spread between seeds (`terdit.experiments.seeds.compare`): a
difference within that noise is "inconclusive", whatever its sign.
"""

from __future__ import annotations

from typing import Any

from terdit.experiments.losses import FINAL_FRACTION
from terdit.experiments.seeds import all_of, compare
from terdit.experiments.variants import FP, VARIANTS

FP_CLOSE_RATIO = 1.25  # claims (a), (f), (g): within 25% of the reference's FID
PTQ_FAIL_RATIO = 2.0  # claim (c): a PTQ model "fails" when its FID is at least twice TerDiT's
LOSS_CLOSE_RATIO = 1.05  # the same claims judged on eval loss when no image metric applies
LOSS_FAIL_RATIO = 1.2
NOISE_RULE = ("held when the difference of the seed means exceeds the noise sqrt(sd_A^2 + (f sd_B)^2) in the "
              "claimed direction, did not hold when it exceeds it the other way, inconclusive otherwise "
              "(sd: standard deviation over training seeds, f: the criterion's factor)")


def final_eval(seed_results: dict[str, Any], name: str, cfg: float, steps: int) -> dict[str, Any] | None:
    """One seed's evaluation of the variant at the last checkpoint and this guidance scale, if it has one."""
    v = seed_results["variants"].get(name)
    if not v:
        return None
    last = [e for e in v["evals"] if e["step"] == steps and e["cfg"] == cfg]
    return last[0] if last else None


def seed_values(results: dict[str, Any], name: str, key: str, cfg: float | None = None) -> list[float | None]:
    """Per seed: the final evaluation's `key` at cfg (default the first), or the variant entry's own `key`."""
    s = results["settings"]
    cfg = s["cfg"][0] if cfg is None else cfg
    out: list[float | None] = []
    for seed_results in results["per_seed"].values():
        if key in ("final_loss",):
            out.append((seed_results["variants"].get(name) or {}).get(key))
        else:
            e = final_eval(seed_results, name, cfg, s["steps"])
            out.append(None if e is None else e.get(key))
    return out


def criteria(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim's statement, criterion and comparisons (A, B, factor): fixed before any number is read."""
    fid = results["metric_mode"] == "digits"
    m, mname = ("fid", "FID") if fid else ("eval_loss", "eval loss")
    close = FP_CLOSE_RATIO if fid else LOSS_CLOSE_RATIO
    fail = PTQ_FAIL_RATIO if fid else LOSS_FAIL_RATIO
    ptq = [n for n in results["variants"] if VARIANTS[n].ptq]

    def c(cid: str, text: str, criterion: str, comparisons: list[tuple[str, str, str, float]]) -> dict[str, Any]:
        return {"id": cid, "claim": text, "criterion": criterion, "comparisons": comparisons}

    return [
        c("a", "TerDiT is close to the full-precision model (Tab. I)",
          f"{mname}(terdit) < {close:g} x {mname}(full-precision)", [(m, "terdit", FP, close)]),
        c("b", "TerDiT beats BitNet b1.58 trained the same way (Sec. IV-B)",
          f"{mname}(terdit) < {mname}(bitnet)", [(m, "terdit", "bitnet", 1.0)]),
        c("c", "PTQ of a trained full-precision model to 2 bits / ternary fails, far behind QAT (Fig. 2, Sec. IV-B)",
          f"for every PTQ variant: {mname}(terdit) < {mname}(PTQ) / {fail:g}",
          [(m, "terdit", p, 1 / fail) for p in ptq]),
        c("d", "The RMSNorm after adaLN lowers the training loss and the FID (Figs. 7, 8)",
          f"final training loss (mean raw loss of the last {FINAL_FRACTION:.0%} of steps) and {mname} both lower "
          f"for terdit than for terdit-no-norm",
          [("final_loss", "terdit", "terdit-no-norm", 1.0), (m, "terdit", "terdit-no-norm", 1.0)]),
        c("e", "Reducing the LR late in training improves the final metrics (Tab. III)",
          f"{mname}(terdit-lr-drop) < {mname}(terdit) at the same total steps", [(m, "terdit-lr-drop", "terdit", 1.0)]),
        c("f", "terdit: 8-bit activations (the CPU integer path's arithmetic) keep TerDiT's quality",
          f"{mname}(terdit-a8) < {close:g} x {mname}(terdit)", [(m, "terdit-a8", "terdit", close)]),
        c("g", "terdit: a data-free distilled student is close to QAT from scratch, at a fraction of its steps",
          f"{mname}(terdit-distilled) < {close:g} x {mname}(terdit)", [(m, "terdit-distilled", "terdit", close)]),
    ]


def judge_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim's verdict from the per-seed numbers at the last checkpoint and the first cfg."""
    out = []
    for c in criteria(results):
        comps = []
        for key, a, b, factor in c["comparisons"]:
            r = compare(seed_values(results, a, key), seed_values(results, b, key), factor)
            comps.append({"metric": key, "a": a, "b": b, **r})
        out.append({**{k: v for k, v in c.items() if k != "comparisons"}, "comparisons": comps,
                    "verdict": all_of([x["outcome"] for x in comps])})
    return out
