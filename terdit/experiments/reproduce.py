"""`terdit reproduce`: the paper's comparisons (Tab. I/III, Sec. IV-B, Figs. 7-9) at small scale, in one command.

Every variant is the same model and trainer with different switches (`TrainArgs`), trained on the same data
with the same seed, step budget and schedule, once per training seed; the post-training-quantization (PTQ)
baselines are the trained full-precision model passed through `terdit.quant.ptq`, the distilled one its
data-free ternary student. Each checkpoint is evaluated with the EMA weights and each result is cached next to
the runs, so an interrupted or repeated command picks up where it stopped; seeds run in parallel processes.

Layout of REPORT_DIR::

    seed<k>/runs/<variant>/       ordinary training runs (`terdit sample --run` works on them)
    seed<k>/evals/<variant>.json  cached evaluations, keyed by checkpoint and evaluation settings
    seed<k>/samples/<variant>_cfg<S>.png, seed<k>/results.json (that seed's numbers)
    *.png plots, results.json (every seed, their summaries, the claims), report.md
    invocations.json              every command run on the folder and its wall time (their sum: the study's)

The parts live beside this module: variants.py (the variants and Settings), runner.py (training and evaluating
them), evaluation.py (the measurements), seeds.py (summaries over seeds, comparisons against their noise),
claims.py, plots.py and report.py (report.md from report.md.tmpl).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terdit.defaults import default_device
from terdit.experiments.claims import judge_claims
from terdit.experiments.evaluation import Evaluator, metric_mode
from terdit.experiments.losses import SMOOTHING, final_loss, read_loss_log, smooth, training_seconds
from terdit.experiments.plots import write_plots
from terdit.experiments.report import render_report
from terdit.experiments.runner import RUN_SIGNATURE, evaluate_variant, train_variants
from terdit.experiments.seeds import convergence, summarize_variant
from terdit.experiments.variants import FP, VARIANTS, Settings, Variant, train_args_for
from terdit.io import atomic_write_text
from terdit.models import runs as runlib


def machine_info() -> dict[str, Any]:
    """Where the report ran: training times depend on the machine and what else it ran."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# -- the whole command -------------------------------------------------------------------------------------------
def reproduce(s: Settings) -> dict[str, Any]:
    """Train, evaluate and report every requested variant for every seed; returns what results.json holds."""
    s.validate()
    from terdit.models.configs import get_config

    get_config(s.config)  # an unknown name or an impossible metric fails before anything is written
    metric_mode(s)
    t0, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = Path(s.out)
    per_seed = run_seeds(s)
    names = [n for n in VARIANTS if n in per_seed[s.seeds[0]]["variants"]]
    results: dict[str, Any] = {
        "command": s.command_line(), "sys_argv": list(sys.argv), "machine": machine_info(),
        "settings": dataclasses.asdict(s) | {"lr_drop_step": s.lr_drop_step, "eval_steps": s.eval_steps(),
                                             "smoothing": SMOOTHING,
                                             "ema_decay": train_args_for(VARIANTS["terdit"], s).ema_decay},
        "metric_mode": per_seed[s.seeds[0]]["metric_mode"],
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "variants": {n: summarize_variant({k: r["variants"][n] for k, r in per_seed.items()}) for n in names},
    }
    # real data's scores need no trained model: computed once here, with the first seed's sample order
    base = Evaluator(s.for_seed(s.seeds[0]), torch.device(s.device or default_device()))
    results["real_data"] = base.real_baseline(s.num_samples)
    results["fid_at_this_size"] = base.fid_at_this_size()
    results["convergence"] = {n: convergence(v, s.steps, s.eval_every, s.cfg[0])
                              for n, v in results["variants"].items() if v["kind"] == "trained"}
    results["claims"] = judge_claims(results)
    results["wall_s"] = time.perf_counter() - t0
    results["seed_wall_s"] = {str(k): r["wall_s"] for k, r in per_seed.items()}
    results["invocations"] = record_invocation(out, started, results["wall_s"], results["command"])
    results["cost"] = study_cost(per_seed)
    write_plots(results, out)
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=1) + "\n")
    atomic_write_text(out / "report.md", render_report(results))
    return results


INVOCATIONS = "invocations.json"  # OUT's ledger: every reproduce command run on it, with its wall time


def record_invocation(out: Path, started: str, wall_s: float, command: str) -> list[dict[str, Any]]:
    """Append this command to OUT/invocations.json and return the whole ledger: the study's total wall time is
    its sum, however many commands (interrupted, resumed, extended) built the numbers."""
    path = out / INVOCATIONS
    ledger = json.loads(path.read_text()) if path.is_file() else []
    ledger.append({"started": started, "wall_s": round(wall_s, 1), "command": command})
    atomic_write_text(path, json.dumps(ledger, indent=1) + "\n")
    return ledger


def study_cost(per_seed: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Process-seconds the reported numbers took, summed over seeds, however many invocations they came from
    (a rerun that reuses every run and evaluation takes seconds; this does not shrink with it)."""
    train = sum(v.get("train_s") or 0.0 for r in per_seed.values() for v in r["variants"].values())
    evals = sum(e.get("eval_s") or 0.0 for r in per_seed.values() for v in r["variants"].values() for e in v["evals"])
    return {"train_s": train, "eval_s": evals}


def run_seeds(s: Settings) -> dict[int, dict[str, Any]]:
    """Every seed's study (OUT/seed<k>), `jobs` of them at once in separate processes, torch's threads split
    between them; one job runs in this process."""
    jobs = min(len(s.seeds), s.jobs or len(s.seeds))
    if jobs == 1:
        return {k: seed_study(s.for_seed(k)) for k in s.seeds}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads running
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_job_init, initargs=(threads,)) as pool:
        futures = {k: pool.submit(seed_study, s.for_seed(k)) for k in s.seeds}
        return {k: f.result() for k, f in futures.items()}


def _job_init(threads: int) -> None:
    torch.set_num_threads(threads)


def seed_study(s: Settings) -> dict[str, Any]:
    """One seed: train (or reuse) its runs, evaluate them, and write OUT/seed<k>/results.json."""
    from terdit.experiments import runner

    runner.LOG_PREFIX = f"seed {s.seed}: "
    t0 = time.perf_counter()
    names = list(dict.fromkeys(s.variants))
    train_names, runs, status = train_variants(names, s)
    ev = Evaluator(s, torch.device(s.device or default_device()))
    results: dict[str, Any] = {"seed": s.seed, "metric_mode": ev.mode, "variants": {}}
    for n in (n for n in VARIANTS if n in names or n in train_names):
        entry = variant_entry(VARIANTS[n], s, runs, status.get(n, ""))
        entry["evals"] = evaluate_variant(VARIANTS[n], ev, s, runs)
        results["variants"][n] = entry
    results["adaln_scale"] = adaln_scales(runs)
    results["wall_s"] = time.perf_counter() - t0
    atomic_write_text(Path(s.out) / "results.json", json.dumps(_jsonable(results), indent=1) + "\n")
    return results


def variant_entry(v: Variant, s: Settings, runs: dict[str, Path], status: str) -> dict[str, Any]:
    """A variant's row of results.json before its evaluations: its run's loss log and timings, or its PTQ recipe."""
    out = Path(s.out)
    entry: dict[str, Any] = {"label": v.label, "kind": v.kind}
    if v.ptq:
        entry.update(source_run=str(runs[FP].relative_to(out)), method=v.ptq[0], granularity=v.ptq[1])
        return entry
    run = runs[v.name]
    steps, losses = read_loss_log(run)
    args = runlib.load_train_args(run)
    entry.update(run=str(run.relative_to(out)), status=status, train_s=training_seconds(run),
                 final_loss=final_loss(losses), final_loss_smoothed=float(smooth(losses)[-1]) if losses else None,
                 ema_decay=args.get("ema_decay"), train_args={k: args.get(k) for k in RUN_SIGNATURE},
                 loss_steps=steps, loss=losses)
    entry["s_per_step"] = entry["train_s"] / max(1, args.get("steps") or s.steps)
    return entry


def adaln_scales(runs: dict[str, Path]) -> dict[str, Any]:
    """Fig. 9 analogue: scale_mlp of the second block (first if only one) at the first sampling step."""
    from terdit.experiments.analysis import adaln_scale_distribution

    out: dict[str, Any] = {}
    for n in ("terdit", "terdit-no-norm", FP):
        if n in runs:
            depth = runlib.load_config(runs[n]).depth
            vals = adaln_scale_distribution(runs[n], block=1 if depth > 1 else 0).float().flatten().numpy()
            q = np.percentile(vals, [0, 1, 50, 99, 100])
            out[n] = {"block": 1 if depth > 1 else 0, "min": float(q[0]), "p1": float(q[1]),
                      "median": float(q[2]), "p99": float(q[3]), "max": float(q[4]), "std": float(vals.std()),
                      "abs_max": float(np.abs(vals).max()), "values": vals.tolist()}
    return out


def _jsonable(x: Any) -> Any:
    """NaN/inf become null so results.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x
