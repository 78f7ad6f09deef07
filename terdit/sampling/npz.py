"""`terdit sample-npz`: DiT's FID sampling protocol (sample_ddp.py), resumable and split over processes.

Defaults follow DiT's FID-50K recipe: 50,000 samples, uniformly random labels, guidance 1.5, 250 DDPM
steps, clamp(127.5 x + 128) to uint8, one ADM npz with `arr_0` (N, H, W, C) and `labels`.

Unlike DiT, where each rank seeds itself from (seed, rank) and the result depends on the process count,
batch b always holds samples [b * B, (b + 1) * B) and its labels and noise are a pure function of
(seed, b). Each finished batch is written atomically to OUT.parts/, so an interrupted run restarted with
the same settings, on any number of processes, yields the same file as one uninterrupted run. The parts
folder records the settings and a hash of the weights, so parts drawn from other weights are never mixed
in; OUT is locked (`.OUT.lock`) while being written, so a second process is refused at once.

Several processes: `torchrun --nproc_per_node 8 --no-python -- terdit sample-npz --run RUN ...`; the `--`
keeps torchrun from reading `--run` as an abbreviation of its own `--run-path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from terdit.data.base import derived_seed
from terdit.defaults import nonneg_float, overwrite_setting, positive_int, setting
from terdit.diffusion.sampler import resolve_backend
from terdit.errors import TerditError
from terdit.io import atomic_write, atomic_write_text, check_output, clean_leftovers, fault_point, locked
from terdit.models.memory import check_batch_fits
from terdit.sampling.generate import SamplingSettings

SETTINGS_FILE = "settings.json"
PART_GLOB = "batch-*.npz"
_LABELS, _NOISE = 1, 2  # distinct seed spaces for the two random draws of a batch
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: equal samples give a byte-identical npz


@dataclass(kw_only=True)
class MassSampleArgs(SamplingSettings):
    """Everything `terdit sample-npz` takes."""

    out: str = setting("samples.npz", "ADM npz to write; finished batches wait in OUT.parts/ until all are drawn")
    num_samples: int = setting(50_000, "FID-50K", type=positive_int)
    cfg: float = setting(1.5, "classifier-free guidance scale; 1 = none (DiT's FID setting)", type=nonneg_float)
    batch_size: int = setting(32, "samples per batch, each process draws one batch at a time; the result does not "
                              "depend on the process count", type=positive_int)
    classes: list[int] | None = setting(None, "draw labels uniformly from these ids only (default: all classes)",
                                        type=int, nargs="+")
    progress: bool = setting(True, "no progress bar")
    overwrite: bool = overwrite_setting("npz file")


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def batch_size_of(b: int, num_samples: int, batch_size: int) -> int:
    """Batch b covers samples [b * B, min((b + 1) * B, N)); only the last one may be short."""
    return min(batch_size, num_samples - b * batch_size)


def batch_labels(seed: int, b: int, count: int, classes: Sequence[int]) -> np.ndarray:
    """User-facing labels of batch b: uniform over `classes`, a function of (seed, b) only."""
    gen = torch.Generator().manual_seed(derived_seed(seed, _LABELS, b))
    idx = torch.randint(len(classes), (count,), generator=gen)
    return np.asarray(classes, dtype=np.int64)[idx.numpy()]


def batch_noise_seed(seed: int, b: int) -> int:
    """The seed sample_latents gets for batch b (initial and per-step noise)."""
    return derived_seed(seed, _NOISE, b)


def part_path(parts: Path, b: int) -> Path:
    return parts / f"batch-{b:06d}.npz"


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def _model_identity(run: str | Path, ema: bool) -> str:
    """A hash of the weights (and config) sampled from, so parts drawn from other weights, even at the same
    path (a run trained again, a checkpoint replaced), are never mixed with new ones. A hub id is its name.
    Reading the weights once per start costs seconds (~1 GB/s), small beside sampling 50,000 images."""
    from terdit.models import runs as runlib
    from terdit.models.kinds import Kind, kind_of

    root = Path(run)
    if not root.is_dir():
        return str(run)
    if kind_of(root) is Kind.RUN:
        ckpt = runlib.latest_checkpoint(root)
        files = [root / runlib.CONFIG_FILE, ckpt / ("ema.safetensors" if ema else "model.safetensors")]
    else:  # deploy, release or pipeline folder: every weight and config file (not a sample.png drawn into it)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix in (".json", ".safetensors", ".pth", ".pt", ".bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root)}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def settings_of(args: MassSampleArgs, classes: Sequence[int], dtype: torch.dtype) -> dict:
    """What determines the samples; the process count and device are deliberately not part of it."""
    return {
        "weights": _model_identity(args.run, args.ema), "ema": args.ema, "num_samples": args.num_samples,
        "batch_size": args.batch_size, "seed": args.seed, "cfg": args.cfg, "cfg_channels": args.cfg_channels,
        "steps": args.steps, "sampler": args.sampler, "eta": args.eta if args.sampler == "ddim" else 0.0,
        "classes": [int(c) for c in classes], "dtype": str(dtype).removeprefix("torch."),
    }


def _check_args(args: MassSampleArgs) -> None:
    out = Path(args.out)
    checks = [
        (args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.sampler in ("ddpm", "ddim"), f"--sampler must be ddpm or ddim, got {args.sampler}"),
        (args.cfg_channels is None or args.cfg_channels >= 1, f"--cfg-channels must be >= 1, got {args.cfg_channels}"),
        (math.isfinite(args.cfg) and args.cfg >= 0, f"--cfg must be a finite number >= 0, got {args.cfg}"),
        (out.suffix.lower() == ".npz", f"--out {out}: must end in .npz"),
        (not args.classes or len(set(args.classes)) == len(args.classes), "--classes has repeated ids"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TerditError(msg)
    if not parts_dir(out).is_dir():
        check_output(out, inputs=[args.run], own=lambda p: p.is_file() and p.suffix.lower() == ".npz",
                     kind="npz file", overwrite=args.overwrite, folder=False)


def _prepare_parts(parts: Path, settings: dict, is_main: bool, info) -> None:
    """Create the parts folder with its settings (rank 0), then every rank checks they match ours, so all
    ranks fail together on a mismatch instead of some waiting forever at a barrier."""
    from terdit.distributed import barrier

    file = parts / SETTINGS_FILE
    if is_main and not file.is_file():
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    barrier(info)
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise TerditError(f"{file}: unreadable settings ({e}); delete {parts} to start over") from e
    if stored != settings:
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:3])
        raise TerditError(f"{parts} was started with different settings ({shown}); rerun with the same "
                          f"settings to resume, or delete it to start over")


def _write_part(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, images=images, labels=labels)

    atomic_write(path, write)
    fault_point(f"part:{path.name}")


def _read_part(path: Path, count: int, labels: np.ndarray) -> np.ndarray:
    """A finished batch's images, checked against what batch b must hold (count and labels)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, stored = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise TerditError(f"{path}: unreadable part ({e}); delete it and rerun to redraw it") from e
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != count or not np.array_equal(stored, labels):
        raise TerditError(f"{path}: does not hold the expected batch; delete it and rerun to redraw it")
    return images


def assemble(parts: Path, out: Path, settings: dict) -> Path:
    """Concatenate the parts into OUT (atomically) one batch at a time: memory holds one batch, not N images.

    The npz is written as numpy's format inside an uncompressed zip64, which np.load and ADM's evaluator
    read like any np.savez output."""
    n, bsz, seed, classes = settings["num_samples"], settings["batch_size"], settings["seed"], settings["classes"]
    nb = num_batches(n, bsz)
    missing = [b for b in range(nb) if not part_path(parts, b).is_file()]
    if missing:
        raise TerditError(f"{parts}: {len(missing)} batches missing (first {missing[0]}); rerun to finish")
    labels = [batch_labels(seed, b, batch_size_of(b, n, bsz), classes) for b in range(nb)]
    first = _read_part(part_path(parts, 0), len(labels[0]), labels[0])
    shape = (n, *(int(s) for s in first.shape[1:]))

    def member(zf: zipfile.ZipFile, name: str):
        info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        return zf.open(info, "w", force_zip64=True)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with member(zf, "arr_0.npy") as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for b in range(nb):
                    images = first if b == 0 else _read_part(part_path(parts, b), len(labels[b]), labels[b])
                    if images.shape[1:] != shape[1:]:
                        raise TerditError(f"{part_path(parts, b)}: images {images.shape[1:]}, batch 0 has "
                                          f"{shape[1:]}; delete {parts} to start over")
                    f.write(np.ascontiguousarray(images).tobytes())
            with member(zf, "labels.npy") as f:
                np.lib.format.write_array(f, np.concatenate(labels), allow_pickle=False)

    return atomic_write(out, write)


def sample_npz(args: MassSampleArgs, max_batches: int | None = None) -> Path | None:
    """Draw args.num_samples samples into args.out; under torchrun the batches are shared among ranks.

    Returns the npz path on rank 0 once written, None elsewhere. `max_batches` stops this process after
    drawing that many batches without assembling (it simulates an interrupted run, for tests)."""
    from tqdm import tqdm

    from terdit.distributed import barrier, broadcast_object, init_distributed, shutdown
    from terdit.loading.serving import load_for_sampling, resolve_device
    from terdit.sampling.generate import check_sampling_args, generate, to_uint8

    _check_args(args)
    dev = resolve_device(args.device)
    resolve_backend(args.backend, dev)  # a bad backend fails before the model is loaded
    owns_group = not torch.distributed.is_initialized()  # a caller's process group is left alone
    info = init_distributed(dev.type)
    hold = contextlib.ExitStack()
    try:
        if info.is_main:
            hold.enter_context(locked(lock_path(args.out), f"--out {args.out}"))
            out = Path(args.out)
            clean_leftovers(out.parent, (out.name,))
            clean_leftovers(parts_dir(out), ("batch-*.npz", SETTINGS_FILE))
        device = f"cuda:{info.local_rank}" if dev.type == "cuda" and dev.index is None and info.enabled else str(dev)
        model, decode, map_labels = load_for_sampling(args.run, ema=args.ema, device=device, dtype=args.dtype)
        k = model.config.num_classes
        classes = list(args.classes) if args.classes else list(range(k))
        check_sampling_args(k, classes, args.cfg, args.steps, args.cfg_channels, model.config.in_channels)
        check_batch_fits(model.config, 2 * args.batch_size, torch.device(device), f"--batch-size {args.batch_size}")
        dtype = next(model.parameters()).dtype
        settings = settings_of(args, classes, dtype)
        out, parts = Path(args.out), parts_dir(args.out)
        _prepare_parts(parts, settings, info.is_main, info)

        nb = num_batches(args.num_samples, args.batch_size)
        todo = [b for b in range(nb) if not part_path(parts, b).is_file()] if info.is_main else None
        todo = broadcast_object(todo, info)  # one listing, so ranks agree on who draws what
        mine = todo[info.rank :: info.world_size]  # round-robin over what is left keeps ranks balanced
        if max_batches is not None:
            mine = mine[:max_batches]
        bar = tqdm(mine, desc="sample-npz", unit="batch", disable=not (args.progress and info.is_main))
        for b in bar:
            labels = batch_labels(args.seed, b, batch_size_of(b, args.num_samples, args.batch_size), classes)
            images = generate(model, map_labels(labels.tolist()), decode=decode, cfg_scale=args.cfg,
                              steps=args.steps, sampler=args.sampler, eta=args.eta,
                              seed=batch_noise_seed(args.seed, b), guide_channels=args.cfg_channels,
                              dtype=dtype if dtype != torch.float32 else None, backend=args.backend)
            _write_part(part_path(parts, b), to_uint8(images), labels)
        if max_batches is not None:
            return None
        barrier(info)
        if not info.is_main:
            return None
        path = assemble(parts, out, settings)
        shutil.rmtree(parts)
        return path
    finally:
        hold.close()
        if owns_group:
            shutdown(info)
