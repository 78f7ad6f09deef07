"""The paper's claims, each judged held / did not hold / not tested from the numbers, with its stated criterion."""

from __future__ import annotations

from typing import Any

from terdit.experiments.losses import FINAL_FRACTION
from terdit.experiments.variants import FP, VARIANTS

FP_CLOSE_RATIO = 1.25  # claim (a): TerDiT's FID within 25% of full precision's
PTQ_FAIL_RATIO = 2.0  # claim (c): a PTQ model "fails" when its FID is at least twice TerDiT's
LOSS_CLOSE_RATIO = 1.05  # the same two claims judged on eval loss when no image metric applies
LOSS_FAIL_RATIO = 1.2


def final_eval(results: dict[str, Any], name: str, cfg: float) -> dict[str, Any] | None:
    """The variant's evaluation at the last checkpoint and this guidance scale, if it has one."""
    v = results["variants"].get(name)
    if not v:
        return None
    last = [e for e in v["evals"] if e["step"] == results["settings"]["steps"] and e["cfg"] == cfg]
    return last[0] if last else None


def judge_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the paper's claims, held / did not hold / not tested, from the numbers and stated criteria.

    Image metrics are taken at the last checkpoint and the first cfg; without them (non-digits data) the
    fixed eval loss stands in for FID."""
    cfg = results["settings"]["cfg"][0]
    metric = "fid" if results["metric_mode"] == "digits" else "eval_loss"
    mname = "FID" if metric == "fid" else "eval loss"
    close_ratio = FP_CLOSE_RATIO if metric == "fid" else LOSS_CLOSE_RATIO
    fail_ratio = PTQ_FAIL_RATIO if metric == "fid" else LOSS_FAIL_RATIO
    var = results["variants"]

    def m(name: str) -> float | None:
        e = final_eval(results, name, cfg)
        return None if e is None else e.get(metric)

    def claim(cid: str, text: str, criterion: str, held: bool | None, numbers: dict[str, Any]) -> dict[str, Any]:
        return {"id": cid, "claim": text, "criterion": criterion, "held": held, "numbers": numbers}

    out = []
    t, fp, bn = m("terdit"), m(FP), m("bitnet")
    out.append(claim("a", "TerDiT is close to the full-precision model (Tab. I)",
                     f"{mname}(terdit) <= {close_ratio:g} x {mname}(full-precision)",
                     None if t is None or fp is None else t <= close_ratio * fp,
                     {"terdit": t, "full-precision": fp, "ratio": None if not (t and fp) else t / fp}))
    out.append(claim("b", "TerDiT beats BitNet b1.58 trained the same way (Sec. IV-B)",
                     f"{mname}(terdit) < {mname}(bitnet)",
                     None if t is None or bn is None else t < bn, {"terdit": t, "bitnet": bn}))
    ptq = {n: m(n) for n in var if not VARIANTS[n].trained}
    ptq = {n: x for n, x in ptq.items() if x is not None}
    fails = {n: x >= fail_ratio * t for n, x in ptq.items()} if t is not None else {}
    out.append(claim("c", "PTQ of a trained full-precision model to 2 bits / ternary fails, far behind QAT "
                     "(Fig. 2, Sec. IV-B)",
                     f"every PTQ variant has {mname} >= {fail_ratio:g} x {mname}(terdit)",
                     None if not fails else all(fails.values()),
                     {"terdit": t, **ptq, "failed": fails}))
    nn_ = m("terdit-no-norm")
    loss_t = var.get("terdit", {}).get("final_loss")
    loss_nn = var.get("terdit-no-norm", {}).get("final_loss")
    held = None if None in (t, nn_, loss_t, loss_nn) else (loss_t < loss_nn and t < nn_)
    out.append(claim("d", "The RMSNorm after adaLN lowers the training loss and the FID (Figs. 7, 8)",
                     f"final training loss (mean of the last {FINAL_FRACTION:.0%} of steps) and {mname} both "
                     f"lower for terdit than terdit-no-norm",
                     held, {"loss terdit": loss_t, "loss terdit-no-norm": loss_nn, f"{mname} terdit": t,
                            f"{mname} terdit-no-norm": nn_}))
    d = m("terdit-lr-drop")
    out.append(claim("e", "Reducing the LR late in training improves the final metrics (Tab. III)",
                     f"{mname}(terdit-lr-drop) < {mname}(terdit) at the same total steps",
                     None if d is None or t is None else d < t, {"terdit-lr-drop": d, "terdit": t}))
    return out


def verdict(held: bool | None) -> str:
    """How the report and the command line word a claim's outcome."""
    return {True: "held", False: "did not hold", None: "not tested"}[held]
