"""Running the variants: train, resume or reuse each run, then evaluate its checkpoints with a result cache.

Each evaluation is cached next to the runs (evals/<variant>.json), so an interrupted or repeated
`terdit reproduce` picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from terdit.errors import TerditError
from terdit.experiments.evaluation import Evaluator, ptq_model
from terdit.experiments.variants import DISTILL_POOL, FP, VARIANTS, Settings, Variant, train_args_for
from terdit.io import atomic_dir, atomic_write_text
from terdit.models import runs as runlib

# the TrainArgs that make two runs the same computation: a run folder is reused only when they match
RUN_SIGNATURE = ("config", "linear", "adaln_norm", "act_bits", "data", "steps", "batch_size", "lr", "lr_drop_step",
                 "lr_after_drop", "seed", "ema_decay")


LOG_PREFIX = ""  # "seed k: " in a seed's process


def log(msg: str) -> None:
    """Progress on stdout, one line per step of the work."""
    print(f"[reproduce] {LOG_PREFIX}{msg}", flush=True)


# -- training -------------------------------------------------------------------------------------------------
def train_variants(names: list[str], s: Settings) -> tuple[list[str], dict[str, Path], dict[str, str]]:
    """Train (or resume, or reuse) the runs the requested variants need: (their names, run folders, statuses).

    PTQ and distilled variants need the full-precision run (trained first); terdit also leaves a checkpoint where
    terdit-lr-drop drops its LR, for that run to continue from."""
    needs_fp = any(not VARIANTS[n].trained for n in names)
    train_names = [n for n in VARIANTS if not VARIANTS[n].ptq and (n in names or (n == FP and needs_fp))]
    runs: dict[str, Path] = {}
    status: dict[str, str] = {}
    for n in train_names:
        stop = s.lr_drop_step if n == "terdit" and "terdit-lr-drop" in train_names else None
        runs[n], status[n] = ensure_trained(VARIANTS[n], s, stop_at=stop)
    return train_names, runs, status


def ensure_trained(variant: Variant, s: Settings, stop_at: int | None = None) -> tuple[Path, str]:
    """Train the variant, resume it, or reuse it when its run already finished: (run folder, what happened).

    `stop_at` makes a fresh run stop there first (leaving a checkpoint) and then continue to the end."""
    from terdit.training.trainer import Trainer

    args = train_args_for(variant, s)
    run = Path(args.out)
    ckpts = runlib.checkpoint_dirs(run)
    steps = args.steps
    if ckpts:
        stored = runlib.load_train_args(run)
        diff = [f"{k}: {stored.get(k)!r} there, {getattr(args, k)!r} now" for k in RUN_SIGNATURE
                if k != "steps" and stored.get(k) != getattr(args, k)]
        done = int(ckpts[-1].name)
        if done > steps:
            diff.append(f"trained to step {done}, {steps} asked for")
        if diff:
            raise TerditError(f"{run} was trained with other settings ({'; '.join(diff)}); choose another --out "
                              f"or delete that run folder")
        if variant.distilled:
            _check_teacher_unchanged(run, s)
        if done == steps:
            return run, "reused"
        log(f"{variant.name}: resuming from step {done}")
        args.resume = True
        if stop_at is not None and done < stop_at < steps and stop_at % s.eval_every:
            Trainer(dataclasses.replace(args, steps=stop_at)).run()  # leave the checkpoint terdit-lr-drop starts at
        _trainer(variant, args, s).run()
        return run, "resumed"
    if run.exists():  # a start that died before its first checkpoint: nothing worth keeping
        shutil.rmtree(run)
    parent = Path(train_args_for(VARIANTS["terdit"], s).out)
    if args.lr_drop_step is not None and runlib.checkpoint_dirs(parent) and branch_run(parent, args):
        log(f"{variant.name}: continuing terdit's checkpoint at step {args.lr_drop_step} with lr "
             f"{args.lr_after_drop:g}")
        args.resume = True
        Trainer(args).run()
        return run, f"branched from terdit at step {args.lr_drop_step}"
    log(f"{variant.name}: training {steps} steps ({variant.label})")
    if stop_at is not None and 0 < stop_at < steps and stop_at % s.eval_every:
        Trainer(dataclasses.replace(args, steps=stop_at)).run()
        args.resume = True
    _trainer(variant, args, s).run()
    return run, "trained"


def _check_teacher_unchanged(run: Path, s: Settings) -> None:
    """A distilled run is reused only while its teacher (the full-precision run's last checkpoint) is the one it
    learned from: a teacher trained further since (a longer --steps) makes it stale."""
    teacher = runlib.checkpoint_dirs(train_args_for(VARIANTS[FP], s).out)
    first = runlib.checkpoint_dirs(run)[0]
    if teacher and _stamp(teacher[-1])[1] > _stamp(first)[1]:
        raise TerditError(f"{run} was distilled from an earlier full-precision checkpoint than "
                          f"{teacher[-1]}; delete that run folder to distill it again")


def _trainer(variant: Variant, args, s: Settings):
    """terdit train's Trainer, or for the distilled variant terdit distill's, taught by the full-precision run."""
    from terdit.training.trainer import Trainer

    if not variant.distilled:
        return Trainer(args)
    from terdit.training.distill import DistillArgs, Distiller

    teacher = train_args_for(VARIANTS[FP], s).out  # the run folder train_variants trained first
    return Distiller(args, DistillArgs(teacher=str(teacher), **DISTILL_POOL))


def branch_run(parent: Path, args) -> bool:
    """Start `args.out` as a copy of `parent` up to the checkpoint at `args.lr_drop_step`, to be resumed.

    The steps before the drop are the same computation in both runs (data order and noise are functions of
    seed and step, and resuming is exact), so the LR-drop variant continues the constant-LR run's checkpoint,
    as the paper's Tab. III continues one 1550k-step model. False (nothing written) when the parent has no
    checkpoint at that step or was trained with other settings."""
    stored = runlib.load_train_args(parent)
    same = all(stored.get(k) == getattr(args, k) for k in RUN_SIGNATURE if k != "lr_drop_step")
    ckpt = parent / runlib.CKPT_DIR / runlib.checkpoint_name(args.lr_drop_step)
    if not same or stored.get("lr_drop_step") is not None or not ckpt.is_dir():
        return False
    dst = Path(args.out)

    def fill(tmp: Path) -> None:
        shutil.copy2(parent / runlib.CONFIG_FILE, tmp / runlib.CONFIG_FILE)
        for p in runlib.checkpoint_dirs(parent):
            if int(p.name) <= args.lr_drop_step:
                shutil.copytree(p, tmp / runlib.CKPT_DIR / p.name)
        log = (parent / runlib.LOG_FILE).read_text().splitlines()
        keep = [ln for ln in log if ln.strip() and json.loads(ln)["step"] <= args.lr_drop_step]
        (tmp / runlib.LOG_FILE).write_text("".join(ln + "\n" for ln in keep))
        (tmp / runlib.TRAIN_ARGS_FILE).write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")

    atomic_dir(dst, fill)
    return True


# -- evaluation ------------------------------------------------------------------------------------------------
def distinct_levels(weight: torch.Tensor) -> tuple[int, int]:
    """(distinct values in the tensor, most distinct values in any row): what a quantizer leaves."""
    w = weight.detach()
    return int(w.unique().numel()), max(int(row.unique().numel()) for row in w.reshape(w.shape[0], -1))


class EvalCache:
    """evals/<variant>.json: results keyed by (checkpoint step, cfg, evaluation settings), written after each
    evaluation so an interrupted report loses at most the evaluation in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, stamp: list, grid: Path | None) -> dict[str, Any] | None:
        e = self.entries.get(key)
        if e is None or e.get("stamp") != stamp or (grid is not None and not grid.is_file()):
            return None
        return e

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        atomic_write_text(self.path, json.dumps(self.entries, indent=1) + "\n")


def _stamp(ckpt: Path) -> list:
    """Identifies the weights an evaluation saw: a retrained run invalidates its cached results, while a
    copied checkpoint (same size, modification time kept by the copy) is recognised as the same weights."""
    st = (ckpt / "ema.safetensors").stat()
    return [st.st_size, st.st_mtime_ns]


def evaluate_variant(variant: Variant, ev: Evaluator, s: Settings, runs: dict[str, Path]) -> list[dict[str, Any]]:
    """Evaluations at every checkpoint (first cfg, curve_samples) and at the last one (every cfg, with sample
    grids; num_samples at the first cfg).

    PTQ variants are evaluated at the full-precision run's last checkpoint, the distilled one at its own last;
    both are recorded at the study's last step, the point they are compared at."""
    src = runs[FP if variant.ptq else variant.name]
    ckpts = {int(p.name): p for p in runlib.checkpoint_dirs(src)}
    shared = [EvalCache(Path(s.out) / "evals" / f"{n}.json") for n in runs if n != variant.name]
    wanted = [st for st in s.eval_steps() if st in ckpts] if variant.trained else [s.steps]
    cache = EvalCache(Path(s.out) / "evals" / f"{variant.name}.json")
    results = []
    for step in wanted:
        ckpt = ckpts[step] if variant.trained or variant.ptq else ckpts[max(ckpts)]
        for cfg in (s.cfg if step == s.steps else s.cfg[:1]):
            last = step == s.steps
            n = s.num_samples if last and cfg == s.cfg[0] else s.curve_samples
            grid = Path(s.out) / "samples" / f"{variant.name}_cfg{cfg:g}.png" if last else None
            key = f"step={step} cfg={cfg:g} n={n} S={s.sample_steps} seed={s.seed} mode={ev.mode}"
            stamp = _stamp(ckpt)
            entry = cache.get(key, stamp, grid)
            if entry is None and grid is None:  # a checkpoint copied from another run (terdit-lr-drop's start)
                entry = next((c.get(key, stamp, None) for c in shared if c.get(key, stamp, None)), None)
                if entry is not None:
                    cache.put(key, entry)
            if entry is None:
                log(f"{variant.name}: evaluating step {step}, cfg {cfg:g}, {n} samples")
                model, extra = _model_to_evaluate(variant, src, ckpt, str(ev.device))
                entry = {"step": step, "cfg": cfg, **ev.measure(model, cfg, grid, n), **extra, "stamp": stamp}
                if grid is not None:
                    entry["grid"] = str(grid.relative_to(s.out))
                cache.put(key, entry)
            results.append({k: v for k, v in entry.items() if k != "stamp"})
    return results


def _model_to_evaluate(variant: Variant, src: Path, ckpt: Path, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The EMA model of a checkpoint (PTQ variants: quantized), and what the evaluation records about it."""
    if not variant.ptq:
        extra = {"distill_steps": int(ckpt.name)} if variant.distilled else {}
        return runlib.load_run_model(src, ema=True, checkpoint=ckpt, device=device), extra
    method, granularity = variant.ptq
    model, reports = ptq_model(src, method, granularity, ckpt, device)
    levels = [distinct_levels(lin.weight) for lin in _ptq_linears(model)]
    return model, {"ptq": {"method": method, "granularity": granularity, "source": str(src),
                           "source_step": int(ckpt.name), "layers": len(reports),
                           "mean_rel_error": float(np.mean([r.rel_error for r in reports])),
                           "max_levels_per_tensor": max(a for a, _ in levels),
                           "max_levels_per_row": max(b for _, b in levels)}}


def _ptq_linears(model: nn.Module) -> list[nn.Linear]:
    from terdit.quant.ptq import quantizable_linears

    return list(quantizable_linears(model).values())
