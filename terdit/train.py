"""Quantization-aware training from scratch: one CPU, or many GPUs under `torchrun` (DDP or FSDP).

Every random draw of step s on rank r comes from a generator seeded with (seed, s, r), and the data
order is a pure function of (seed, step), so a run stopped at a checkpoint and resumed reproduces the
uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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

from terdit import run as runlib
from terdit.data import TrainingData, open_training_data
from terdit.diffusion import GaussianDiffusion
from terdit.distributed import DistInfo, barrier, init_distributed, mean_across, shutdown
from terdit.errors import TerditError
from terdit.io import atomic_dir, atomic_write_text, save_tensors
from terdit.models.configs import TerDiTConfig, get_config
from terdit.models.terdit import TerDiT
from terdit.sample import make_grid, sample_latents, save_grid, to_uint8


@dataclass
class TrainArgs:
    """Everything `terdit train` takes; stored resolved in RUN/train_args.json."""

    out: str = "runs/digits"
    config: str = "TerDiT-Digits"
    ternary: bool = True
    linear: str | None = None  # "fp" | "ternary" | "bitnet"; overrides `ternary` when given
    adaln_norm: bool | None = None  # None: on for ternary/bitnet, off for fp (Large-DiT)
    alpha_init: str | None = None
    qk_norm: bool = False
    data: str | None = None
    resolution: int | None = None
    vae: str | None = None
    flip: bool = True
    vae_sample: bool = True
    class_map: str | None = None
    strict_data: bool = False
    steps: int = 2000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 5e-4
    lr_drop_step: int | None = None
    lr_after_drop: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float | None = None
    grad_clip: float = 2.0
    seed: int = 0
    ckpt_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int | None = None
    sample_cfg: float = 4.0
    sample_steps: int = 250
    parallel: str = "ddp"
    device: str | None = None
    precision: str | None = None
    num_workers: int = 0
    grad_checkpointing: bool = False
    tensorboard: bool = True
    resume: bool = False
    init_from: str | None = None
    progress: bool = True

    def resolved_ema_decay(self) -> float:
        """0.9999 (DiT, Large-DiT), capped so the EMA horizon 1/(1-decay) is at most 10% of the run."""
        if self.ema_decay is not None:
            return self.ema_decay
        return min(0.9999, 1.0 - 1.0 / max(1.0, 0.1 * self.steps))

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp, got {self.parallel}"),
            (self.precision in (None, "fp32", "bf16", "fp16"), f"--precision: unknown {self.precision}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TerditError(msg)


def _derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


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
            g = torch.Generator().manual_seed(_derived_seed(self.seed, _DATA_ORDER, epoch))
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


class Trainer:
    def __init__(self, args: TrainArgs) -> None:
        args.validate()
        self.args = args
        device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type.startswith("cuda") and not torch.cuda.is_available():
            raise TerditError("--device cuda requested but CUDA is not available")
        self.dist: DistInfo = init_distributed("cuda" if device_type.startswith("cuda") else "cpu")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if device_type.startswith("cuda") else "cpu")
        precision = args.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.out = Path(args.out)
        self.start_step = 0
        self._decode = None
        self._prepare_run_folder()

    # -- run folder ------------------------------------------------------------------------------------
    def _prepare_run_folder(self) -> None:
        a = self.args
        if a.resume:
            runlib.require_run(self.out)
            stored = runlib.load_train_args(self.out)
            # what may change on resume: the length of the run and how often it reports
            for key in ("steps", "ckpt_every", "log_every", "sample_every", "progress", "num_workers", "device"):
                stored[key] = getattr(a, key)
            stored.update(resume=True, out=str(self.out))
            self.args = a = TrainArgs(**{k: v for k, v in stored.items() if k in TrainArgs.__dataclass_fields__})
            self.config = self._load_config()
        else:
            if runlib.checkpoint_dirs(self.out):
                raise TerditError(f"--out {self.out} already holds a run; pass --resume or choose another --out")
            if a.ema_decay is None:
                a.ema_decay = a.resolved_ema_decay()
            self.config = None  # built once the data's shape is known

    def _build_config(self, data: TrainingData) -> TerDiTConfig:
        a = self.args
        c, h, w = data.sample_shape
        if h != w:
            raise TerditError(f"data samples are {h}x{w}; TerDiT configs are square")
        overrides = dict(
            ternary=a.ternary if a.linear is None else None, linear=a.linear, adaln_norm=a.adaln_norm,
            alpha_init=a.alpha_init, qk_norm=a.qk_norm,
            in_channels=c, input_size=h, num_classes=data.num_classes,
        )
        return get_config(a.config, **overrides)

    # -- training ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a, d = self.args, self.dist
        data = self._open_data()
        if self.config is None:
            self.config = self._build_config(data)
        self._decode = data.decode
        cfg = self.config
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / runlib.CONFIG_FILE)
            atomic_write_text(self.out / runlib.TRAIN_ARGS_FILE, json.dumps(dataclasses.asdict(a), indent=2) + "\n")
        barrier(d)

        torch.manual_seed(a.seed)
        model = self._build_model(cfg)
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
        ema.to(self.device).eval()
        model, ema = self._wrap(model, ema)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        if ckpt is not None:
            state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(model, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            self.start_step = int(state["step"])
            self._truncate_log(self.start_step)

        world_micro = d.world_size * a.grad_accum
        if a.batch_size % world_micro:
            raise TerditError(f"--batch-size {a.batch_size} is not divisible by processes x grad-accum = {world_micro}")
        micro = a.batch_size // world_micro
        sampler = StepBatchSampler(len(data.dataset), micro, a.seed, d.rank, d.world_size,
                                   start=self.start_step * a.grad_accum)
        loader = iter(DataLoader(data.dataset, batch_sampler=sampler, num_workers=a.num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=a.num_workers > 0))
        diffusion = GaussianDiffusion.create(None, learn_sigma=cfg.learn_sigma)
        writer = self._tensorboard() if d.is_main else None
        decay = float(a.ema_decay if a.ema_decay is not None else a.resolved_ema_decay())

        bar = tqdm(total=a.steps, initial=self.start_step, desc="train", disable=not (a.progress and d.is_main),
                   dynamic_ncols=True)
        t_last, steps_since, last = time.perf_counter(), 0, {}
        for step in range(self.start_step, a.steps):
            lr = a.lr_after_drop if a.lr_drop_step is not None and step >= a.lr_drop_step else a.lr
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(_derived_seed(a.seed, _STEP_NOISE, step, d.rank))
            terms_sum = torch.zeros(3, device=self.device)
            for k in range(a.grad_accum):
                x, y = next(loader)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if data.encode is not None:
                    with torch.no_grad():
                        x = data.encode(x)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=self.device)
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)  # not _like: layout-independent
                sync = contextlib.nullcontext()
                if isinstance(model, nn.parallel.DistributedDataParallel) and k < a.grad_accum - 1:
                    sync = model.no_sync()
                with sync, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                          enabled=self.autocast_dtype is not None):
                    terms = self._losses(model, diffusion, x, t, noise, y)
                    loss = terms["loss"].mean()
                    (loss / a.grad_accum).backward()
                terms_sum += torch.stack([loss.detach(), terms["mse"].mean().detach(),
                                          terms.get("vb", torch.zeros(1, device=self.device)).mean().detach()])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema_update(ema, model, decay)

            done = step + 1
            steps_since += 1
            if done % a.log_every == 0 or done == a.steps:
                vals = mean_across(terms_sum / a.grad_accum, d).tolist()
                now = time.perf_counter()
                sps = steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                last = {"step": done, "loss": vals[0], "mse": vals[1], "vb": vals[2], "lr": lr,
                        "grad_norm": gn, "steps_per_s": sps, "images_per_s": sps * a.batch_size}
                if d.is_main:
                    self._log(last, writer)
                    bar.set_postfix(loss=f"{vals[0]:.4f}", it_s=f"{sps:.1f}")
            bar.update(1)
            if a.ckpt_every and done % a.ckpt_every == 0 and done != a.steps:
                self._save(done, model, ema, opt)
            if a.sample_every and done % a.sample_every == 0 and d.is_main:
                self._sample_grid(ema, self.out / "samples" / f"{done:07d}.png", writer, done)
        bar.close()
        self._save(a.steps, model, ema, opt)
        self.model, self.ema = model, ema  # for callers that inspect the result (tests, notebooks)
        if d.is_main and self.start_step < a.steps:
            self._sample_grid(ema, self.out / "samples.png", writer, a.steps)
        if writer is not None:
            writer.close()
        barrier(d)
        shutdown(d)
        return last

    # -- pieces (the seams `terdit distill` overrides: data, model, config, loss) ----------------------------
    def _load_config(self) -> Any:
        return runlib.load_config(self.out)

    def _open_data(self) -> TrainingData:
        a = self.args
        if not a.data:
            return open_training_data(None)
        return open_training_data(a.data, resolution=a.resolution, vae=a.vae, seed=a.seed, flip=a.flip,
                                  vae_sample=a.vae_sample, class_map=a.class_map, num_workers=a.num_workers,
                                  strict=a.strict_data)

    def _build_model(self, cfg: Any) -> nn.Module:
        return TerDiT(cfg)

    def _losses(self, model: nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of one micro-batch: "loss", "mse" and (learned sigma) "vb"."""
        return diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x, t, noise)

    def _wrap(self, model: nn.Module, ema: nn.Module) -> tuple[nn.Module, nn.Module]:
        d, a = self.dist, self.args
        if not d.enabled:
            return model, ema
        if a.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32) \
                if self.autocast_dtype is not None else MixedPrecisionPolicy()
            for m in (model, ema):
                for block in m.layers:
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
            raise TerditError(f"--init-from {src}: weights do not fit this model (e.g. {bad[0]})")
        model.load_state_dict(state, strict=True)

    def _tensorboard(self):
        if not self.args.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, entry: dict[str, Any], writer) -> None:
        with open(self.out / runlib.LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if writer is not None:
            for key in ("loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s"):
                writer.add_scalar(f"train/{key}", entry[key], entry["step"])

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        path = self.out / runlib.LOG_FILE
        if not self.dist.is_main or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def _save(self, step: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Write checkpoints/<step> atomically (rank 0), keeping the newest `keep_checkpoints`."""
        d = self.dist
        model_state = _full_state(_unwrap(model))
        ema_state = _full_state(ema)
        opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
        if d.is_main:
            train_state = {"step": step, "optimizer": opt_state, "rng": _rng_state(), "world_size": d.world_size}

            def fill(tmp: Path) -> None:
                save_tensors(tmp / "model.safetensors", model_state)
                save_tensors(tmp / "ema.safetensors", ema_state)
                torch.save(train_state, tmp / "train_state.pt")

            atomic_dir(self.out / runlib.CKPT_DIR / runlib.checkpoint_name(step), fill)
            for old in runlib.checkpoint_dirs(self.out)[: -max(1, self.args.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(d)

    def _sample_grid(self, ema: nn.Module, path: Path, writer, step: int) -> None:
        """A grid of every class (up to 10 classes x 8), EMA weights, guidance `sample_cfg`."""
        a, cfg = self.args, self.config
        if self.dist.world_size > 1 and a.parallel == "fsdp":
            return  # sharded EMA: sample later with `terdit sample`
        n_cls = min(cfg.num_classes, 10)
        per = 8 if cfg.input_size <= 16 else 2
        labels = [c for c in range(n_cls) for _ in range(per)]
        images = sample_latents(ema, labels, cfg_scale=a.sample_cfg, steps=a.sample_steps, seed=a.seed,
                                device=self.device)
        if self._decode is not None:
            images = self._decode(images)
        save_grid(images, path, nrow=per)
        if writer is not None:
            writer.add_image("samples", make_grid(to_uint8(images), per), step, dataformats="HWC")


def train(args: TrainArgs) -> dict[str, Any]:
    """Train (or resume) a run; returns the last logged metrics."""
    return Trainer(args).run()
