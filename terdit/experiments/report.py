"""report.md of `terdit reproduce`, rendered from the template report.md.tmpl.

The template holds the report's text as named sections in document order; this module decides which sections
a set of results has (digits metrics or eval loss only, figures present or not) and fills in their fields and
table rows. The wording lives in the template, so changing it needs no code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

from terdit.experiments.claims import NOISE_RULE, final_eval
from terdit.experiments.losses import SMOOTHING
from terdit.experiments.variants import FULL_BUDGET, QUICK_BUDGET

TEMPLATE = "report.md.tmpl"
_MARK = "%% "  # a line starting with this names the section that follows


class ReportTemplate:
    """Named sections of a template text; each is filled with str.format_map."""

    def __init__(self, text: str) -> None:
        self.sections: dict[str, str] = {}
        name: str | None = None
        body: list[str] = []
        for line in [*text.splitlines(), _MARK + "end"]:
            if line.startswith(_MARK):
                if name is not None:
                    self.sections[name] = "\n".join(body)
                name, body = line[len(_MARK):].strip(), []
            else:
                body.append(line)

    def text(self, section: str, /, **fields: Any) -> str:
        return self.sections[section].format_map(fields)

    def lines(self, section: str, /, **fields: Any) -> list[str]:
        return self.text(section, **fields).split("\n")


@lru_cache(maxsize=1)
def load_template() -> ReportTemplate:
    """The installed report.md.tmpl (package data of terdit.experiments)."""
    return ReportTemplate(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))


def _fmt(x: float | None, digits: int = 3) -> str:
    """A number as the tables show it: 3 significant digits, whole above 1000, a dash when missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _row(name: str, cells: list[str]) -> str:
    """One Markdown table row."""
    return f"| {name} | " + " | ".join(cells) + " |"


def _digits(results: dict[str, Any]) -> bool:
    return results["metric_mode"] == "digits"


def _ms(s: dict[str, Any] | None, digits: int = 3) -> str:
    """A summary over seeds as `mean ± sd` (just the mean with one seed)."""
    if not s or s.get("mean") is None:
        return "–"
    return _fmt(s["mean"], digits) + (f" ± {_fmt(s['std'], 2)}" if s["n"] > 1 else "")


def _summary_eval(r: dict[str, Any], name: str, cfg: float) -> dict[str, Any]:
    steps = r["settings"]["steps"]
    return next((e for e in r["variants"][name]["evals"] if e["step"] == steps and e["cfg"] == cfg), {})


def _budget(t: ReportTemplate, s: dict[str, Any]) -> str:
    """Which budget the settings are, and what the command changed of it."""
    base = QUICK_BUDGET if s["quick"] else FULL_BUDGET
    changed = ", ".join(f"{k} {s[k]}" for k, v in base.items() if k in s and s[k] != v)  # older results lack some
    name = t.text("budget_quick" if s["quick"] else "budget_full")
    return t.text("budget_changed", budget=name, changed=changed) if changed else name


# -- the sections, in document order: each returns its lines (none when it does not apply) --------------------------
def _header(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s, m, cfgs = r["settings"], r["machine"], r["settings"]["cfg"]
    seed_wall = ", ".join(f"seed {k}: {v:.0f} s" for k, v in r.get("seed_wall_s", {}).items())
    cost = r.get("cost") or {}
    ledger = r.get("invocations") or [{"wall_s": r["wall_s"]}]
    fields = {**s, "command": r["command"], "wall_s": r["wall_s"], "n_seeds": len(s["seeds"]),
              "n_invocations": len(ledger), "total_wall_h": sum(e["wall_s"] for e in ledger) / 3600,
              "train_h": cost.get("train_s", 0.0) / 3600, "eval_h": cost.get("eval_s", 0.0) / 3600,
              "budget": _budget(t, s),
              "jobs": min(len(s["seeds"]), s["jobs"] or len(s["seeds"])), "seed_wall": seed_wall or "–",
              "seeds": ", ".join(map(str, s["seeds"])),
              "platform": m["platform"], "cores": m.get("usable_cores", m["cpu_count"]), "torch": m["torch"],
              "cuda": m["cuda"] or "none", "load": m.get("load_average_at_start"),
              "data": s["data"] or t.text("data_digits"), "first_cfg": cfgs[0],
              "other_cfgs": ", ".join(f"{c:g}" for c in cfgs[1:]) or "–"}
    lines = t.lines("header", **fields)
    if not _digits(r):
        return lines + t.lines("metrics_loss")
    real, size = r.get("real_data") or {}, r.get("fid_at_this_size") or {}
    return lines + t.lines("metrics_digits", **s, distinct=real.get("distinct_images", "–"),
                           real_fid=_fmt(real.get("fid")), real_fid_curve=_fmt(size.get("real_fid_curve")),
                           held_out=size.get("held_out", "–"), reference_train=size.get("reference_train", "–"),
                           fid_held_out=_fmt(size.get("fid_held_out")), fid_inside=_fmt(size.get("fid_inside")))


def _criteria(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    rows = [t.text("criterion", **c) for c in r["claims"]]
    return t.lines("criteria", cfg=r["settings"]["cfg"][0], rule=NOISE_RULE, criteria="\n".join(rows))


def _final_row(r: dict[str, Any], name: str, cfg: float) -> str:
    v = r["variants"][name]
    e = _summary_eval(r, name, cfg)
    tail = [_ms(v.get("final_loss"), 4), _fmt((v.get("train_s") or {}).get("mean"), 4)]
    if not _digits(r):
        return _row(name, [_ms(e.get("eval_loss"), 4), *tail])
    return _row(name, [_ms(e.get("fid")), _fmt(e.get("fid_ci_halfwidth"), 2), _ms(e.get("inception_score")),
                       _ms(e.get("precision")), _ms(e.get("recall")), _ms(e.get("class_acc")),
                       _ms(e.get("eval_loss"), 4), *tail])


def _last_checkpoint(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s, digits, lines = r["settings"], _digits(r), []
    for cfg in s["cfg"] if digits else s["cfg"][:1]:  # the eval loss does not depend on the guidance scale
        rows = [_final_row(r, n, cfg) for n in r["variants"]]
        real = r.get("real_data")
        if digits and real and cfg == s["cfg"][0]:
            ci = real.get("fid_ci")
            rows.append(_row(f"real digits ({real['num_samples']})",
                             [_fmt(real["fid"]), _fmt((ci[1] - ci[0]) / 2, 2) if ci else "–"]
                             + [_fmt(real[k]) for k in ("inception_score", "precision", "recall", "class_acc")]
                             + ["–"] * 3))
        n = s["num_samples"] if cfg == s["cfg"][0] else s["curve_samples"]
        lines += t.lines("last_checkpoint_digits" if digits else "last_checkpoint_loss", cfg=cfg, n=n,
                         n_seeds=len(s["seeds"]), rows="\n".join(rows))
    return lines + t.lines("table_note")


def _comparison(t: ReportTemplate, c: dict[str, Any]) -> str:
    metric = {"fid": "FID", "final_loss": "final loss", "eval_loss": "eval loss"}.get(c["metric"], c["metric"])
    if c["outcome"] == "not tested":
        return f"{metric}: {c['a']} vs {c['b']} not both measured"
    sa, sb = c["a_stats"], c["b_stats"]
    return t.text("comparison", metric=metric, a=c["a"], b=c["b"], factor="" if c["factor"] == 1 else
                  f"{c['factor']:g} x ", a_mean=_fmt(sa["mean"]), a_sd=_fmt(sa["std"], 2), b_mean=_fmt(sb["mean"]),
                  b_sd=_fmt(sb["std"], 2), d=_fmt(c["difference"]), noise=_fmt(c["noise"]), k=c["seeds_holding"],
                  n=c["seeds_compared"])


def _claims(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    claims = [t.text("claim", id=c["id"], claim=c["claim"], verdict=c["verdict"],
                     comparisons="; ".join(_comparison(t, x) for x in c["comparisons"])) for c in r["claims"]]
    return t.lines("claims", claims="\n".join(claims))


def _convergence(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    conv = {n: c for n, c in (r.get("convergence") or {}).items() if c}
    if not conv:
        return []
    c0 = next(iter(conv.values()))
    rows = [_row(n, [_fmt(c["fid_before"]), _fmt(c["fid_after"]), _fmt(c["change"]), _fmt(c["seed_sd"]),
                     "yes" if c["flattened"] else "no"]) for n, c in conv.items()]
    return t.lines("convergence", curve_samples=r["settings"]["curve_samples"], every=c0["interval"],
                   before_step=c0["from_step"], after_step=c0["to_step"], rows="\n".join(rows))


def _over_training(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    cfg, digits = r["settings"]["cfg"][0], _digits(r)
    evals = [(n, e) for n, v in r["variants"].items() if v["kind"] == "trained" for e in v["evals"] if e["cfg"] == cfg]
    if not evals:
        return []
    key = "fid_curve" if digits else "eval_loss"
    label = f"FID@{r['settings']['curve_samples']} / class acc" if digits else "eval loss"
    steps = sorted({e["step"] for _, e in evals})

    def cell(e: dict[str, Any] | None) -> str:
        if e is None:
            return "–"
        return _ms(e.get(key)) + (f" / {_fmt((e.get('class_acc') or {}).get('mean'))}" if digits else "")

    rows = []
    for n in dict.fromkeys(n for n, _ in evals):
        by_step = {e["step"]: e for m, e in evals if m == n}
        rows.append(_row(n, [cell(by_step.get(st)) for st in steps]))
    return t.lines("over_training", label=label, cfg=cfg, header=_row("Models", [str(x) for x in steps]),
                   rule="|---|" + "---|" * len(steps), rows="\n".join(rows))


def _per_class(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    if not _digits(r):
        return []
    cfg = r["settings"]["cfg"][-1]
    rows = [_row(n, [_fmt(x, 2) for x in _summary_eval(r, n, cfg).get("per_class_acc") or []])
            for n in r["variants"]]
    return t.lines("per_class", cfg=cfg, rows="\n".join(rows))


def _loss_curves(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    steps = r["settings"]["steps"]
    window = 1 / (1 - SMOOTHING)
    share = (t.text("share_part", percent=100 * window / steps, steps=steps) if window < steps
             else t.text("share_whole", steps=steps))
    return t.lines("loss_curves", smoothing=SMOOTHING, window=window, share=share)


def _first_seed(r: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return next(iter(r["per_seed"].items()))


def _adaln(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    seed, first = _first_seed(r)
    scales = first.get("adaln_scale") or {}
    if not scales:
        return []
    rows = [_row(n, [str(a["block"]), *(_fmt(a[k]) for k in ("min", "median", "max", "std"))])
            for n, a in scales.items()]
    return t.lines("adaln", seed=seed, rows="\n".join(rows))


def _samples(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    seed, first = _first_seed(r)
    grids = [t.text("sample_grid", name=n, cfg=e["cfg"], grid=f"seed{seed}/{e['grid']}")
             for n, v in first["variants"].items() for e in v["evals"] if e.get("grid")]
    return t.lines("samples", seed=seed, grids="\n".join(grids))


def _appendix(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    cfg = s["cfg"][0]

    def ci(e: dict[str, Any], key: str) -> str:
        v = e.get(key)
        if v is None:
            return "–"
        b = e.get(key + "_ci")
        return _fmt(v) + (f" ({_fmt(b[0])}–{_fmt(b[1])})" if b else "")

    rows = []
    for n in r["variants"]:
        for seed, sr in r["per_seed"].items():
            v = sr["variants"].get(n)
            if v is None:
                continue
            e = final_eval(sr, n, cfg, s["steps"]) or {}
            rows.append(_row(n, [seed, ci(e, "fid"), _fmt(e.get("fid_curve")), ci(e, "class_acc"),
                                 _fmt(e.get("eval_loss"), 4), _fmt(v.get("final_loss"), 4),
                                 _fmt(v.get("train_s"), 4)]))
    return t.lines("appendix", cfg=cfg, curve_samples=s["curve_samples"], rows="\n".join(rows))


def _notes(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    return t.lines("notes", lr_after_drop=s["lr_after_drop"], lr_drop_fraction=s["lr_drop_fraction"],
                   distill_steps=s["distill_steps"])


SECTIONS: tuple[Callable[[ReportTemplate, dict[str, Any]], list[str]], ...] = (
    _header, _criteria, _last_checkpoint, _claims, _convergence, _over_training, _per_class, _loss_curves, _adaln,
    _samples, _appendix, _notes)


def render_report(results: dict[str, Any]) -> str:
    """report.md for what results.json holds."""
    t = load_template()
    return "\n".join(line for section in SECTIONS for line in section(t, results))
