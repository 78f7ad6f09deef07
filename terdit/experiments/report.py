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

from terdit.experiments.claims import final_eval, verdict
from terdit.experiments.losses import SMOOTHING

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


# -- the sections, in document order: each returns its lines (none when it does not apply) --------------------------
def _header(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s, m, cfgs = r["settings"], r["machine"], r["settings"]["cfg"]
    fields = {**s, "command": r["command"], "wall_s": r["wall_s"],
              "budget": t.text("budget_quick" if s["quick"] else "budget_full"),
              "platform": m["platform"], "cores": m.get("usable_cores", m["cpu_count"]), "torch": m["torch"],
              "threads": m["torch_threads"], "cuda": m["cuda"] or "none", "load": m.get("load_average_at_start"),
              "data": s["data"] or t.text("data_digits"), "first_cfg": cfgs[0],
              "other_cfgs": ", ".join(f"{c:g}" for c in cfgs[1:]) or "–"}
    lines = t.lines("header", **fields)
    return lines + t.lines("metrics_digits" if _digits(r) else "metrics_loss")


def _final_row(r: dict[str, Any], name: str, cfg: float) -> str:
    v = r["variants"][name]
    e = final_eval(r, name, cfg) or {}
    tail = [_fmt(v.get("final_loss"), 4), _fmt(v.get("train_s"), 4)]
    if not _digits(r):
        return _row(name, [_fmt(e.get("eval_loss"), 4), *tail])
    return _row(name, [_fmt(e.get("fid")), _fmt(e.get("inception_score")), _fmt(e.get("precision")),
                       _fmt(e.get("recall")), _fmt(e.get("class_acc")), _fmt(e.get("eval_loss"), 4), *tail])


def _last_checkpoint(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    cfgs, digits, lines = r["settings"]["cfg"], _digits(r), []
    for cfg in cfgs if digits else cfgs[:1]:  # the eval loss does not depend on the guidance scale
        rows = [_final_row(r, n, cfg) for n in r["variants"]]
        real = r.get("real_data")
        if digits and real and cfg == cfgs[0]:
            rows.append(_row(f"real digits ({real['num_samples']})",
                             [_fmt(real[k]) for k in ("fid", "inception_score", "precision", "recall", "class_acc")]
                             + ["–"] * 3))
        lines += t.lines("last_checkpoint_digits" if digits else "last_checkpoint_loss", cfg=cfg,
                         rows="\n".join(rows))
    return lines + t.lines("table_note")


def _claim_numbers(numbers: dict[str, Any]) -> str:
    text = ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}" for k, v in numbers.items()
                     if not isinstance(v, dict))
    failed = numbers.get("failed")
    if isinstance(failed, dict) and failed:
        text += "; failed: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in failed.items())
    return text


def _claims(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    noise = t.text("noise_digits", num_samples=s["num_samples"]) if _digits(r) else t.text("noise_loss")
    claims = [t.text("claim", id=c["id"], claim=c["claim"], verdict=verdict(c["held"]), criterion=c["criterion"],
                     numbers=_claim_numbers(c["numbers"])) for c in r["claims"]]
    return t.lines("claims", cfg=s["cfg"][0], noise=noise, claims="\n".join(claims))


def _over_training(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    cfg, digits = r["settings"]["cfg"][0], _digits(r)
    evals = [(n, e) for n, v in r["variants"].items() if v["kind"] == "trained" for e in v["evals"] if e["cfg"] == cfg]
    if not evals:
        return []
    key, label = ("fid", "FID / class acc") if digits else ("eval_loss", "eval loss")
    steps = sorted({e["step"] for _, e in evals})

    def cell(e: dict[str, Any] | None) -> str:
        if e is None:
            return "–"
        return _fmt(e.get(key)) + (f" / {_fmt(e.get('class_acc'))}" if digits else "")

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
    rows = [_row(n, [_fmt(x, 2) for x in (final_eval(r, n, cfg) or {}).get("per_class_acc") or []])
            for n in r["variants"]]
    return t.lines("per_class", cfg=cfg, rows="\n".join(rows))


def _loss_curves(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    steps, variants = r["settings"]["steps"], r["variants"]
    window = 1 / (1 - SMOOTHING)
    share = (t.text("share_part", percent=100 * window / steps, steps=steps) if window < steps
             else t.text("share_whole", steps=steps))
    lines = t.lines("loss_curves", smoothing=SMOOTHING, window=window, share=share)
    if any(v["kind"] == "trained" for v in variants.values()) and {"terdit", "terdit-no-norm"} <= set(variants):
        lines += t.lines("loss_adaln_figure")
    return lines


def _adaln(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    scales = r.get("adaln_scale") or {}
    if not scales:
        return []
    rows = [_row(n, [str(a["block"]), *(_fmt(a[k]) for k in ("min", "median", "max", "std"))])
            for n, a in scales.items()]
    return t.lines("adaln", rows="\n".join(rows))


def _samples(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    grids = [t.text("sample_grid", name=n, cfg=e["cfg"], grid=e["grid"])
             for n, v in r["variants"].items() for e in v["evals"] if e.get("grid")]
    return t.lines("samples", grids="\n".join(grids))


def _notes(t: ReportTemplate, r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    return t.lines("notes", lr_after_drop=s["lr_after_drop"], lr_drop_fraction=s["lr_drop_fraction"])


SECTIONS: tuple[Callable[[ReportTemplate, dict[str, Any]], list[str]], ...] = (
    _header, _last_checkpoint, _claims, _over_training, _per_class, _loss_curves, _adaln, _samples, _notes)


def render_report(results: dict[str, Any]) -> str:
    """report.md for what results.json holds."""
    t = load_template()
    return "\n".join(line for section in SECTIONS for line in section(t, results))
