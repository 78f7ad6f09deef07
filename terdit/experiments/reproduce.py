"""`terdit reproduce`: the paper's comparisons (Tab. I/III, Sec. IV-B, Figs. 7-9) at small scale, in one command.

Every variant is the same model and trainer with different switches (`TrainArgs`), trained on the same data
with the same seed, step budget and schedule; the post-training-quantization (PTQ) baselines are the trained
full-precision model passed through `terdit.quant.ptq`. Each checkpoint is evaluated with the EMA weights and
each result is cached next to the runs, so an interrupted or repeated command picks up where it stopped.

Layout of REPORT_DIR::

    runs/<variant>/          ordinary training runs (`terdit sample --run` works on them)
    evals/<variant>.json     cached evaluations, keyed by checkpoint and evaluation settings
    samples/<variant>_cfg<S>.png, *.png plots, results.json, report.md
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from terdit.defaults import default_device, device_setting, positive_int, setting
from terdit.errors import TerditError
from terdit.io import atomic_dir, atomic_write, atomic_write_text
from terdit.models import runs as runlib

SMOOTHING = 0.995  # the paper's loss-curve smoothing factor (Sec. IV-D, footnote 6)
FINAL_FRACTION = 0.1  # "final loss" = mean raw training loss over the last 10% of the steps
FP_CLOSE_RATIO = 1.25  # claim (a): TerDiT's FID within 25% of full precision's
PTQ_FAIL_RATIO = 2.0  # claim (c): a PTQ model "fails" when its FID is at least twice TerDiT's
LOSS_CLOSE_RATIO = 1.05  # the same two claims judged on eval loss when no image metric applies
LOSS_FAIL_RATIO = 1.2
EVAL_LOSS_ITEMS = 512  # items of the fixed eval-loss batch
SAMPLE_CHUNK = 256  # samples drawn per sampling call (bounds memory for big models)


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: trainer switches, or a PTQ recipe applied to the full-precision run."""

    name: str
    label: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainArgs overrides; empty for PTQ variants
    ptq: tuple[str, str] | None = None  # (method, granularity)

    @property
    def trained(self) -> bool:
        return self.ptq is None


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("full-precision", "Full precision (Large-DiT)", {"linear": "fp", "adaln_norm": False}),
    Variant("terdit", "TerDiT (ternary + adaLN RMSNorm)", {"linear": "ternary", "adaln_norm": True}),
    Variant("terdit-no-norm", "TerDiT without adaLN RMSNorm", {"linear": "ternary", "adaln_norm": False}),
    Variant("bitnet", "BitNet b1.58 (QAT)", {"linear": "bitnet", "adaln_norm": False}),
    Variant("terdit-lr-drop", "TerDiT, LR 5e-4 -> 1e-4", {"linear": "ternary", "adaln_norm": True, "lr_drop": True}),
    Variant("ptq-ternary-tensor", "PTQ ternary, per tensor", ptq=("ternary", "tensor")),
    Variant("ptq-ternary-channel", "PTQ ternary, per channel", ptq=("ternary", "channel")),
    Variant("ptq-2bit-tensor", "PTQ 2-bit, per tensor", ptq=("2bit", "tensor")),
    Variant("ptq-2bit-channel", "PTQ 2-bit, per channel", ptq=("2bit", "channel")),
]}
FP = "full-precision"
COLORS = {n: f"C{k}" for k, n in enumerate(VARIANTS)}  # one colour per variant in every plot

FULL_BUDGET = dict(steps=2000, batch_size=128, eval_every=500, num_samples=500, sample_steps=50)
QUICK_BUDGET = dict(steps=30, batch_size=32, eval_every=15, num_samples=100, sample_steps=10)


@dataclass
class Settings:
    """What `terdit reproduce` was asked for, with the budget resolved (`--quick` or the full one)."""

    out: str = setting("reproduce", "report folder (runs, evaluations, report.md)")
    quick: bool = setting(False, f"CI budget: {', '.join(f'{k}={v}' for k, v in QUICK_BUDGET.items())}")
    config: str = setting("TerDiT-Digits", "model config (see `terdit configs`)")
    data: str | None = setting(None, "training data (default: the embedded digits)")
    steps: int = setting(FULL_BUDGET["steps"], type=positive_int)
    batch_size: int = setting(FULL_BUDGET["batch_size"], type=positive_int)
    lr: float = setting(5e-4, cli=False)
    lr_after_drop: float = setting(1e-4, cli=False)
    lr_drop_fraction: float = setting(0.75, "where terdit-lr-drop drops its LR", type=float)
    seed: int = setting(0, type=int)
    variants: list[str] = setting(help=f"which rows to produce (default all): {', '.join(VARIANTS)}",
                                  choices=list(VARIANTS), nargs="+", metavar="NAME",
                                  default_factory=lambda: list(VARIANTS))
    num_samples: int = setting(FULL_BUDGET["num_samples"], "samples per evaluation", type=positive_int)
    sample_steps: int = setting(FULL_BUDGET["sample_steps"], "DDPM sampling steps", type=positive_int)
    cfg: list[float] = setting(help="guidance scales: the first at every checkpoint and for the claims, all at the "
                               "last", type=float, nargs="+", default_factory=lambda: [1.5, 4.0])
    eval_every: int = setting(FULL_BUDGET["eval_every"], "checkpoint and evaluate every N steps", type=positive_int)
    metrics: str = setting("auto", "auto: digits features for digits data, eval loss otherwise",
                           choices=["auto", "digits", "loss"])
    device: str | None = device_setting("cpu or cuda (default: cuda if present)")
    progress: bool = setting(True)
    @property
    def lr_drop_step(self) -> int:
        return max(1, min(self.steps - 1, round(self.lr_drop_fraction * self.steps)))

    def eval_steps(self) -> list[int]:
        return sorted(set(range(self.eval_every, self.steps, self.eval_every)) | {self.steps})

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        checks = [
            (not unknown, f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}"),
            (self.steps >= 2, f"--steps must be >= 2 (the LR-drop ablation needs a step to drop at), got {self.steps}"),
            (self.num_samples >= 10, f"--num-samples must be >= 10, got {self.num_samples}"),
            (1 <= self.sample_steps <= 1000, f"--sample-steps must be in [1, 1000], got {self.sample_steps}"),
            (bool(self.cfg) and all(c >= 0 for c in self.cfg), f"--cfg values must be >= 0, got {self.cfg}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (0 < self.lr_drop_fraction < 1, f"--lr-drop-fraction must be in (0, 1), got {self.lr_drop_fraction}"),
            (self.metrics in ("auto", "digits", "loss"), f"--metrics must be auto, digits or loss: {self.metrics}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TerditError(msg)

    def command_line(self) -> str:
        """A `terdit reproduce` line that reproduces this report (every resolved option spelled out)."""
        parts = ["terdit", "reproduce", "--out", self.out, "--config", self.config]
        if self.data:
            parts += ["--data", self.data]
        parts += ["--steps", str(self.steps), "--batch-size", str(self.batch_size), "--seed", str(self.seed),
                  "--eval-every", str(self.eval_every), "--num-samples", str(self.num_samples),
                  "--sample-steps", str(self.sample_steps), "--cfg", *[f"{c:g}" for c in self.cfg],
                  "--lr-drop-fraction", f"{self.lr_drop_fraction:g}", "--metrics", self.metrics,
                  "--variants", *self.variants]
        if self.device:
            parts += ["--device", self.device]
        return shlex.join(parts)


# -- small pure helpers -------------------------------------------------------------------------------------
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


def distinct_levels(weight: torch.Tensor) -> tuple[int, int]:
    """(distinct values in the tensor, most distinct values in any row): what a quantizer leaves."""
    w = weight.detach()
    return int(w.unique().numel()), max(int(row.unique().numel()) for row in w.reshape(w.shape[0], -1))


def machine_info() -> dict[str, Any]:
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


def _log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# -- training -------------------------------------------------------------------------------------------------
_SIGNATURE = ("config", "linear", "adaln_norm", "data", "steps", "batch_size", "lr", "lr_drop_step",
              "lr_after_drop", "seed", "ema_decay")


def train_args_for(variant: Variant, s: Settings):
    """The variant's TrainArgs: shared settings plus its switches, nothing tuned per variant."""
    from terdit.training.trainer import TrainArgs

    sw = dict(variant.train)
    drop = sw.pop("lr_drop", False)
    args = TrainArgs(
        out=str(Path(s.out) / "runs" / variant.name), config=s.config, data=s.data, steps=s.steps,
        batch_size=s.batch_size, lr=s.lr, lr_after_drop=s.lr_after_drop,
        lr_drop_step=s.lr_drop_step if drop else None, seed=s.seed, ckpt_every=s.eval_every,
        keep_checkpoints=10**9, log_every=1, sample_steps=s.sample_steps, tensorboard=False, progress=s.progress,
        device=s.device, **sw,
    )
    args.ema_decay = args.resolved_ema_decay()  # stored resolved, so reuse checks compare real values
    return args


def ensure_trained(variant: Variant, s: Settings, stop_at: int | None = None) -> tuple[Path, str]:
    """Train the variant, resume it, or reuse it when its run already finished: (run folder, what happened).

    `stop_at` makes a fresh run stop there first (leaving a checkpoint) and then continue to the end."""
    from terdit.training.trainer import Trainer

    args = train_args_for(variant, s)
    run = Path(args.out)
    ckpts = runlib.checkpoint_dirs(run)
    if ckpts:
        stored = runlib.load_train_args(run)
        diff = [f"{k}: {stored.get(k)!r} there, {getattr(args, k)!r} now" for k in _SIGNATURE
                if k != "steps" and stored.get(k) != getattr(args, k)]
        done = int(ckpts[-1].name)
        if done > s.steps:
            diff.append(f"trained to step {done}, {s.steps} asked for")
        if diff:
            raise TerditError(f"{run} was trained with other settings ({'; '.join(diff)}); choose another --out "
                              f"or delete that run folder")
        if done == s.steps:
            return run, "reused"
        _log(f"{variant.name}: resuming from step {done}")
        args.resume = True
        Trainer(args).run()
        return run, "resumed"
    if run.exists():  # a start that died before its first checkpoint: nothing worth keeping
        shutil.rmtree(run)
    parent = Path(s.out) / "runs" / "terdit"
    if args.lr_drop_step is not None and runlib.checkpoint_dirs(parent) and branch_run(parent, args):
        _log(f"{variant.name}: continuing terdit's checkpoint at step {args.lr_drop_step} with lr "
             f"{args.lr_after_drop:g}")
        args.resume = True
        Trainer(args).run()
        return run, f"branched from terdit at step {args.lr_drop_step}"
    _log(f"{variant.name}: training {s.steps} steps ({variant.label})")
    if stop_at is not None and 0 < stop_at < s.steps and stop_at % s.eval_every:
        Trainer(dataclasses.replace(args, steps=stop_at)).run()
        args.resume = True
    Trainer(args).run()
    return run, "trained"


def branch_run(parent: Path, args) -> bool:
    """Start `args.out` as a copy of `parent` up to the checkpoint at `args.lr_drop_step`, to be resumed.

    The steps before the drop are the same computation in both runs (data order and noise are functions of
    seed and step, and resuming is exact), so the LR-drop variant continues the constant-LR run's checkpoint,
    as the paper's Tab. III continues one 1550k-step model. False (nothing written) when the parent has no
    checkpoint at that step or was trained with other settings."""
    stored = runlib.load_train_args(parent)
    same = all(stored.get(k) == getattr(args, k) for k in _SIGNATURE if k != "lr_drop_step")
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
def metric_mode(s: Settings) -> str:
    """"digits" (FID/IS/P/R in digits features, class accuracy) or "loss" (eval loss only)."""
    digits_data = s.data in (None, "digits")
    mode = s.metrics if s.metrics != "auto" else ("digits" if digits_data else "loss")
    if mode == "digits" and not digits_data:
        raise TerditError(f"--metrics digits needs the embedded 8x8 digits (no --data), not {s.data}; "
                          f"use --metrics loss and evaluate sample npz files with `terdit eval`")
    return mode


class Evaluator:
    """Samples a model and measures it: digits features (FID/IS/P/R), class accuracy, and a fixed eval loss.

    Everything a measurement compares against (reference features, the eval-loss batch with its timesteps
    and noise) is built once, so every variant and checkpoint is measured against exactly the same thing."""

    def __init__(self, s: Settings, device: torch.device) -> None:
        from terdit.data import open_training_data

        self.s, self.device = s, device
        self.mode = mode = metric_mode(s)
        a = train_args_for(VARIANTS["terdit"], s)  # open the data exactly as the trainer does
        self.data = open_training_data(a.data, resolution=a.resolution, vae=a.vae, seed=a.seed, flip=a.flip,
                                       vae_sample=a.vae_sample, class_map=a.class_map,
                                       strict=a.strict_data) if a.data else open_training_data(None)
        self.num_classes = self.data.num_classes
        self._eval_batch()
        if mode == "digits":
            from terdit.data.digits import digits_classifier
            from terdit.eval import DigitsExtractor, digits_uint8
            from terdit.eval.metrics import compute_statistics

            self.extractor = DigitsExtractor()
            self.ref_images = digits_uint8("all")  # the training data itself
            self.ref_feats = self.extractor(self.ref_images)
            self.ref_stats = compute_statistics(self.ref_feats["pool"])
            self.classifier = digits_classifier()

    def _eval_batch(self) -> None:
        """Evenly spaced items, stratified timesteps, seeded noise: a low-variance loss that PTQ models get too."""
        ds = self.data.dataset
        n = min(EVAL_LOSS_ITEMS, len(ds))
        idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
        items = [ds[int(i)] for i in idx]
        self.eval_x = torch.stack([torch.as_tensor(x) for x, _ in items])
        self.eval_y = torch.tensor([int(y) for _, y in items])
        self.eval_t = torch.tensor([int((k + 0.5) * 1000 / n) for k in range(n)])
        self._eval_z: torch.Tensor | None = None  # model-space batch and noise, made on first use
        self._eval_noise: torch.Tensor | None = None

    def _model_space_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval items in model space (encoded once: a sampling VAE must not differ between models)."""
        if self._eval_z is None:
            with torch.no_grad():
                parts = [self.eval_x[lo:lo + 128].to(self.device) for lo in range(0, len(self.eval_x), 128)]
                if self.data.encode is not None:
                    parts = [self.data.encode(x) for x in parts]
                self._eval_z = torch.cat([x.float().cpu() for x in parts])
            gen = torch.Generator().manual_seed(self.s.seed)
            self._eval_noise = torch.randn(self._eval_z.shape, generator=gen)
        assert self._eval_noise is not None
        return self._eval_z, self._eval_noise

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        """Mean training loss (MSE + VB) of the model on the fixed items, timesteps and noise."""
        from terdit.diffusion import GaussianDiffusion

        diffusion = GaussianDiffusion.create(None, learn_sigma=model.config.learn_sigma)
        z, noise = self._model_space_batch()
        total = 0.0
        for lo in range(0, len(z), 128):
            x, e = z[lo:lo + 128].to(self.device), noise[lo:lo + 128].to(self.device)
            y, t = self.eval_y[lo:lo + 128].to(self.device), self.eval_t[lo:lo + 128].to(self.device)
            terms = diffusion.training_losses(lambda xt, tt, y=y: model(xt, tt, y, return_dict=False)[0], x, t, e)
            total += float(terms["loss"].sum())
        return total / len(z)

    def labels(self) -> list[int]:
        return [k % self.num_classes for k in range(self.s.num_samples)]

    @torch.no_grad()
    def sample(self, model: nn.Module, cfg: float) -> torch.Tensor:
        """K samples, classes uniform; the same noise for every variant (paired comparison)."""
        from terdit.sampling.generate import sample_latents

        labels = self.labels()
        parts = []
        for k, lo in enumerate(range(0, len(labels), SAMPLE_CHUNK)):
            parts.append(sample_latents(model, labels[lo:lo + SAMPLE_CHUNK], cfg_scale=cfg,
                                        steps=self.s.sample_steps, seed=self.s.seed + k, device=self.device).cpu())
        return torch.cat(parts)

    def measure(self, model: nn.Module, cfg: float, grid: Path | None) -> dict[str, Any]:
        model.eval()
        t0 = time.perf_counter()
        images = self.sample(model, cfg)
        out: dict[str, Any] = {"eval_loss": self.eval_loss(model), "num_samples": len(images)}
        if grid is not None:
            self.save_grid(images, grid)
        if self.mode == "digits":
            out.update(self.digits_metrics(images))
        out["eval_s"] = time.perf_counter() - t0
        return out

    def digits_metrics(self, images: torch.Tensor) -> dict[str, Any]:
        from terdit.data.digits import class_accuracy
        from terdit.eval.metrics import inception_score, precision_recall
        from terdit.sampling.generate import to_uint8

        feats = self.extractor(to_uint8(images))
        fid, notes = self.fid(feats["pool"])
        precision, recall = precision_recall(self.ref_feats["pool"], feats["pool"])
        labels = np.asarray(self.labels())
        per_class = [class_accuracy(images[labels == c], labels[labels == c], self.classifier)
                     for c in range(self.num_classes)]
        return {"fid": fid, "inception_score": inception_score(feats["logits"]), "precision": precision,
                "recall": recall, "class_acc": class_accuracy(images, labels, self.classifier),
                "per_class_acc": per_class, "notes": notes}

    def fid(self, pool: np.ndarray) -> tuple[float, list[str]]:
        """FID in the digits feature space; a degenerate sample set (e.g. a collapsed PTQ model) is measured
        with a small ridge on both covariances instead of failing the whole report."""
        from terdit.eval.metrics import Statistics, compute_statistics, frechet_distance

        stats = compute_statistics(pool)
        try:
            return frechet_distance(self.ref_stats, stats), []
        except TerditError:
            ridge = 1e-4 * np.eye(len(stats.mu))
            value = frechet_distance(Statistics(self.ref_stats.mu, self.ref_stats.sigma + ridge),
                                     Statistics(stats.mu, stats.sigma + ridge))
            return value, ["FID computed with a 1e-4 ridge on the covariances (degenerate samples)"]

    def real_baseline(self) -> dict[str, Any] | None:
        """The metrics of K real digits drawn without replacement: what a perfect model would score with K."""
        if self.mode != "digits":
            return None
        from terdit.data.digits import load_digits_arrays

        x, y = load_digits_arrays("all")
        rng = np.random.default_rng(self.s.seed)
        shuffled = {c: rng.permutation(np.flatnonzero(y == c)) for c in range(self.num_classes)}
        seen = dict.fromkeys(shuffled, 0)
        take = []
        for c in self.labels():  # the generated samples' label sequence, so per-class slices line up
            take.append(shuffled[c][seen[c] % len(shuffled[c])])  # repeats only if K/10 > ~175
            seen[c] += 1
        out = self.digits_metrics(torch.from_numpy(x[take]))
        out["num_samples"] = len(take)
        return out

    def save_grid(self, images: torch.Tensor, path: Path) -> None:
        """Up to 8 samples of each of up to 10 classes, one class per row."""
        from terdit.sampling.generate import save_grid

        labels = np.asarray(self.labels())
        classes = range(min(self.num_classes, 10))
        per = max(1, min(8, min(int((labels == c).sum()) for c in classes)))
        order = [int(i) for c in classes for i in np.flatnonzero(labels == c)[:per]]
        chosen = images[order]
        if self.data.decode is not None:
            with torch.no_grad():
                chosen = torch.cat([self.data.decode(chosen[i:i + 16].to(self.device)).cpu()
                                    for i in range(0, len(chosen), 16)])
        save_grid(chosen, path, nrow=per)


def ptq_model(fp_run: Path, method: str, granularity: str, checkpoint: Path | None = None,
              device: str = "cpu") -> tuple[nn.Module, list]:
    """The full-precision run's EMA model, fake-quantized post training by `terdit.quant.ptq`."""
    from terdit.quant.ptq import quantize_model

    model = runlib.load_run_model(fp_run, ema=True, checkpoint=checkpoint, device=device)
    return model, quantize_model(model, method, granularity)


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
    """Evaluations at every checkpoint (first cfg) and at the last checkpoint (every cfg, with sample grids).

    PTQ variants are evaluated at the full-precision run's last checkpoint only."""
    src = runs[variant.name if variant.trained else FP]
    ckpts = {int(p.name): p for p in runlib.checkpoint_dirs(src)}
    shared = [EvalCache(Path(s.out) / "evals" / f"{n}.json") for n in runs if n != variant.name]
    wanted = [st for st in s.eval_steps() if st in ckpts] if variant.trained else [s.steps]
    cache = EvalCache(Path(s.out) / "evals" / f"{variant.name}.json")
    results = []
    for step in wanted:
        for cfg in (s.cfg if step == s.steps else s.cfg[:1]):
            grid = Path(s.out) / "samples" / f"{variant.name}_cfg{cfg:g}.png" if step == s.steps else None
            key = f"step={step} cfg={cfg:g} n={s.num_samples} S={s.sample_steps} seed={s.seed} mode={ev.mode}"
            stamp = _stamp(ckpts[step])
            entry = cache.get(key, stamp, grid)
            if entry is None and grid is None:  # a checkpoint copied from another run (terdit-lr-drop's start)
                entry = next((c.get(key, stamp, None) for c in shared if c.get(key, stamp, None)), None)
                if entry is not None:
                    cache.put(key, entry)
            if entry is None:
                _log(f"{variant.name}: evaluating step {step}, cfg {cfg:g}")
                if variant.trained:
                    model = runlib.load_run_model(src, ema=True, checkpoint=ckpts[step], device=str(ev.device))
                    extra: dict[str, Any] = {}
                else:
                    method, granularity = variant.ptq  # type: ignore[misc]
                    model, reports = ptq_model(src, method, granularity, ckpts[step], str(ev.device))
                    levels = [distinct_levels(lin.weight) for lin in _ptq_linears(model)]
                    extra = {"ptq": {"method": method, "granularity": granularity, "source": str(src),
                                     "source_step": step, "layers": len(reports),
                                     "mean_rel_error": float(np.mean([r.rel_error for r in reports])),
                                     "max_levels_per_tensor": max(a for a, _ in levels),
                                     "max_levels_per_row": max(b for _, b in levels)}}
                entry = {"step": step, "cfg": cfg, **ev.measure(model, cfg, grid), **extra, "stamp": stamp}
                if grid is not None:
                    entry["grid"] = str(grid.relative_to(s.out))
                cache.put(key, entry)
            results.append({k: v for k, v in entry.items() if k != "stamp"})
    return results


def _ptq_linears(model: nn.Module) -> list[nn.Linear]:
    from terdit.quant.ptq import quantizable_linears

    return list(quantizable_linears(model).values())


# -- the claims -------------------------------------------------------------------------------------------------
def final_eval(results: dict[str, Any], name: str, cfg: float) -> dict[str, Any] | None:
    v = results["variants"].get(name)
    if not v:
        return None
    last = [e for e in v["evals"] if e["step"] == results["settings"]["steps"] and e["cfg"] == cfg]
    return last[0] if last else None


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


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


def _verdict(held: bool | None) -> str:
    return {True: "held", False: "did not hold", None: "not tested"}[held]


# -- the whole command -------------------------------------------------------------------------------------------
def reproduce(s: Settings) -> dict[str, Any]:
    """Train, evaluate and report every requested variant; returns what results.json holds."""
    s.validate()
    from terdit.models.configs import get_config

    get_config(s.config)  # an unknown name or an impossible metric fails before anything is written
    metric_mode(s)
    t0 = time.perf_counter()
    out = Path(s.out)
    names = list(dict.fromkeys(s.variants))
    needs_fp = any(not VARIANTS[n].trained for n in names)
    train_names = [n for n in VARIANTS if VARIANTS[n].trained and (n in names or (n == FP and needs_fp))]
    runs: dict[str, Path] = {}
    status: dict[str, str] = {}
    for n in train_names:
        # terdit also leaves a checkpoint where terdit-lr-drop drops its LR, for that run to continue from
        stop = s.lr_drop_step if n == "terdit" and "terdit-lr-drop" in train_names else None
        runs[n], status[n] = ensure_trained(VARIANTS[n], s, stop_at=stop)
    device = torch.device(s.device or default_device())
    ev = Evaluator(s, device)
    results: dict[str, Any] = {
        "command": s.command_line(), "sys_argv": list(sys.argv), "machine": machine_info(),
        "settings": dataclasses.asdict(s) | {"lr_drop_step": s.lr_drop_step, "eval_steps": s.eval_steps(),
                                             "smoothing": SMOOTHING,
                                             "ema_decay": train_args_for(VARIANTS["terdit"], s).ema_decay},
        "metric_mode": ev.mode, "variants": {},
    }
    order = [n for n in VARIANTS if n in names or n in train_names]
    for n in order:
        v = VARIANTS[n]
        entry: dict[str, Any] = {"label": v.label, "kind": "trained" if v.trained else "ptq"}
        if v.trained:
            steps, losses = read_loss_log(runs[n])
            args = runlib.load_train_args(runs[n])
            entry.update(run=str(runs[n].relative_to(out)), status=status[n], train_s=training_seconds(runs[n]),
                         final_loss=final_loss(losses),
                         final_loss_smoothed=float(smooth(losses)[-1]) if losses else None,
                         ema_decay=args.get("ema_decay"),
                         train_args={k: args.get(k) for k in _SIGNATURE}, loss_steps=steps, loss=losses)
            entry["s_per_step"] = entry["train_s"] / max(1, s.steps)
        else:
            entry.update(source_run=str(runs[FP].relative_to(out)), method=v.ptq[0], granularity=v.ptq[1])
        entry["evals"] = evaluate_variant(v, ev, s, runs)
        results["variants"][n] = entry
    results["real_data"] = ev.real_baseline()
    results["adaln_scale"] = adaln_scales(runs)
    results["claims"] = judge_claims(results)
    results["wall_s"] = time.perf_counter() - t0
    write_plots(results, out)
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=1) + "\n")
    atomic_write_text(out / "report.md", render_report(results))
    return results


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


# -- plots and report -----------------------------------------------------------------------------------------------
def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path) -> None:
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


def render_report(results: dict[str, Any]) -> str:
    s = results["settings"]
    cfgs = s["cfg"]
    digits = results["metric_mode"] == "digits"
    m = results["machine"]
    lines = [
        "# TerDiT at small scale: the paper's comparisons",
        "",
        f"Produced by `{results['command']}` in {results['wall_s']:.0f} s of wall time "
        f"({'the quick CI budget' if s['quick'] else 'the full budget'}).",
        "",
        f"Machine: {m['platform']}, {m.get('usable_cores', m['cpu_count'])} usable cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), CUDA: {m['cuda'] or 'none'}, load average at start "
        f"{m.get('load_average_at_start')}. Training times depend on what else the machine ran.",
        "",
        f"Setup: config `{s['config']}` on {s['data'] or 'the embedded 8x8 digits'}, {s['steps']} steps, "
        f"batch {s['batch_size']}, AdamW lr {s['lr']:g} (the LR-drop variant: {s['lr_after_drop']:g} from step "
        f"{s['lr_drop_step']}), seed {s['seed']}, EMA decay "
        f"{s['ema_decay']:.4g}"
        f" for every variant. Evaluation: EMA weights, {s['num_samples']} samples (classes uniform), "
        f"{s['sample_steps']} DDPM steps, the same noise for every variant; checkpoints every {s['eval_every']} "
        f"steps at cfg {cfgs[0]:g} (the paper's FID setting), the last one also at cfg "
        f"{', '.join(f'{c:g}' for c in cfgs[1:]) or '–'}.",
        "",
    ]
    if digits:
        lines += [
            "Metrics: FID, IS, Precision and Recall as ADM computes them, in the feature space of a small digits "
            "classifier (`terdit.eval.digits`) against all 1797 real digits (the training data); class acc = share "
            "of samples a logistic regression on raw pixels assigns their label. Absolute values are not "
            "comparable with ImageNet numbers; only the ordering of the variants means something. The "
            "`real digits` row is the score of real images with the same sample count: the floor a perfect "
            "model would reach.",
            "",
        ]
    else:
        lines += ["Metrics: no image metric applies to this data with the digits extractor, so each variant is "
                  "measured by a fixed eval loss (the training loss on fixed items, timesteps and noise) and sample "
                  "grids are written; evaluate sample npz files with `terdit eval` for Inception metrics.", ""]
    for cfg in cfgs if digits else cfgs[:1]:  # the eval loss does not depend on the guidance scale
        lines += [f"## Last checkpoint, cfg {cfg:g}" if digits else "## Last checkpoint", ""]
        if digits:
            lines += ["| Models | FID↓ | IS↑ | Precision↑ | Recall↑ | class acc↑ | eval loss↓ | final loss | train s |",
                      "|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| Models | eval loss↓ | final loss | train s |", "|---|---|---|---|"]
        for n, v in results["variants"].items():
            e = final_eval(results, n, cfg) or {}
            tail = [_fmt(v.get("final_loss"), 4), _fmt(v.get("train_s"), 4)]
            if digits:
                row = [_fmt(e.get("fid")), _fmt(e.get("inception_score")), _fmt(e.get("precision")),
                       _fmt(e.get("recall")), _fmt(e.get("class_acc")), _fmt(e.get("eval_loss"), 4), *tail]
            else:
                row = [_fmt(e.get("eval_loss"), 4), *tail]
            lines.append(f"| {n} | " + " | ".join(row) + " |")
        r = results.get("real_data")
        if digits and r and cfg == cfgs[0]:
            lines.append(f"| real digits ({r['num_samples']}) | {_fmt(r['fid'])} | {_fmt(r['inception_score'])} | "
                         f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['class_acc'])} | – | – | – |")
        lines.append("")
    lines += ["final loss = mean raw training loss over the last 10% of the steps; train s = seconds in training "
              "steps (from the logged step rates). PTQ rows are the full-precision model's EMA weights quantized "
              "after training (round to nearest, weight only, block linears; `terdit.quant.ptq`).", ""]

    lines += ["## The paper's claims at this scale", "",
              f"Judged at the last checkpoint, cfg {cfgs[0]:g}, one seed: differences smaller than the noise "
              + (f"of FID with {s['num_samples']} samples" if digits else "between runs with different seeds")
              + " are not meaningful.", ""]
    for c in results["claims"]:
        nums = ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}" for k, v in c["numbers"].items()
                         if not isinstance(v, dict))
        failed = c["numbers"].get("failed")
        if isinstance(failed, dict) and failed:
            nums += "; failed: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in failed.items())
        lines.append(f"- **({c['id']}) {c['claim']}: {_verdict(c['held'])}.** Criterion: {c['criterion']}. "
                     f"Numbers: {nums}.")
    lines.append("")

    evals = [(n, e) for n, v in results["variants"].items() if v["kind"] == "trained"
             for e in v["evals"] if e["cfg"] == cfgs[0]]
    if evals:
        key, label = ("fid", "FID") if digits else ("eval_loss", "eval loss")
        steps = sorted({e["step"] for _, e in evals})
        lines += [f"## Over training (Fig. 8 analogue): {label}" + (" / class acc" if digits else "")
                  + f", cfg {cfgs[0]:g}", "", "| Models | " + " | ".join(str(x) for x in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for n in dict.fromkeys(n for n, _ in evals):
            by = {e["step"]: e for m_, e in evals if m_ == n}
            cells = []
            for st in steps:
                e = by.get(st)
                cells.append("–" if e is None else _fmt(e.get(key)) +
                             (f" / {_fmt(e.get('class_acc'))}" if digits else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "![metrics over steps](metrics_vs_step.png)", ""]

    if digits:
        lines += [f"## Per-class accuracy, last checkpoint, cfg {cfgs[-1]:g}", "",
                  "| Models | " + " | ".join(str(c) for c in range(10)) + " |", "|---|" + "---|" * 10]
        for n in results["variants"]:
            e = final_eval(results, n, cfgs[-1]) or {}
            pc = e.get("per_class_acc") or []
            lines.append(f"| {n} | " + " | ".join(_fmt(x, 2) for x in pc) + " |")
        lines.append("")

    window = 1 / (1 - SMOOTHING)
    share = (f"{100 * window / s['steps']:.0f}% of this {s['steps']}-step run" if window < s["steps"]
             else f"longer than this whole {s['steps']}-step run, so each point is close to the mean of all "
                  "losses so far")
    lines += ["## Loss curves (Fig. 7 analogue)", "",
              f"Exponential smoothing with the paper's factor {SMOOTHING} (debiased, as TensorBoard draws it), "
              f"applied per logged step: each point averages roughly the last {window:.0f} steps, which is "
              f"{share}. The paper's runs are hundreds of thousands of steps, so there the same factor is a much "
              "shorter window; here the smoothed curves lag the raw losses (faint lines) and early points carry "
              "the first, high losses. The table's final loss is the unsmoothed mean of the last 10% of steps.",
              "", "![loss curves](loss_curves.png)", ""]
    if any(v["kind"] == "trained" for v in results["variants"].values()) and \
            {"terdit", "terdit-no-norm"} <= set(results["variants"]):
        lines += ["![with and without adaLN RMSNorm](loss_adaln_norm.png)", ""]
    scales = results.get("adaln_scale") or {}
    if scales:
        lines += ["## adaLN scale_mlp at the first sampling step (Fig. 9 analogue)", "",
                  "| Models | block | min | median | max | std |", "|---|---|---|---|---|---|"]
        for n, a in scales.items():
            lines.append(f"| {n} | {a['block']} | {_fmt(a['min'])} | {_fmt(a['median'])} | {_fmt(a['max'])} | "
                         f"{_fmt(a['std'])} |")
        lines += ["", "![adaLN scale](adaln_scale.png)", ""]
    lines += ["## Samples", "", "EMA weights, last checkpoint; one class per row.", ""]
    for n, v in results["variants"].items():
        for e in v["evals"]:
            if e.get("grid"):
                lines.append(f"**{n}, cfg {e['cfg']:g}**  \n![{n} cfg {e['cfg']:g}]({e['grid']})  ")
    lines += ["", "## Notes", "",
              "- Every trained variant is the same `terdit train` recipe with different switches: `full-precision` "
              "= plain linears without the adaLN RMSNorm (Large-DiT); `terdit` = ternary linears with it; "
              "`terdit-no-norm` = ternary without it; `bitnet` = BitLinear (input RMSNorm, 8-bit activations, "
              "absmean ternary weights) in every block linear, attention/FFN norms removed, no adaLN RMSNorm; "
              f"`terdit-lr-drop` = `terdit` with the LR dropped to {s['lr_after_drop']:g} at "
              f"{s['lr_drop_fraction']:.0%} of the steps (the paper drops at 1550k of 1750k).",
              "- The PTQ baselines are round-to-nearest weight quantizers (not Q-DiT/Q-Diffusion's calibrated ones), "
              "applied to the attention, FFN and adaLN linears of every block; embeddings and the final layer stay "
              "in full precision, as in TerDiT.",
              "- Every number is in `results.json`; the runs are ordinary `terdit` run folders under `runs/`.", ""]
    return "\n".join(lines)
