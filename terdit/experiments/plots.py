"""The report's figures: loss curves (Fig. 7), metrics over training (Fig. 8) with a band over seeds, one figure
per claim, the variants' samples side by side, the adaLN scale (Fig. 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from terdit.experiments.losses import SMOOTHING, smooth
from terdit.experiments.variants import COLORS
from terdit.io import atomic_write


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def _seed_rows(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r["variants"][name] for r in results["per_seed"].values() if name in r["variants"]]


def _loss_bands(ax, results: dict[str, Any], names: list[str]) -> None:
    """Smoothed training loss: the mean over seeds, the band from the lowest to the highest seed."""
    lows, highs = [], []
    for n in names:
        runs = [v for v in _seed_rows(results, n) if v.get("loss")]
        if not runs:
            continue
        length = min(len(v["loss"]) for v in runs)
        curves = np.array([smooth(v["loss"][:length]) for v in runs])
        steps = runs[0]["loss_steps"][:length]
        ax.plot(steps, curves.mean(0), label=n, color=COLORS[n])
        ax.fill_between(steps, curves.min(0), curves.max(0), color=COLORS[n], alpha=0.2, linewidth=0)
        lows.append(np.percentile(curves.min(0), 1))
        highs.append(np.percentile(curves.max(0), 90))
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (smoothed, factor {SMOOTHING})")
    if lows and highs:
        ax.set_ylim(min(lows) * 0.95, max(highs) * 1.1)
    ax.legend(fontsize=7)


def _metric_bands(ax, results: dict[str, Any], names: list[str], key: str, label: str) -> None:
    """Mean over seeds against step with a min-max band; variants derived from the last full-precision
    checkpoint (PTQ, distilled) are one point with a min-max bar."""
    cfg = results["settings"]["cfg"][0]
    for n in names:
        v = results["variants"].get(n)
        if v is None:
            continue
        pts = sorted((e["step"], e[key]) for e in v["evals"] if e["cfg"] == cfg and (e.get(key) or {}).get("mean")
                     is not None)
        if not pts:
            continue
        steps = [p[0] for p in pts]
        mean = np.array([p[1]["mean"] for p in pts])
        lo, hi = np.array([p[1]["min"] for p in pts]), np.array([p[1]["max"] for p in pts])
        if v["kind"] == "trained":
            ax.plot(steps, mean, marker="o", markersize=3, label=n, color=COLORS[n])
            ax.fill_between(steps, lo, hi, color=COLORS[n], alpha=0.2, linewidth=0)
        else:
            ax.errorbar(steps, mean, yerr=[mean - lo, hi - mean], fmt="x", capsize=3, label=n, color=COLORS[n])
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    if key.startswith("fid"):
        ax.set_yscale("log")
    ax.set_title(f"{label} vs step (cfg {cfg:g}, EMA; band: seeds' min-max)", fontsize=9)


def _metric_keys(results: dict[str, Any]) -> list[tuple[str, str]]:
    if results["metric_mode"] == "digits":
        return [("fid_curve", f"FID, {results['settings']['curve_samples']} samples ↓"), ("class_acc", "class acc ↑")]
    return [("eval_loss", "eval loss ↓")]


def write_plots(results: dict[str, Any], out: Path) -> None:
    """Every figure report.md shows, written into OUT (matplotlib is an extra: a clear error without it)."""
    from terdit.extras import require

    matplotlib = require("matplotlib", "the reproduction's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    trained = [n for n, v in variants.items() if v["kind"] == "trained"]
    if trained:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _loss_bands(ax, results, trained)
        ax.set_title("Training loss, all trained variants (band: seeds' min-max)")
        fig.tight_layout()
        _savefig(fig, out / "loss_curves.png")

    keys = _metric_keys(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        _metric_bands(ax, results, list(variants), key, label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "metrics_vs_step.png")

    for claim in results["claims"]:
        names = list(dict.fromkeys(n for c in claim["comparisons"] for n in (c["a"], c["b"]) if n in variants))
        if not names:
            continue
        uses_loss = any(c["metric"] == "final_loss" for c in claim["comparisons"])
        panels = len(keys[:1]) + uses_loss
        fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
        _metric_bands(axes[0][0], results, names, *keys[0])
        axes[0][0].legend(fontsize=7)
        if uses_loss:
            _loss_bands(axes[0][1], results, [n for n in names if n in trained])
        fig.suptitle(f"({claim['id']}) {claim['claim']}: {claim['verdict']}", fontsize=9)
        fig.tight_layout()
        _savefig(fig, out / f"claim_{claim['id']}.png")

    _samples_side_by_side(results, out, plt)
    first = next(iter(results["per_seed"].values()))
    scales = first.get("adaln_scale") or {}
    if scales:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([scales[n]["values"] for n in scales], showfliers=True, flierprops={"markersize": 1})
        ax.set_xticks(range(1, len(scales) + 1), list(scales))
        ax.set_yscale("symlog")
        ax.set_title(f"Fig. 9 analogue: adaLN scale_mlp at the first sampling step (seed {first['seed']})")
        fig.tight_layout()
        _savefig(fig, out / "adaln_scale.png")


def _samples_side_by_side(results: dict[str, Any], out: Path, plt) -> None:
    """The first seed's sample grids of every variant at the first cfg: the same noise, one panel each."""
    from PIL import Image

    seed, first = next(iter(results["per_seed"].items()))
    cfg = results["settings"]["cfg"][0]
    grids = [(n, out / f"seed{seed}" / e["grid"]) for n, v in first["variants"].items() for e in v["evals"]
             if e.get("grid") and e["cfg"] == cfg]
    grids = [(n, p) for n, p in grids if p.is_file()]
    if not grids:
        return
    cols = min(5, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (n, p) in zip(axes.flat, grids):
        with Image.open(p) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        ax.set_title(n, fontsize=8)
    fig.suptitle(f"Samples at the last checkpoint, cfg {cfg:g}, seed {seed}: the same noise for every variant",
                 fontsize=9)
    fig.tight_layout()
    _savefig(fig, out / "samples_side_by_side.png")
