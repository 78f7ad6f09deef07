"""Training-loss logs of the variants' runs: reading them, smoothing them as the paper does, the final loss."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terdit.errors import TerditError
from terdit.models import runs as runlib

SMOOTHING = 0.995  # the paper's loss-curve smoothing factor (Sec. IV-D, footnote 6)
FINAL_FRACTION = 0.1  # "final loss" = mean raw training loss over the last 10% of the steps


def smooth(values: Sequence[float], factor: float = SMOOTHING) -> np.ndarray:
    """Debiased exponential smoothing, as TensorBoard draws curves (the paper's factor 0.995).

    s_k = factor * s_{k-1} + (1 - factor) * x_k with s_0 = 0, shown as s_k / (1 - factor^k): without the
    division the first points would be pulled towards zero; with it, point k is a weighted mean of x_1..x_k
    with weights factor^(k - i). The horizon is about 1 / (1 - factor) = 200 logged points."""
    if not 0 <= factor < 1:
        raise TerditError(f"smoothing factor must be in [0, 1), got {factor}")
    out = np.empty(len(values), dtype=np.float64)
    acc, weight = 0.0, 1.0
    for k, x in enumerate(values):
        acc = factor * acc + (1 - factor) * float(x)
        weight *= factor
        out[k] = acc / (1 - weight)
    return out


def read_loss_log(run: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from RUN/log.jsonl, the last line per step winning (a resumed run rewrites some)."""
    path = run / runlib.LOG_FILE
    by_step: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                by_step[int(e["step"])] = float(e["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def training_seconds(run: Path) -> float:
    """Seconds spent in training steps, summed from the logged step rates (survives resumes)."""
    path = run / runlib.LOG_FILE
    if not path.is_file():
        return float("nan")
    total, prev = {}, 0
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            step = int(e["step"])
            if step <= prev:  # a resume rewrote from here: drop what it replaced
                total = {s: v for s, v in total.items() if s < step}
                prev = max(total, default=0)
            total[step] = (step - prev) / max(float(e.get("steps_per_s", 0)), 1e-9)
            prev = step
    return float(sum(total.values()))


def final_loss(losses: Sequence[float]) -> float:
    """Mean raw training loss over the last FINAL_FRACTION of the logged steps."""
    if not losses:
        return float("nan")
    n = max(1, math.ceil(FINAL_FRACTION * len(losses)))
    return float(np.mean(losses[-n:]))
