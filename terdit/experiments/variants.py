"""The variants `terdit reproduce` compares, and the settings every one of them shares.

Every trained variant is the same model and trainer with different switches (`TrainArgs`), trained on the same
data with the same seed, step budget and schedule; the post-training-quantization (PTQ) baselines are the trained
full-precision model passed through `terdit.quant.ptq`.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from terdit.defaults import device_setting, positive_int, setting
from terdit.errors import TerditError
from terdit.training.trainer import TrainArgs


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: trainer switches, or a PTQ recipe applied to the full-precision run."""

    name: str
    label: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainArgs overrides; empty for PTQ variants
    ptq: tuple[str, str] | None = None  # (method, granularity)
    distilled: bool = False  # a ternary student distilled data-free from the full-precision run (terdit distill)

    @property
    def trained(self) -> bool:
        """Trained from scratch for the study's step budget (not derived from the full-precision run)."""
        return self.ptq is None and not self.distilled

    @property
    def kind(self) -> str:
        return "trained" if self.trained else "ptq" if self.ptq else "distilled"


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("full-precision", "Full precision (Large-DiT)", {"linear": "fp", "adaln_norm": False}),
    Variant("terdit", "TerDiT (ternary + adaLN RMSNorm)", {"linear": "ternary", "adaln_norm": True}),
    Variant("terdit-no-norm", "TerDiT without adaLN RMSNorm", {"linear": "ternary", "adaln_norm": False}),
    Variant("bitnet", "BitNet b1.58 (QAT)", {"linear": "bitnet", "adaln_norm": False}),
    Variant("terdit-lr-drop", "TerDiT, LR 5e-4 -> 1e-4", {"linear": "ternary", "adaln_norm": True, "lr_drop": True}),
    Variant("terdit-a8", "TerDiT with 8-bit activations (QAT, exact on the CPU integer path)",
            {"linear": "ternary", "adaln_norm": True, "act_bits": 8}),
    Variant("terdit-distilled", "TerDiT distilled data-free from the full-precision run", distilled=True),
    Variant("ptq-ternary-tensor", "PTQ ternary, per tensor", ptq=("ternary", "tensor")),
    Variant("ptq-ternary-channel", "PTQ ternary, per channel", ptq=("ternary", "channel")),
    Variant("ptq-2bit-tensor", "PTQ 2-bit, per tensor", ptq=("2bit", "tensor")),
    Variant("ptq-2bit-channel", "PTQ 2-bit, per channel", ptq=("2bit", "channel")),
]}
FP = "full-precision"
COLORS = {n: f"C{k}" for k, n in enumerate(VARIANTS)}  # one colour per variant in every plot

# the full budget: 5000 steps is where every trained variant's FID curve flattened on the digits (a 3000-step study
# left the ternary ones still improving); 25 DDPM steps and 250-sample curve points keep its evaluation within
# ~1.1 h of process time (3 seeds) while the claims' numbers use 2000 samples
FULL_BUDGET = dict(steps=5000, batch_size=128, eval_every=1000, num_samples=2000, curve_samples=250, sample_steps=25,
                   seeds=[0, 1, 2], distill_steps=500, ema_horizon=300)
QUICK_BUDGET = dict(steps=30, batch_size=32, eval_every=15, num_samples=100, curve_samples=50, sample_steps=10,
                    seeds=[0, 1], distill_steps=10, ema_horizon=3)
# the distilled variant's teacher pool (benchmarks/distill_digits.py's settings, where 500 steps reached 1.27x the
# teacher's FID at cfg 1.5)
DISTILL_POOL = dict(pool_size=512, pool_reuse=8, pool_steps=10)


@dataclass
class Settings:
    """What `terdit reproduce` was asked for, with the budget resolved (`--quick` or the full one)."""

    out: str = setting("reproduce", "report folder (runs, evaluations, report.md)")
    quick: bool = setting(False, f"CI budget: {', '.join(f'{k}={v}' for k, v in QUICK_BUDGET.items())}")
    config: str = setting("TerDiT-Digits", "model config (see `terdit configs`)")
    data: str | None = setting(None, "training data (default: the embedded digits)")
    steps: int = setting(FULL_BUDGET["steps"], type=positive_int)
    batch_size: int = setting(FULL_BUDGET["batch_size"], type=positive_int)
    lr: float = setting(TrainArgs.lr, cli=False)  # the trainer's defaults: every variant trains as terdit train
    lr_after_drop: float = setting(TrainArgs.lr_after_drop, cli=False)
    lr_drop_fraction: float = setting(0.8, "where terdit-lr-drop drops its LR (the paper: 1550k of 1750k steps)",
                                      type=float)
    ema_horizon: int = setting(FULL_BUDGET["ema_horizon"], "EMA horizon 1/(1 - decay) in steps; fixed, not scaled "
                               "with --steps, so a longer budget continues a shorter one's runs exactly",
                               type=positive_int)
    seeds: list[int] = setting(help="training seeds: every trained variant runs once per seed",
                               type=int, nargs="+", default_factory=lambda: list(FULL_BUDGET["seeds"]))
    jobs: int = setting(0, "seeds trained and evaluated at once in separate processes, torch's threads split "
                        "between them (0: every seed at once)", type=int)
    variants: list[str] = setting(help=f"which rows to produce (default all): {', '.join(VARIANTS)}",
                                  choices=list(VARIANTS), nargs="+", metavar="NAME",
                                  default_factory=lambda: list(VARIANTS))
    num_samples: int = setting(FULL_BUDGET["num_samples"], "samples per evaluation of the last checkpoint at the "
                               "first cfg (the claims' numbers)", type=positive_int)
    curve_samples: int = setting(FULL_BUDGET["curve_samples"], "samples per evaluation of earlier checkpoints and "
                                 "other cfgs (the curves); the FID of the first this many of the last checkpoint's "
                                 "samples continues the curve", type=positive_int)
    distill_steps: int = setting(FULL_BUDGET["distill_steps"], "training steps of terdit-distilled", type=positive_int)
    sample_steps: int = setting(FULL_BUDGET["sample_steps"], "DDPM sampling steps", type=positive_int)
    cfg: list[float] = setting(help="guidance scales: the first at every checkpoint and for the claims, all at the "
                               "last", type=float, nargs="+", default_factory=lambda: [1.5, 4.0])
    eval_every: int = setting(FULL_BUDGET["eval_every"], "checkpoint and evaluate every N steps", type=positive_int)
    metrics: str = setting("auto", "auto: digits features for digits data, eval loss otherwise",
                           choices=["auto", "digits", "loss"])
    device: str | None = device_setting("cpu or cuda (default: cuda if present)")
    progress: bool = setting(True)

    @property
    def seed(self) -> int:
        """The seed of a one-seed Settings (see for_seed)."""
        return self.seeds[0]

    def for_seed(self, seed: int) -> Settings:
        """The one-seed study inside OUT/seed<k>: its runs, evaluations and sample grids."""
        return dataclasses.replace(self, out=str(Path(self.out) / f"seed{seed}"), seeds=[seed])

    @property
    def ema_decay(self) -> float:
        return 1.0 - 1.0 / self.ema_horizon

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
            (10 <= self.curve_samples <= self.num_samples,
             f"--curve-samples must be in [10, --num-samples], got {self.curve_samples}"),
            (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
             f"--seeds must be distinct and >= 0, got {self.seeds}"),
            (self.jobs >= 0, f"--jobs must be >= 0, got {self.jobs}"),
            (1 <= self.sample_steps <= 1000, f"--sample-steps must be in [1, 1000], got {self.sample_steps}"),
            (bool(self.cfg) and all(c >= 0 for c in self.cfg), f"--cfg values must be >= 0, got {self.cfg}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (self.ema_horizon >= 1, f"--ema-horizon must be >= 1, got {self.ema_horizon}"),
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
        parts += ["--steps", str(self.steps), "--batch-size", str(self.batch_size),
                  "--seeds", *map(str, self.seeds), "--eval-every", str(self.eval_every),
                  "--num-samples", str(self.num_samples), "--curve-samples", str(self.curve_samples),
                  "--distill-steps", str(self.distill_steps), "--ema-horizon", str(self.ema_horizon),
                  "--sample-steps", str(self.sample_steps), "--cfg", *[f"{c:g}" for c in self.cfg],
                  "--lr-drop-fraction", f"{self.lr_drop_fraction:g}", "--metrics", self.metrics,
                  "--variants", *self.variants]
        if self.device:
            parts += ["--device", self.device]
        return shlex.join(parts)


def train_args_for(variant: Variant, s: Settings) -> TrainArgs:
    """The variant's TrainArgs: shared settings plus its switches, nothing tuned per variant.

    The distilled variant takes its model from the teacher and trains `distill_steps` with the same batch and LR."""
    if variant.ptq:
        raise TerditError(f"{variant.name} is not trained: it quantizes the full-precision run")
    if variant.distilled:
        return TrainArgs(out=str(Path(s.out) / "runs" / variant.name), steps=s.distill_steps,  # data-free: no data
                         batch_size=s.batch_size, lr=s.lr, seed=s.seed, ckpt_every=s.distill_steps,
                         keep_checkpoints=10**9, log_every=1, sample_steps=s.sample_steps, tensorboard=False,
                         progress=s.progress, device=s.device, ema_decay=TrainArgs(steps=s.distill_steps)
                         .resolved_ema_decay())
    sw = dict(variant.train)
    drop = sw.pop("lr_drop", False)
    return TrainArgs(
        out=str(Path(s.out) / "runs" / variant.name), config=s.config, data=s.data, steps=s.steps,
        batch_size=s.batch_size, lr=s.lr, lr_after_drop=s.lr_after_drop,
        lr_drop_step=s.lr_drop_step if drop else None, seed=s.seed, ckpt_every=s.eval_every,
        keep_checkpoints=10**9, log_every=1, sample_steps=s.sample_steps, tensorboard=False, progress=s.progress,
        device=s.device, ema_decay=s.ema_decay, **sw,
    )
