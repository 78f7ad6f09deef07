"""The report's figures: loss curves (Fig. 7), metrics over training (Fig. 8), adaLN scale (Fig. 9)."""

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


def write_plots(results: dict[str, Any], out: Path) -> None:
    """Every figure report.md shows, written into OUT (matplotlib is an extra: a clear error without it)."""
    from terdit.extras import require

    matplotlib = require("matplotlib", "the reproduction's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {n: v for n, v in results["variants"].items() if v["kind"] == "trained"}

    def loss_plot(names: list[str], title: str, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for n in names:
            v = trained[n]
            ax.plot(v["loss_steps"], smooth(v["loss"]), label=n, color=COLORS[n])
            ax.plot(v["loss_steps"], v["loss"], color=COLORS[n], alpha=0.25, linewidth=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (smoothed, factor {SMOOTHING})")
        ax.set_title(title)
        ax.legend()
        lows = [np.percentile(trained[n]["loss"], 1) for n in names if trained[n]["loss"]]
        highs = [np.percentile(smooth(trained[n]["loss"]), 90) for n in names if trained[n]["loss"]]
        if lows and highs:
            ax.set_ylim(min(lows) * 0.95, max(highs) * 1.1)
        fig.tight_layout()
        _savefig(fig, path)

    if trained:
        loss_plot(list(trained), "Training loss, all trained variants", out / "loss_curves.png")
    if "terdit" in trained and "terdit-no-norm" in trained:
        loss_plot(["terdit", "terdit-no-norm"], "Fig. 7 analogue: with / without adaLN RMSNorm",
                  out / "loss_adaln_norm.png")

    cfg = results["settings"]["cfg"][0]
    keys = [("fid", "FID (digits features) ↓"), ("class_acc", "class accuracy ↑")] \
        if results["metric_mode"] == "digits" else [("eval_loss", "eval loss ↓")]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for n, v in results["variants"].items():
            pts = sorted((e["step"], e[key]) for e in v["evals"] if e["cfg"] == cfg and e.get(key) is not None)
            if not pts:
                continue
            if v["kind"] == "trained":
                ax.plot(*zip(*pts), marker="o", label=n, color=COLORS[n])
            else:
                ax.scatter(*zip(*pts), marker="x", s=50, label=n, color=COLORS[n])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if key == "fid":
            ax.set_yscale("log")
        ax.set_title(f"{label} vs step (cfg {cfg:g}, EMA)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "metrics_vs_step.png")

    scales = results.get("adaln_scale") or {}
    if scales:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([scales[n]["values"] for n in scales], showfliers=True, flierprops={"markersize": 1})
        ax.set_xticks(range(1, len(scales) + 1), list(scales))
        ax.set_yscale("symlog")
        ax.set_title("Fig. 9 analogue: adaLN scale_mlp at the first sampling step")
        fig.tight_layout()
        _savefig(fig, out / "adaln_scale.png")
