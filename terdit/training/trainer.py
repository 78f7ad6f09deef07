"""Quantization-aware training from scratch: one CPU, or many GPUs under `torchrun` (DDP or FSDP).

Every random draw of step s on rank r comes from a generator seeded with (seed, s, r), and the data
order is a pure function of (seed, step), so a run stopped at a checkpoint and resumed reproduces the
uninterrupted run's losses exactly.

Nothing is lost: the run folder is locked while training (a second writer is refused at once), a
checkpoint is written every `ckpt_every` steps and every `ckpt_minutes` minutes, and SIGINT / SIGTERM
finish the current step, write a checkpoint and stop (exit 130 / 143 from the CLI); `--resume` continues
exactly and refuses changed model, data, batch or lr settings unless `--override` is given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from terdit.data import TrainingData, open_training_data
from terdit.data.base import derived_seed
from terdit.defaults import (
    DTYPES,
    device_setting,
    dtype_setting,
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_int,
    resolve_device,
    resolve_dtype,
    setting,
)
from terdit.diffusion import GaussianDiffusion
from terdit.distributed import DistInfo, barrier, init_distributed, mean_across, shutdown
from terdit.errors import Interrupted, TerditError
from terdit.io import (
    atomic_dir,
    atomic_write_text,
    check_writable,
    clean_leftovers,
    fault_point,
    load_torch_state,
    locked,
    remove_tree,
    save_tensors,
)
from terdit.models import runs as runlib
from terdit.models.compiling import compile_with_fallback, repeated_blocks
from terdit.models.configs import TerDiTConfig, get_config
from terdit.models.memory import check_batch_fits
from terdit.models.terdit import TerDiT
from terdit.quant.ternary import set_act_bits
from terdit.sampling.generate import make_grid, sample_latents, save_grid, to_uint8

LINEARS = ("fp", "ternary", "bitnet")


@dataclass
class TrainArgs:
    """Everything `terdit train` takes (its flags are generated from these fields); stored resolved in
    RUN/train_args.json."""

    out: str = setting("runs/digits", "run folder to write")
    config: str = setting("TerDiT-Digits", "model config name (see `terdit configs`)")
    linear: str = setting("ternary", "block linears: fp (full-precision twin, Large-DiT: plain linears, no RMSNorm "
                          "after adaLN), ternary (TerDiT) or bitnet (BitNet b1.58 baseline)", choices=LINEARS,
                          aliases={"--no-ternary": "fp"})
    adaln_norm: bool | None = setting(  # None: on for ternary/bitnet, off for fp (Large-DiT)
        None, "keep the RMSNorm after adaLN in a full-precision model (default: off, as Large-DiT)",
        negative=("--no-adaln-norm", "drop the RMSNorm after adaLN (the paper's ablation)"))
    alpha_init: str | None = setting(None, "initial alpha of ternary layers (config default: absmean)",
                                     choices=["absmean", "randn", "ones"])
    qk_norm: bool = setting(False, "LayerNorm on q and k")
    act_bits: int | None = setting(None, "ternary layers see 8-bit per-token activations (BitNet-style QAT; exact "
                                   "on --policy int8)", type=int, choices=[8])
    data: str | None = setting(None, "image folder or latent folder (default: embedded digits)")
    resolution: int | None = setting(None, "image resolution (image folders)", type=positive_int)
    vae: str | None = setting(None, "VAE hub id or local dir for image folders ('none': pixels)")
    flip: bool = setting(True, "no random horizontal flips")
    vae_sample: bool = setting(True, "encode images with the posterior mean (default: a sample, as DiT)",
                               flags=["--vae-mean"])
    class_map: str | None = setting(None, "JSON {folder name: class index} for image folders")
    strict_data: bool = setting(False, "fail on unreadable images instead of skipping")
    steps: int = setting(2000, type=positive_int)
    batch_size: int = setting(128, "global batch size", type=positive_int)
    grad_accum: int = setting(1, type=positive_int)
    lr: float = setting(5e-4, type=finite_float)
    lr_drop_step: int | None = setting(None, "step at which lr drops", type=positive_int)
    lr_after_drop: float = setting(1e-4, type=finite_float)
    weight_decay: float = setting(0.0, cli=False)
    ema_decay: float | None = setting(None, "default 0.9999, capped so the EMA horizon is <= 10%% of --steps",
                                      type=finite_float)
    grad_clip: float = setting(2.0, "0 disables clipping", type=nonneg_float)
    seed: int = setting(0, type=int)
    ckpt_every: int | None = setting(1000, "checkpoint every N steps", type=positive_int)
    ckpt_minutes: float = setting(10.0, "also checkpoint when this many minutes passed since the last checkpoint "
                                  "(0: never)", type=nonneg_float)
    keep_checkpoints: int = setting(2, type=positive_int)
    log_every: int = setting(10, type=positive_int)
    sample_every: int | None = setting(None, "write a sample grid every N steps", type=positive_int)
    sample_cfg: float = setting(4.0, "guidance of the sample grids", type=nonneg_float)
    sample_steps: int = setting(250, "sampling steps of the sample grids", type=positive_int)
    parallel: str = setting("ddp", "under torchrun", choices=["ddp", "fsdp"])
    num_workers: int = setting(0, type=nonneg_int)
    grad_checkpointing: bool = setting(False)
    compile: bool = setting(False, "torch.compile each transformer block for training (the first steps compile: "
                            "seconds to a minute); a ternary QAT step then costs about what the FP twin's does")
    tensorboard: bool = setting(True)
    progress: bool = setting(True)
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    override: bool = setting(False, "with --resume: accept model, data, batch or lr settings that differ from the "
                             "run's")  # on resume, accept changed model / data / batch / lr settings
    init_from: str | None = setting(None, "start from another run's EMA weights")
    device: str | None = device_setting()
    precision: str | None = dtype_setting()

    @staticmethod
    def upgrade(stored: dict[str, Any]) -> dict[str, Any]:
        """train_args.json of older runs spelled the linear kind `ternary: bool` (with `linear: null`)."""
        stored = dict(stored)
        ternary = stored.pop("ternary", None)
        if stored.get("linear") is None and ("linear" in stored or ternary is not None):
            stored["linear"] = "fp" if ternary is False else "ternary"
        return stored

    def resolved_ema_decay(self) -> float:
        """0.9999 (DiT, Large-DiT), capped so the EMA horizon 1/(1-decay) is at most 10% of the run."""
        if self.ema_decay is not None:
            return self.ema_decay
        return min(0.9999, 1.0 - 1.0 / max(1.0, 0.1 * self.steps))

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.linear in LINEARS, f"linear must be one of {', '.join(LINEARS)}, got {self.linear!r}"),
            (self.parallel in ("ddp", "fsdp"), f"parallel must be ddp or fsdp, got {self.parallel}"),
            (self.precision is None or self.precision in DTYPES, f"precision: unknown dtype {self.precision!r}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.ckpt_every is None or self.ckpt_every >= 1, f"ckpt_every must be >= 1, got {self.ckpt_every}"),
            (math.isfinite(self.ckpt_minutes) and self.ckpt_minutes >= 0,
             f"ckpt_minutes must be >= 0, got {self.ckpt_minutes}"),
            (all(math.isfinite(v) for v in (self.lr, self.lr_after_drop, self.grad_clip, self.sample_cfg,
                                            self.weight_decay)),
             "lr, lr_after_drop, grad_clip, weight_decay and sample_cfg must be finite numbers"),
            (self.act_bits in (None, 8), f"act_bits must be 8, got {self.act_bits}"),
            (not (self.compile and self.grad_checkpointing),  # recompute would pick another compiled graph
             "--compile does not work with --grad-checkpointing yet: leave one of them out"),
            (not (self.compile and self.parallel == "fsdp"), "--compile is not supported with --parallel fsdp yet "
             "(use ddp, or leave --compile out)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TerditError(msg)


_DATA_ORDER, _STEP_NOISE = 1, 2  # distinct key spaces for the two uses


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of virtual indices v = epoch * N + i, a pure function of (seed, micro-batch number).

    The global stream is the concatenation of per-epoch permutations; micro-batch m covers stream
    positions [m * B, (m + 1) * B) with B the global micro-batch, and rank r takes its slice of it.
    """

    def __init__(self, n: int, micro_batch: int, seed: int, rank: int, world: int, start: int = 0):
        self.n, self.b, self.seed, self.rank, self.world, self.start = n, micro_batch, seed, rank, world, start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, _DATA_ORDER, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch(self, m: int) -> list[int]:
        global_b = self.b * self.world
        lo = m * global_b + self.rank * self.b
        out = []
        for p in range(lo, lo + self.b):
            epoch, k = divmod(p, self.n)
            out.append(epoch * self.n + int(self._perm_of(epoch)[k]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a number
        return 2**62


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # torch has a fused AdamW kernel for both (CUDA not measured here: no GPU)


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The trainer's AdamW, fused (one kernel over all parameters) where the parameters' device has the kernel.

    torch's default on CPU is a Python loop of ~10 ops per parameter tensor with weight-sized temporaries; the
    fused kernel made a dim-512 batch-8 QAT step 1.35x faster on CPU (0.287 -> 0.212 s ternary, 0.254 -> 0.184 s
    full precision; benchmarks/train_step_ratio.py). Same update rule; float rounding may differ.
    """
    params = list(params)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def compile_blocks_(model: nn.Module) -> int:
    """torch.compile each transformer block of `model`, in place (Module.compile: parameter names and the state
    dict are unchanged). In a compiled block a ternary layer that scales its output (few rows) has its codes,
    alpha scaling and straight-through backward traced with the rest of the block, with no Python call or
    Dynamo entry of their own; one that scales its weight (many rows) runs its codes and weight gradients as the
    custom ops terdit::ternary_scaled_codes / terdit::ternary_weight_grads inside the block's graph.
    A dim-512 batch-8 QAT step took 1.05x (1 thread) / 1.03x (2) the faster of the eager and compiled FP steps,
    vs 1.13x / 1.19x eager against eager (benchmarks/train_step_ratio.py, AVX2 EPYC); at 2048 rows per layer
    (dim512-latent) 1.03x at 2 threads. Label
    dropout and the embedders stay eager, so the random draws are those of an eager run. If compiling fails
    (no C++ compiler, say), one warning, and every block trains eagerly. Returns the number of blocks."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise TerditError(f"--compile: {type(model).__name__} has no transformer blocks (_repeated_blocks or "
                          f"transformer_blocks)")

    warned = []

    def failed(e: Exception) -> None:
        if not warned:  # once, for the first block that fails; the others then never try
            warned.append(e)
            warnings.warn(f"--compile: torch.compile failed, training eagerly ({type(e).__name__}: "
                          f"{str(e)[:200]})", stacklevel=2)
        for b in blocks:
            b._compiled_call_impl = None

    for block in blocks:
        compile_with_fallback(block, failed)
    return len(blocks)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in _unwrap(model).parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# What a resumed run may change: its length, how often it reports or saves, and where it runs. Anything
# else (model, data, batch, lr schedule, seed) changes the run itself and needs --override.
RESUME_MAY_CHANGE = ("out", "steps", "ckpt_every", "ckpt_minutes", "keep_checkpoints", "log_every", "sample_every",
                     "sample_cfg", "sample_steps", "parallel", "device", "precision", "num_workers",
                     "grad_checkpointing", "compile", "tensorboard", "resume", "init_from", "progress", "override",
                     "strict_data")


RUN_ENTRIES = (runlib.CONFIG_FILE, runlib.TRAIN_ARGS_FILE, runlib.LOG_FILE, runlib.CKPT_DIR, "tensorboard",
               "samples", "samples.png")


RESUME_FROM_NOW = ("out", "steps", "resume", "override", "device", "precision", "num_workers", "parallel",
                   "progress", "init_from")
MODEL_KEYS = ("config", "linear", "adaln_norm", "alpha_init", "qk_norm")  # fixed by config.json


def _default_of(key: str) -> Any:
    f = TrainArgs.__dataclass_fields__[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class Trainer:
    def __init__(self, args: TrainArgs) -> None:
        args.validate()
        self.args = args
        device_type = resolve_device(args.device).type
        self.dist: DistInfo = init_distributed(device_type)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if device_type == "cuda" else "cpu")
        autocast = resolve_dtype(args.precision, self.device, "precision")
        self.autocast_dtype = None if autocast == torch.float32 else autocast
        self.out = Path(args.out)
        self.start_step = 0
        self._decode = None
        self._stop_signal = 0
        if self.out.exists() and not self.out.is_dir():
            raise TerditError(f"--out {self.out}: exists and is not a directory")
        check_writable(self.out, arg=f"--out {self.out}")
        # held from here to the end of run(): checks, cleanup and training see one writer only
        self._hold = contextlib.ExitStack()
        self._existed = self.out.exists()
        try:
            if self.dist.is_main:
                self._hold.enter_context(locked(self.out / runlib.LOCK_FILE, f"run folder {self.out}"))
                self._clean_leftovers()
            self._prepare_run_folder()
        except BaseException:
            self.close()
            self._drop_if_empty()
            raise

    def _drop_if_empty(self) -> None:
        """A refused run leaves nothing behind, not even the folder its lock needed."""
        if not self._existed and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def close(self) -> None:
        """Release the run folder (run() does it when it ends)."""
        self._hold.close()

    def __del__(self) -> None:
        hold = getattr(self, "_hold", None)
        if hold is not None:
            hold.close()

    # -- run folder ------------------------------------------------------------------------------------
    def _prepare_run_folder(self) -> None:
        """Check the run folder against the arguments; writes nothing (run() does, under the lock)."""
        a = self.args
        if a.resume:
            runlib.require_run(self.out)
            self.args = a = self._resumed_args(TrainArgs.upgrade(runlib.load_train_args(self.out, required=True)))
            self.config = self._load_config()
            last = int(runlib.latest_checkpoint(self.out).name)
            if a.steps < last:
                raise TerditError(f"--steps {a.steps} is below the run's step {last} "
                                  f"({runlib.latest_checkpoint(self.out)}); pass --steps {last} or more")
        else:
            if runlib.checkpoint_dirs(self.out):
                raise TerditError(f"--out {self.out} already holds a run; pass --resume or choose another --out")
            # a run killed before its first checkpoint has nothing to resume and starts again; anything else
            # in the folder is not ours to overwrite
            foreign = [p.name for p in self.out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith(".")
                       ] if self.out.is_dir() else []
            if foreign:
                raise TerditError(f"--out {self.out}: exists and is not a terdit run (holds {foreign[0]}); "
                                  "choose another --out")
            if a.ema_decay is None:
                a.ema_decay = a.resolved_ema_decay()
            self.config = None  # built once the data's shape is known

    def _resumed_args(self, stored: dict[str, Any]) -> TrainArgs:
        """The stored arguments, with what a resume may change taken from now; a changed model, data, batch
        or lr setting (given and different from train_args.json) is refused unless --override."""
        a = self.args
        fields = TrainArgs.__dataclass_fields__
        changed = []
        for key in fields:
            if key in RESUME_MAY_CHANGE or key not in stored:
                continue
            new = getattr(a, key)
            if new != _default_of(key) and new != stored[key]:
                changed.append(f"--{key.replace('_', '-')} {stored[key]!r} -> {new!r}")
                if a.override:
                    stored[key] = new
        model = [c for c in changed if c.split()[0][2:].replace("-", "_") in MODEL_KEYS]
        if model:  # the weights fix the model: --override cannot change it
            raise TerditError(f"--resume {self.out}: the model differs from the run's ({', '.join(model[:3])}); "
                              "start a new run (--init-from copies weights of the same shape)")
        if changed and not a.override:
            raise TerditError(f"--resume {self.out}: settings differ from {runlib.TRAIN_ARGS_FILE} "
                              f"({', '.join(changed[:3])}); pass --override to change them")
        for key in RESUME_MAY_CHANGE:  # the machine's settings are today's; the rest stay unless given
            if key in RESUME_FROM_NOW or key not in stored or getattr(a, key) != _default_of(key):
                stored[key] = getattr(a, key)
        stored.update(resume=True, out=str(self.out))
        try:
            resumed = TrainArgs(**{k: v for k, v in stored.items() if k in fields})
            resumed.validate()
        except (TypeError, TerditError) as e:
            raise TerditError(f"{self.out / runlib.TRAIN_ARGS_FILE}: bad training arguments ({e})") from e
        return resumed

    def _build_config(self, data: TrainingData) -> TerDiTConfig:
        a = self.args
        c, h, w = data.sample_shape
        if h != w:
            raise TerditError(f"data samples are {h}x{w}; TerDiT configs are square")
        overrides = dict(
            linear=a.linear, adaln_norm=a.adaln_norm,
            alpha_init=a.alpha_init, qk_norm=a.qk_norm,
            in_channels=c, input_size=h, num_classes=data.num_classes,
        )
        return get_config(a.config, **overrides)

    # -- training ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to `steps` under the run folder's lock; raises Interrupted after a SIGINT / SIGTERM once the
        step in progress is finished and checkpointed."""
        try:
            with self._hold, self._stop_on_signals():
                return self._run()
        except BaseException:
            self._drop_if_empty()
            raise

    def _clean_leftovers(self) -> None:
        """Temporaries of a killed run (and a checkpoint a crash left moved aside) in the run folder."""
        clean_leftovers(self.out, RUN_ENTRIES)
        clean_leftovers(self.out / runlib.CKPT_DIR, ("[0-9]*",))
        clean_leftovers(self.out / "samples", ("*.png",))

    def _open_data(self) -> TrainingData:
        a = self.args
        if not a.data:
            return open_training_data(None)
        return open_training_data(a.data, resolution=a.resolution, vae=a.vae, seed=a.seed, flip=a.flip,
                                  vae_sample=a.vae_sample, class_map=a.class_map, num_workers=a.num_workers,
                                  strict=a.strict_data)

    def _check_batch(self, cfg: TerDiTConfig) -> int:
        """The per-process micro-batch, refused when it cannot divide or cannot fit (before any write)."""
        a, d = self.args, self.dist
        world_micro = d.world_size * a.grad_accum
        if a.batch_size % world_micro:
            raise TerditError(f"batch_size {a.batch_size} is not divisible by processes x grad_accum = {world_micro}")
        micro = a.batch_size // world_micro
        check_batch_fits(cfg, micro, self.device, f"--batch-size {a.batch_size} (micro-batch {micro}; "
                                                  "--grad-accum splits it)", training=True)
        return micro

    def _load_checkpoint(self, ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
        state = load_torch_state(ckpt / "train_state.pt")
        try:
            set_optimizer_state_dict(model, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TerditError(f"{ckpt / 'train_state.pt'}: does not fit this run ({type(e).__name__}: {e})") from e

    def _losses(self, model: nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training terms of one micro-batch ("loss", "mse", optionally "vb"); subclasses may replace it."""
        return diffusion.training_losses(lambda xt, tt: model(xt, tt, y, return_dict=False)[0], x, t, noise)

    def _run(self) -> dict[str, Any]:
        a, d = self.args, self.dist
        data = self._open_data()
        if self.config is None:
            self.config = self._build_config(data)
        self._decode = data.decode
        cfg = self.config
        micro = self._check_batch(cfg)
        model, ema, opt = self._start_state(cfg)
        self._write_run_files(cfg)
        barrier(d)

        sampler = StepBatchSampler(len(data.dataset), micro, a.seed, d.rank, d.world_size,
                                   start=self.start_step * a.grad_accum)
        loader = iter(DataLoader(data.dataset, batch_sampler=sampler, num_workers=a.num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=a.num_workers > 0))
        diffusion = GaussianDiffusion.create(None, learn_sigma=cfg.learn_sigma)
        writer = self._tensorboard() if d.is_main else None
        decay = float(a.ema_decay if a.ema_decay is not None else a.resolved_ema_decay())

        bar = tqdm(total=a.steps, initial=self.start_step, desc="train", disable=not (a.progress and d.is_main),
                   dynamic_ncols=True)
        busy, steps_since, last = 0.0, 0, {}  # busy: seconds spent in training steps (no sampling, no saving)
        self._ckpt_time = time.monotonic()
        stopped = 0
        for step in range(self.start_step, a.steps):
            t_step = time.perf_counter()
            lr, terms_sum, grad_norm = self._step(step, model, opt, loader, data, diffusion)
            ema_update(ema, model, decay)
            busy += time.perf_counter() - t_step

            done = step + 1
            steps_since += 1
            if done % a.log_every == 0 or done == a.steps:
                last = self._report(done, terms_sum, grad_norm, lr, steps_since / max(busy, 1e-9), writer, bar)
                busy, steps_since = 0.0, 0
            bar.update(1)
            stopped = self._after_step(done, model, ema, opt, writer)
            if stopped:
                break
        bar.close()
        self.model, self.ema = model, ema  # for callers that inspect the result (tests, notebooks)
        if stopped:
            self._interrupted(stopped, done, writer)
        self._finish(model, ema, opt, writer)
        return last

    def _start_state(self, cfg: TerDiTConfig) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        """Model, EMA and optimizer: fresh from the seed, from `init_from`, or as the latest checkpoint left them."""
        a = self.args
        torch.manual_seed(a.seed)
        model = self._build_model(cfg)
        if a.act_bits is not None and not set_act_bits(model, a.act_bits):
            raise TerditError(f"act_bits {a.act_bits} needs ternary layers (config linear={cfg.linear!r})")
        ckpt = runlib.latest_checkpoint(self.out) if a.resume else None
        if ckpt is not None:
            runlib.load_weights_into(model, ckpt / "model.safetensors")
        elif a.init_from:
            self._init_from(model)
        ema = copy.deepcopy(model).requires_grad_(False)
        if ckpt is not None:
            runlib.load_weights_into(ema, ckpt / "ema.safetensors")
        model.grad_checkpointing = a.grad_checkpointing
        model.to(self.device).train()
        ema.to(self.device).eval()  # the EMA (sample grids, checkpoints) stays eager
        if a.compile:
            compile_blocks_(model)
        model, ema = self._wrap(model, ema)
        opt = make_optimizer(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        self._saved_step = None
        if ckpt is not None:
            self.start_step = self._load_checkpoint(ckpt, model, opt)
            self._saved_step = self.start_step
        return model, ema, opt

    def _write_run_files(self, cfg: TerDiTConfig) -> None:
        """config.json and train_args.json, written once the checkpoint and the log were read: a run that cannot
        resume is left as it was."""
        a = self.args
        self._truncate_log(self.start_step)  # a fresh start drops the log of an attempt killed before any checkpoint
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not a.resume:
                cfg.save(self.out / runlib.CONFIG_FILE)
            atomic_write_text(self.out / runlib.TRAIN_ARGS_FILE, json.dumps(dataclasses.asdict(a), indent=2) + "\n")

    def _step(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, loader: Iterator,
              data: TrainingData, diffusion: GaussianDiffusion) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches: (lr, summed loss/mse/vb terms, gradient norm).

        The noise of step `step` is seeded from (seed, step, rank), so a resumed run draws what it would have."""
        a = self.args
        lr = a.lr_after_drop if a.lr_drop_step is not None and step >= a.lr_drop_step else a.lr
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(derived_seed(a.seed, _STEP_NOISE, step, self.dist.rank))
        terms_sum = torch.zeros(3, device=self.device)
        for k in range(a.grad_accum):
            terms_sum += self._micro_step(model, loader, data, diffusion, sync_grads=k == a.grad_accum - 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lr, terms_sum, grad_norm

    def _micro_step(self, model: nn.Module, loader: Iterator, data: TrainingData, diffusion: GaussianDiffusion,
                    sync_grads: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; its (loss, mse, vb) means, detached. DDP all-reduces the
        gradients only on the last micro-batch of a step (`sync_grads`)."""
        a = self.args
        x, y = next(loader)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if data.encode is not None:
            with torch.no_grad():
                x = data.encode(x)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=self.device)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)  # not _like: layout-independent
        sync = contextlib.nullcontext()
        if isinstance(model, nn.parallel.DistributedDataParallel) and not sync_grads:
            sync = model.no_sync()
        with sync, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                  enabled=self.autocast_dtype is not None):
            terms = self._losses(model, diffusion, x, t, noise, y)
            loss = terms["loss"].mean()
            (loss / a.grad_accum).backward()
        return torch.stack([loss.detach(), terms["mse"].mean().detach(),
                            terms.get("vb", torch.zeros(1, device=self.device)).mean().detach()])

    def _report(self, done: int, terms_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float, sps: float,
                writer, bar) -> dict[str, Any]:
        """The log line of step `done` (terms averaged over micro-batches and processes), written by rank 0."""
        a, d = self.args, self.dist
        vals = mean_across(terms_sum / a.grad_accum, d).tolist()
        gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        last = {"step": done, "loss": vals[0], "mse": vals[1], "vb": vals[2], "lr": lr,
                "grad_norm": gn, "steps_per_s": sps, "images_per_s": sps * a.batch_size}
        if d.is_main:
            self._log(last, writer)
            bar.set_postfix(loss=f"{vals[0]:.4f}")  # the rate: tqdm's own it/s, one number
        return last

    def _after_step(self, done: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, writer) -> int:
        """Checkpoint and sample grid after step `done` when due; the stop signal all ranks agreed on (0: go on)."""
        a = self.args
        fault_point(f"train-step:{done}")
        stopped, timed = self._agreed_flags(done)
        if done != a.steps and (stopped or timed or (a.ckpt_every and done % a.ckpt_every == 0)):
            self._save(done, model, ema, opt)
        if stopped:
            return stopped
        if a.sample_every and done % a.sample_every == 0 and self.dist.is_main:
            self._sample_grid(ema, self.out / "samples" / f"{done:07d}.png", writer, done)
        return 0

    def _interrupted(self, stopped: int, done: int, writer) -> NoReturn:
        """End a run a signal stopped (its checkpoint is written): close up and raise Interrupted."""
        if writer is not None:
            writer.close()
        barrier(self.dist)
        shutdown(self.dist)
        raise Interrupted(stopped, f"stopped by {signal.Signals(stopped).name} after step {done}; "
                                   f"checkpoint {self.out / runlib.CKPT_DIR / runlib.checkpoint_name(done)}, "
                                   f"continue with --resume")

    def _finish(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, writer) -> None:
        """The final checkpoint and sample grid, then close up."""
        a, d = self.args, self.dist
        self._save(a.steps, model, ema, opt)
        # the final grid is redone on resume when a crash came between the last checkpoint and the grid
        if d.is_main and (self.start_step < a.steps or not (self.out / "samples.png").is_file()):
            self._sample_grid(ema, self.out / "samples.png", writer, a.steps)
        if writer is not None:
            writer.close()
        barrier(d)
        shutdown(d)

    def _agreed_flags(self, done: int) -> tuple[int, bool]:
        """(signal that asked us to stop or 0, whether `ckpt_minutes` have passed), the same on every rank."""
        a = self.args
        stop = self._stop_signal
        timed = a.ckpt_minutes > 0 and time.monotonic() - self._ckpt_time >= 60 * a.ckpt_minutes
        if self.dist.enabled:
            flags = torch.tensor([stop, int(timed)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, timed = int(flags[0]), bool(flags[1])
        return stop, timed

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT / SIGTERM set a flag the loop reads after each step; a second one acts as usual."""
        self._stop_signal = 0
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self.dist.is_main:
                print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous.clear()
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- pieces (the seams `terdit distill` overrides: data, model, config, loss) ----------------------------
    def _load_config(self) -> Any:
        return runlib.load_config(self.out)

    def _build_model(self, cfg: Any) -> nn.Module:
        return TerDiT(cfg)

    def _wrap(self, model: nn.Module, ema: nn.Module) -> tuple[nn.Module, nn.Module]:
        d, a = self.dist, self.args
        if not d.enabled:
            return model, ema
        if a.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32) \
                if self.autocast_dtype is not None else MixedPrecisionPolicy()
            for m in (model, ema):
                for block in repeated_blocks(m):
                    fully_shard(block, mp_policy=mp)
                fully_shard(m, mp_policy=mp)
            return model, ema
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), ema

    def _init_from(self, model: TerDiT) -> None:
        """Start from another run's EMA weights (e.g. 256 -> 512 continuation): shapes must match."""
        src = runlib.require_run(self.args.init_from)
        state = runlib.load_tensors(runlib.latest_checkpoint(src) / "ema.safetensors")
        own = model.state_dict()
        bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise TerditError(f"init_from {src}: weights do not fit this model (e.g. {bad[0]})")
        model.load_state_dict(state, strict=True)

    def _tensorboard(self):
        if not self.args.tensorboard:
            return None
        from terdit.extras import available, install_hint

        if not available("tensorboard"):  # an optional extra: train on without it, saying so once
            tqdm.write("terdit: TensorBoard logging off; " + install_hint("tensorboard", "TensorBoard logging"))
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, entry: dict[str, Any], writer) -> None:
        with open(self.out / runlib.LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if writer is not None:
            for key in ("loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s"):
                writer.add_scalar(f"train/{key}", entry[key], entry["step"])
            if entry["step"] == self.args.steps:  # the run's settings next to its final metrics (HPARAMS tab)
                _log_hparams(writer, self.args, {f"final/{k}": entry[k] for k in ("loss", "mse", "vb")})

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again), and a
        last line a kill cut short."""
        path = self.out / runlib.LOG_FILE
        if not self.dist.is_main or not path.exists():
            return
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        keep = []
        for n, ln in enumerate(lines):
            try:
                entry = json.loads(ln)
                entry_step = int(entry["step"])
            except (ValueError, KeyError, TypeError) as e:
                if n == len(lines) - 1:
                    print(f"{path}: dropped a last line cut short by a crash", file=sys.stderr)
                    break
                raise TerditError(f"{path}: line {n + 1} is not a log entry ({e})") from e
            if entry_step <= step:
                keep.append(ln)
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def _save(self, step: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Write checkpoints/<step> atomically (rank 0), keeping the newest `keep_checkpoints`."""
        d = self.dist
        # a resume at the final step finds its checkpoint on disk: it is never written again
        if step != getattr(self, "_saved_step", None):
            model_state = _full_state(_unwrap(model))
            ema_state = _full_state(ema)
            opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
        if d.is_main and step != getattr(self, "_saved_step", None):
            train_state = {"step": step, "optimizer": opt_state, "rng": _rng_state(), "world_size": d.world_size}

            def fill(tmp: Path) -> None:
                save_tensors(tmp / "model.safetensors", model_state)
                save_tensors(tmp / "ema.safetensors", ema_state)
                torch.save(train_state, tmp / "train_state.pt")

            atomic_dir(self.out / runlib.CKPT_DIR / runlib.checkpoint_name(step), fill)
        if d.is_main:  # also after a crash between writing a checkpoint and pruning the older ones
            for old in runlib.checkpoint_dirs(self.out)[: -max(1, self.args.keep_checkpoints)]:
                remove_tree(old)
        self._saved_step = step
        self._ckpt_time = time.monotonic()
        barrier(d)

    def _sample_grid(self, ema: nn.Module, path: Path, writer, step: int) -> None:
        """A grid of every class (up to 10 classes x 8), EMA weights, guidance `sample_cfg`."""
        a, cfg = self.args, self.config
        if self.dist.world_size > 1 and a.parallel == "fsdp":
            return  # sharded EMA: sample later with `terdit sample`
        n_cls = min(cfg.num_classes, 10)
        per = 8 if cfg.input_size <= 16 else 2
        labels = [c for c in range(n_cls) for _ in range(per)]
        final = step == a.steps and path.name == "samples.png"  # minutes on CPU: show a bar (training's is closed)
        images = sample_latents(ema, labels, cfg_scale=a.sample_cfg, steps=a.sample_steps, seed=a.seed,
                                device=self.device, progress=a.progress and final)
        if self._decode is not None:
            images = self._decode(images)
        save_grid(images, path, nrow=per)
        if writer is not None and getattr(self, "_grid_logged_at", None) != step:  # once per sampling point
            arr = to_uint8(images)
            # enlarged as samples.png is (8x8 digits are unreadable at 1:1 in TensorBoard)
            writer.add_image("samples", make_grid(arr, per, upscale=max(1, 64 // arr.shape[1])), step,
                             dataformats="HWC")
            self._grid_logged_at = step


def _log_hparams(writer, args: TrainArgs, metrics: dict[str, float]) -> None:
    """TensorBoard hparams in the run's own event file (SummaryWriter.add_hparams would start a second run)."""
    from torch.utils.tensorboard.summary import hparams

    settings = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
                for k, v in dataclasses.asdict(args).items()}
    for summary in hparams(settings, metrics):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value, args.steps)


def train(args: TrainArgs) -> dict[str, Any]:
    """Train (or resume) a run; returns the last logged metrics."""
    return Trainer(args).run()
