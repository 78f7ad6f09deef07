"""Pre-extracted VAE latents: writing them once (resumable, multi-process) and reading them memory-mapped.

Layout of a latent directory::

    LATENTS/manifest.json              written last, by rank 0: its presence means "complete"
    LATENTS/shard-000000.safetensors   items [0, S) of the scanned image list, S = --shard-size
    LATENTS/shard-000001.safetensors   items [S, 2S) ...

Each shard holds ``latents`` (N, C, h, w) in model space (already multiplied by the scale factor),
``latents_flip`` (latents of the mirrored image, with ``--flip``), ``std``/``std_flip`` (posterior standard
deviation, with ``--vae-mode moments``), ``labels`` and ``indices`` (position in the scanned list), plus a
settings hash in its metadata. Shard k is a fixed slice of the scanned list, so a shard's content does
not depend on the number of processes; process r of W handles shards k with k % W == r, and a rerun
skips shards already on disk (written atomically; a file cut short some other way is redone, and a
complete folder whose shards are not all intact loses its manifest and is completed again). The folder is
locked (``LATENTS/.lock``) by the process that writes it.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from terdit.data.base import flip_decision, item_hash
from terdit.data.images import SHOW_SKIPPED, ImageIndex, _warn, load_image_array, scan_image_folder, to_tensor
from terdit.data.vae import VAE, load_vae
from terdit.distributed import DistInfo, join_group
from terdit.errors import TerditError
from terdit.io import atomic_write_text, clean_leftovers, locked, save_tensors

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
FORMAT = "terdit-latents"
FORMAT_VERSION = 1
EXTRACT_MODES = ("mean", "sample", "moments")
STORE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
_NOISE_STREAM = 2  # item_hash stream for extraction-time posterior samples (0: flip, 1: load-time noise)


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


# ------------------------------------------------------------------------------------- safetensors I/O


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where tensor data starts); raises TerditError for a foreign file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        return header, 8 + n
    except (OSError, ValueError, struct.error) as e:
        raise TerditError(f"{path}: not a readable safetensors file ({e})") from e


def mmap_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy memmap (no data is read until indexed)."""
    header, start = read_safetensors_header(path)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _NP_DTYPES.get(info["dtype"])
        if dtype is None:
            raise TerditError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        begin, _end = info["data_offsets"]
        if math.prod(shape) == 0:
            out[name] = np.empty(shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def _shard_metadata(path: Path) -> dict[str, str] | None:
    """A shard's metadata, or None if the file is missing or unreadable (then it is redone)."""
    if not path.is_file():
        return None
    try:
        header, start = read_safetensors_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < start + end:
            return None  # cut short (not by us: shards are renamed into place only when complete)
    except (TerditError, KeyError, TypeError, IndexError, OSError):
        return None
    return header.get("__metadata__") or {}


def _broken_shards(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Shards a manifest lists that are missing, cut short or unreadable."""
    return [s["file"] for s in manifest.get("shards", []) if _shard_metadata(root / s["file"]) is None]


def _shard_done(out: Path, k: int, settings: dict[str, Any]) -> bool:
    return (_shard_metadata(out / shard_name(k)) or {}).get("settings_hash") == settings["settings_hash"]


# ------------------------------------------------------------------------------------------ processes


class _Dist(DistInfo):
    """The process group for extraction (terdit.distributed's: torchrun's when launched by it, else a single
    process) and the device this process encodes on (cuda:LOCAL_RANK by default when CUDA is available)."""

    def __init__(self, device: str | None) -> None:
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        info = join_group(self.device.type, timeout=datetime.timedelta(hours=12))
        super().__init__(info.rank, info.world_size, info.local_rank, info.owned)


# -------------------------------------------------------------------------------------------- writing


class _ExtractItems(Dataset):
    """Item i of the index as (i, cropped image tensor or None, error or None); never raises."""

    def __init__(self, index: ImageIndex, resolution: int, items: range) -> None:
        self.index, self.resolution, self.items = index, resolution, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor | None, str | None]:
        i = self.items[j]
        try:
            pixels = load_image_array(self.index.root / self.index.paths[i], self.resolution)
            return i, to_tensor(pixels), None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return i, None, f"unreadable at extraction: {type(e).__name__}: {e}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    ids = [i for i, _ in ok]
    xs = torch.stack([x for _, x in ok]) if ok else None
    return ids, xs, bad


def _item_noise(seed: int, ids: list[int], stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Posterior noise per item from (seed, item): the same whatever the batching or process count."""
    out = torch.empty((len(ids), *shape))
    for r, i in enumerate(ids):
        g = torch.Generator().manual_seed(item_hash(seed, i, stream))
        out[r] = torch.randn(shape, generator=g)
    return out


def _inputs_fingerprint(index: ImageIndex) -> str:
    """Size and modification time of every image: an image replaced under the same name changes it."""
    h = hashlib.sha256()
    for rel in index.paths:
        st = (index.root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the VAE's weights: the same hub id or folder may hold other weights later."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(index: ImageIndex, vae: VAE, resolution: int, flip: bool, mode: str, seed: int,
              store_dtype: str, shard_size: int) -> dict[str, Any]:
    s = {
        "format": FORMAT, "version": FORMAT_VERSION, "resolution": resolution, "vae": vae.spec,
        "scale_factor": vae.scale, "shift_factor": vae.shift,
        "latent_shape": list(vae.latent_shape(resolution)),
        "vae_mode": mode, "flip": flip, "seed": seed if mode == "sample" else None,
        "store_dtype": store_dtype, "shard_size": shard_size, "index_fingerprint": index.fingerprint(),
        "inputs_fingerprint": _inputs_fingerprint(index), "vae_fingerprint": _weights_fingerprint(vae.model),
    }
    s["settings_hash"] = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
    return s


def _encode_shard(vae: VAE, index: ImageIndex, k: int, settings: dict[str, Any], *, batch_size: int,
                  num_workers: int, progress: Any) -> tuple[dict[str, torch.Tensor], list[tuple[int, str]]]:
    n, size = len(index), settings["shard_size"]
    items = range(k * size, min(n, (k + 1) * size))
    loader = DataLoader(_ExtractItems(index, settings["resolution"], items), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    mode, seed, flip = settings["vae_mode"], int(settings["seed"] or 0), settings["flip"]
    store = STORE_DTYPES[settings["store_dtype"]]
    shape = tuple(settings["latent_shape"])
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": [], "std": [], "std_flip": []}
    ids_all: list[int] = []
    bad_all: list[tuple[int, str]] = []
    for ids, xs, bad in loader:
        bad_all.extend(bad)
        if xs is not None:
            views = [("", xs)] + ([("_flip", xs.flip(-1))] if flip else [])
            for suffix, imgs in views:
                mean, std = vae.moments(imgs)
                mean, std = mean.cpu(), std.cpu()
                if mode == "sample":
                    mean = mean + std * _item_noise(seed, ids, _NOISE_STREAM + (suffix == "_flip"), shape)
                parts["latents" + suffix].append(mean.to(store))
                if mode == "moments":
                    parts["std" + suffix].append(std.to(store))
            ids_all.extend(ids)
        if progress is not None:
            progress.update(len(ids) + len(bad))
    tensors: dict[str, torch.Tensor] = {
        "labels": torch.tensor([index.labels[i] for i in ids_all], dtype=torch.int64),
        "indices": torch.tensor(ids_all, dtype=torch.int64),
    }
    names = ["latents"] + (["std"] if mode == "moments" else [])
    names += [name + "_flip" for name in names] if flip else []
    for name in names:  # a shard whose images all failed still has every tensor, with 0 rows
        tensors[name] = torch.cat(parts[name]) if parts[name] else torch.empty((0, *shape), dtype=store)
    return tensors, bad_all


def _write_manifest(out: Path, index: ImageIndex, settings: dict[str, Any]) -> dict[str, Any]:
    """Check that the shards cover every item exactly once, then write the manifest (rank 0 only)."""
    n, size = len(index), settings["shard_size"]
    n_shards = math.ceil(n / size)
    seen = np.zeros(n, dtype=np.int64)
    shards, skipped_late = [], []
    counts = [0] * index.num_classes
    for k in range(n_shards):
        path = out / shard_name(k)
        meta = _shard_metadata(path)
        if meta is None or meta.get("settings_hash") != settings["settings_hash"]:
            raise TerditError(f"{path}: missing or from other settings after extraction; rerun to redo it")
        arrays = mmap_safetensors(path)
        idx = np.asarray(arrays["indices"])
        lo, hi = k * size, min(n, (k + 1) * size)
        bad = [(int(i), why) for i, why in json.loads(meta.get("skipped", "[]"))]
        if ((idx < lo) | (idx >= hi)).any():
            raise TerditError(f"{path}: holds items outside its range [{lo}, {hi})")
        np.add.at(seen, idx, 1)
        for i, _ in bad:
            seen[i] += 1
        for lab in np.asarray(arrays["labels"]).tolist():
            counts[lab] += 1
        skipped_late.extend((index.paths[i], why) for i, why in bad)
        shards.append({"file": path.name, "count": int(len(idx)), "first_item": lo})
    if (seen != 1).any():
        wrong = np.nonzero(seen != 1)[0][:SHOW_SKIPPED].tolist()
        raise TerditError(f"{out}: items stored {seen[wrong].tolist()} times instead of once: {wrong}")
    manifest = {
        **settings,
        "source": str(index.root),
        "num_items": int(sum(s["count"] for s in shards)),
        "num_scanned": n,
        "num_classes": index.num_classes,
        "class_names": index.class_names,
        "class_counts": counts,
        "empty_classes": index.empty_classes,
        "shards": shards,
        "num_skipped": len(index.skipped) + len(skipped_late),
        "skipped": [{"path": p, "reason": r} for p, r in list(index.skipped) + skipped_late],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TerditError(f"{path}: cannot read the latent manifest ({e})") from e
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise TerditError(f"{path}: not a terdit latent manifest "
                          f"(format {m.get('format')!r}, version {m.get('version')!r})")
    return m


def extract_latents(
    data: str | Path,
    out: str | Path,
    *,
    vae: str | VAE,
    resolution: int = 256,
    flip: bool = False,
    vae_mode: str = "mean",
    seed: int = 0,
    batch_size: int = 32,
    shard_size: int = 4096,
    num_workers: int = 4,
    strict: bool = False,
    class_map: str | Path | None = None,
    store_dtype: str = "fp16",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode every usable image of `data` into shards under `out`; returns the manifest, or None when
    `max_shards` stopped this run early (a rerun continues). Under torchrun each process takes every
    world-th shard; rank 0 checks coverage and writes the manifest once all are done."""
    _check_extract_args(vae_mode, store_dtype, shard_size, batch_size)
    out = Path(out)
    d = _Dist(device)
    hold = contextlib.ExitStack()
    existed = out.exists()
    try:
        if d.rank == 0 and (out.is_dir() or not existed):
            hold.enter_context(locked(out / LOCK_FILE, f"--out {out}"))
        index = _shared_index(d, out, data, class_map=class_map, strict=strict, num_workers=num_workers)

        error = None
        try:
            model = vae if isinstance(vae, VAE) else load_vae(vae, d.device, dtype)
            model.to(d.device)
            settings = _settings(index, model, resolution, flip, vae_mode, seed, store_dtype, shard_size)
            if d.rank == 0:
                _check_existing(out, settings)
        except TerditError as e:
            error = str(e)
        d.agree(error)

        if (out / MANIFEST).is_file():
            manifest = read_manifest(out)
            if d.rank == 0:
                print(f"{out}: already complete ({manifest['num_items']} items); nothing to do")
            return manifest
        out.mkdir(parents=True, exist_ok=True)

        n_shards = math.ceil(len(index) / shard_size)
        mine = [k for k in range(d.rank, n_shards, d.world_size) if not _shard_done(out, k, settings)]
        if max_shards is not None:
            mine = mine[:max_shards]
        _encode_shards(d, out, model, index, mine, settings, batch_size=batch_size, num_workers=num_workers,
                       strict=strict, progress=progress)
        return _finish(d, out, index, settings, n_shards)
    finally:
        hold.close()
        if d.rank == 0 and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused before anything was written: leave nothing behind
        d.close()


def _check_extract_args(vae_mode: str, store_dtype: str, shard_size: int, batch_size: int) -> None:
    if vae_mode not in EXTRACT_MODES:
        raise TerditError(f"--vae-mode must be one of {EXTRACT_MODES}, got {vae_mode!r}")
    if store_dtype not in STORE_DTYPES:
        raise TerditError(f"store dtype must be one of {tuple(STORE_DTYPES)}, got {store_dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise TerditError("--shard-size and --batch-size must be positive")


def _shared_index(d: _Dist, out: Path, data: str | Path, **scan: Any) -> ImageIndex:
    """Scan on rank 0 (its errors reach everyone), then hand the same index to every process."""
    index, error = None, None
    if d.rank == 0:
        try:
            if out.exists() and not out.is_dir():
                raise TerditError(f"--out {out}: exists and is not a directory")
            index = scan_image_folder(data, **scan)
        except TerditError as e:
            error = str(e)
    d.agree(error)
    index = d.broadcast(index.to_dict() if index is not None else None)
    return ImageIndex.from_dict(index)


def _encode_shards(d: _Dist, out: Path, model: VAE, index: ImageIndex, mine: list[int], settings: dict[str, Any],
                   *, batch_size: int, num_workers: int, strict: bool, progress: bool) -> None:
    """Encode and save this process's shards; images that fail to decode only now are reported by rank 0."""
    shard_size = settings["shard_size"]
    bar = None
    if progress and d.rank == 0:
        from tqdm import tqdm

        todo = sum(min(len(index), (k + 1) * shard_size) - k * shard_size for k in mine)
        desc = "extract-latents" + (f" (rank 0 of {d.world_size})" if d.world_size > 1 else "")
        bar = tqdm(total=todo, desc=desc, unit="img", dynamic_ncols=True)
    error = None
    late: list[str] = []
    try:
        for k in mine:
            tensors, bad = _encode_shard(model, index, k, settings, batch_size=batch_size,
                                         num_workers=num_workers, progress=bar)
            if bad and strict:
                raise TerditError(f"--strict: {index.paths[bad[0][0]]}: {bad[0][1]}")
            late.extend(f"{index.paths[i]} ({why})" for i, why in bad)
            meta = {"settings_hash": settings["settings_hash"], "shard": str(k),
                    "written_by": f"rank {d.rank} of {d.world_size}",
                    "skipped": json.dumps(bad), "settings": json.dumps(settings)}
            save_tensors(out / shard_name(k), tensors, metadata=meta)
    except TerditError as e:
        error = f"rank {d.rank}: {e}" if d.world_size > 1 else str(e)
    finally:
        if bar is not None:
            bar.close()
    d.agree(error)
    late_all = [x for part in d.gather(late) for x in part]
    if late_all:
        _warn(f"{len(late_all)} image(s) failed to decode during extraction and were left out: "
              + "; ".join(late_all[:SHOW_SKIPPED]))


def _finish(d: _Dist, out: Path, index: ImageIndex, settings: dict[str, Any], n_shards: int) -> dict[str, Any] | None:
    """Rank 0 writes the manifest once every shard is there; every process returns it (None while shards are
    missing, e.g. after `max_shards`)."""
    done = d.broadcast(all(_shard_done(out, k, settings) for k in range(n_shards)))  # rank 0's view
    error, manifest = None, None
    if d.rank == 0 and done:
        try:
            manifest = _write_manifest(out, index, settings)
        except TerditError as e:
            error = str(e)
    d.agree(error)
    if not done:
        return None
    return manifest if d.rank == 0 else read_manifest(out)


def _check_existing(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix shards made with other settings (or from a changed folder) into this directory."""
    if not out.is_dir():
        return
    clean_leftovers(out, ("shard-*", MANIFEST))  # left by a killed run; no process of this run writes yet
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if m.get("settings_hash") != settings["settings_hash"]:
            raise TerditError(f"--out {out}: holds complete latents made with other settings or from a "
                              f"changed folder ({_diff(m, settings)}); choose another --out or delete it")
        broken = _broken_shards(out, m)
        if not broken:
            return
        print(f"{out}: {', '.join(broken[:3])} missing or cut short; redoing {len(broken)} shard(s)")
        (out / MANIFEST).unlink()
    for p in sorted(out.glob("shard-*.safetensors")):
        meta = _shard_metadata(p)
        if meta is not None and meta.get("settings_hash") != settings["settings_hash"]:
            try:
                old = json.loads(meta.get("settings", "{}"))
            except ValueError:
                old = {}
            raise TerditError(f"--out {out}: {p.name} was made with other settings or from a changed folder "
                              f"({_diff(old, settings)}); choose another --out or delete it")


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in new if k != "settings_hash" and old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys[:4]) or "unknown difference"


# -------------------------------------------------------------------------------------------- reading


class LatentDataset(Dataset):
    """Stored latents by virtual index, memory-mapped (each process maps the shards on first use).

    Flip: when ``flip_decision(seed, v)`` says so, the latent of the mirrored image is returned if it was
    stored, else the stored latent mirrored along its width (close, not equal, to encoding the mirror).
    With posterior std stored (``moments``) and ``sample=True``, x = mean + std * noise(seed, v)."""

    def __init__(self, root: str | Path, *, seed: int = 0, flip: bool = True, sample: bool = False) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.seed, self.flip = seed, flip
        self.sample = sample and self.manifest["vae_mode"] == "moments"
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = np.cumsum([0, *counts]).tolist()
        self._files = [self.root / s["file"] for s in self.manifest["shards"]]
        for f in self._files:
            if _shard_metadata(f) is None:
                raise TerditError(f"{f}: listed in {self.root / MANIFEST} but missing, cut short or unreadable; "
                                  f"rerun extract-latents on {self.root} to redo it")
        self._maps: list[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # DataLoader workers re-map instead of pickling arrays
        return state

    @property
    def stored_flip(self) -> bool:
        return bool(self.manifest["flip"])

    def _shard(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if self._maps is None:
            self._maps = [mmap_safetensors(f) for f in self._files]
        k = bisect.bisect_right(self._starts, i) - 1
        return self._maps[k], i - self._starts[k]

    def __getitem__(self, v: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        i = v % n
        arrays, j = self._shard(i)
        flipped = self.flip and flip_decision(self.seed, v)
        suffix = "_flip" if flipped and "latents_flip" in arrays else ""
        x = torch.from_numpy(np.array(arrays["latents" + suffix][j], dtype=np.float32))
        if self.sample:
            std = torch.from_numpy(np.array(arrays["std" + suffix][j], dtype=np.float32))
            g = torch.Generator().manual_seed(item_hash(self.seed, v, 1))
            x = x + std * torch.randn(x.shape, generator=g)
        if flipped and not suffix:
            x = x.flip(-1)
        return x, int(arrays["labels"][j])

    def __getitems__(self, vs: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [self[v] for v in vs]
