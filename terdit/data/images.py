"""Class-per-folder image datasets (``root/<class>/**/*.jpg``), checked once at scan time.

Decisions, and why:

* **Labels.** By default class ``k`` is the k-th folder name in sorted order, like torchvision's
  ``ImageFolder`` (TerDiT's released checkpoints were trained that way). A folder that ends up with no
  usable image *keeps its index* (a warning names it), so adding or losing files never renumbers the
  other classes. A JSON mapping ``{folder_name: index}`` (``class_map``) fixes indices explicitly, e.g.
  TerDiT's ``class_to_idx.json``; a folder missing from the mapping is an error, never a silent drop.
* **Bad files are found when scanning, not when training.** Every candidate is decoded once (JPEGs at
  1/8 scale through PIL's draft mode, so this costs far less than a full decode). Unreadable, truncated
  and empty files, and files without an image extension, are skipped and reported (count plus the first
  few paths), or rejected with ``strict=True``. Skipping at load time instead would either shift indices
  or break the "same virtual index, same item" rule between the image and latent paths. Verdicts are
  cached per class folder (keyed by every file's size and mtime) under ``$TERDIT_CACHE`` (default
  ``~/.cache/terdit``), so a rescan of an unchanged folder only lists files.
* **Pixels.** Every mode becomes 8-bit RGB (alpha is dropped, as torchvision's loader does; palette images
  go through RGBA first; 16-bit and float images are rescaled). Then ADM's center crop and an optional
  mirror; tensors are CHW float in [-1, 1]. EXIF orientation is ignored, as in the reference pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from terdit.data.base import flip_decision
from terdit.errors import TerditError
from terdit.io import atomic_write_text, clean_leftovers

log = logging.getLogger("terdit.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHOW_SKIPPED = 5  # how many skipped paths a warning or error names
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------- pixels


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; alpha is discarded (the reference training pipeline does the same)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0.0
        if img.mode.startswith("I;16") or hi > 255:
            a = a / 257.0  # 16-bit range onto 8 bits
        elif img.mode == "F" and hi <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency without PIL's warning
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM / DiT preprocessing: halve with a box filter while the short side is at least 2x `size`,
    resize bicubically so the short side is `size`, then cut the central size x size square."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def load_image_array(path: str | Path, resolution: int) -> np.ndarray:
    """The cropped RGB pixels (H, W, 3) uint8 of one file; raises OSError/ValueError if unreadable."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(adm_center_crop(to_rgb(img), resolution))


def check_image(path: str | Path) -> str | None:
    """None if `path` decodes completely, else a short reason. Cheap: JPEGs decode at 1/8 scale."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()  # structure and checksums (catches truncated PNGs)
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # every compressed byte is read: catches truncated JPEG/WebP/...
            if img.width < 1 or img.height < 1:
                return "image has no pixels"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; each is a skip
        return f"unreadable: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------- index


@dataclass
class ImageIndex:
    """The usable images of a folder, their labels, and what was left out and why."""

    root: Path
    class_names: list[str]  # index -> folder name ("" for an index the class map leaves unused)
    paths: list[str]  # relative to root, POSIX separators, sorted by (class folder, path)
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    empty_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Changes whenever the item list, labels or class names change."""
        h = hashlib.sha256()
        h.update(json.dumps([self.class_names, self.paths, self.labels]).encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "class_names": self.class_names, "paths": self.paths,
            "labels": self.labels, "skipped": [list(s) for s in self.skipped],
            "empty_classes": self.empty_classes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageIndex:
        return cls(Path(d["root"]), list(d["class_names"]), list(d["paths"]), [int(x) for x in d["labels"]],
                   [(str(a), str(b)) for a, b in d["skipped"]], list(d["empty_classes"]))

    def skipped_summary(self) -> str:
        """One line: how many files were left out, and the first few with their reasons."""
        shown = "; ".join(f"{p} ({r})" for p, r in self.skipped[:SHOW_SKIPPED])
        more = f"; and {len(self.skipped) - SHOW_SKIPPED} more" if len(self.skipped) > SHOW_SKIPPED else ""
        return f"{len(self.skipped)} file(s) skipped in {self.root}: {shown}{more}"


def read_class_map(path: str | Path) -> dict[str, int]:
    """A JSON object {folder_name: class_index}; indices must be distinct non-negative integers."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TerditError(f"class map {path}: cannot read JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise TerditError(f"class map {path}: expected a non-empty JSON object {{folder_name: index}}")
    out: dict[str, int] = {}
    for name, idx in raw.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise TerditError(f"class map {path}: index for {name!r} must be a non-negative integer, "
                              f"got {idx!r}")
        out[str(name)] = idx
    dup = len(set(out.values())) != len(out)
    if dup:
        raise TerditError(f"class map {path}: two folders share an index")
    return out


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("TERDIT_CACHE") or Path.home() / ".cache" / "terdit")
    return base / "image-index" / (hashlib.sha256(str(root).encode()).hexdigest()[:20] + ".json")


def _read_cache(path: Path, root: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        if d.get("version") == _CACHE_VERSION and d.get("root") == str(root):
            return d["folders"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, in a stable sorted order (symlinks followed)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def _check_many(paths: list[Path], num_workers: int) -> list[str | None]:
    if num_workers > 0 and len(paths) > 64:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            return list(pool.map(check_image, paths, chunksize=32))
    return [check_image(p) for p in paths]


def scan_image_folder(
    root: str | Path,
    *,
    class_map: str | Path | dict[str, int] | None = None,
    strict: bool = False,
    num_workers: int = 0,
    cache: bool = True,
) -> ImageIndex:
    """List and check the images of an ImageNet-style folder; see the module docstring for the rules."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise TerditError(f"{root}: not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TerditError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    mapping = _class_mapping(root, folders, class_map)
    class_names = [""] * (max(mapping.values()) + 1)
    for name, k in mapping.items():
        class_names[k] = name

    skipped = [(p.name, "not inside a class folder") for p in sorted(root.iterdir())
               if p.is_file() and not p.name.startswith(".")]
    cache_path = _cache_file(root)
    old_cache = _read_cache(cache_path, root) if cache else {}
    new_cache: dict[str, Any] = {}
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for name in folders:
        good, new_cache[name] = _scan_class_folder(root, name, old_cache.get(name), num_workers, skipped)
        paths += good
        labels += [mapping[name]] * len(good)
        if not good:
            empty.append(name)
    if cache and new_cache != old_cache:
        _write_cache(cache_path, root, new_cache)
    index = ImageIndex(root, class_names, paths, labels, skipped, empty)
    _report_problems(index, strict)
    return index


def _class_mapping(root: Path, folders: list[str], class_map: str | Path | dict[str, int] | None) -> dict[str, int]:
    """Class folder name -> label: sorted order, or the class map (which must name every folder)."""
    if class_map is None:
        return {name: k for k, name in enumerate(folders)}
    mapping = dict(class_map) if isinstance(class_map, dict) else read_class_map(class_map)
    unmapped = [f for f in folders if f not in mapping]
    if unmapped:
        raise TerditError(
            f"{root}: {len(unmapped)} class folder(s) are not in the class map, "
            f"e.g. {unmapped[:SHOW_SKIPPED]}"
        )
    return mapping


def _scan_class_folder(root: Path, name: str, cached: dict[str, Any] | None, num_workers: int,
                       skipped: list[tuple[str, str]]) -> tuple[list[str], dict[str, Any]]:
    """One class folder: (its usable images, relative to root; its cache entry). Appends what it skips.

    The folder's files are checked again only when their names, sizes or modification times changed since the
    cached scan (the fingerprint)."""
    candidates: list[Path] = []
    for f in _walk_files(root / name):
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            candidates.append(f)
        else:
            why = f"not an image file ({f.suffix or 'no extension'})"
            skipped.append((f.relative_to(root).as_posix(), why))
    rel = [f.relative_to(root).as_posix() for f in candidates]
    stats = [(r, *_stat(f)) for r, f in zip(rel, candidates)]
    fp = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:20]
    if cached and cached.get("fp") == fp:
        bad = dict(cached["bad"])
    else:
        bad = {r: why for r, why in zip(rel, _check_many(candidates, num_workers)) if why is not None}
    skipped += [(r, bad[r]) for r in rel if r in bad]
    return [r for r in rel if r not in bad], {"fp": fp, "bad": bad}


def _write_cache(cache_path: Path, root: Path, folders: dict[str, Any]) -> None:
    try:
        clean_leftovers(cache_path.parent, (cache_path.name,), log=None)  # a killed scan's temporary
        atomic_write_text(cache_path, json.dumps({"version": _CACHE_VERSION, "root": str(root),
                                                  "folders": folders}))
    except OSError:
        pass  # a read-only home only costs a re-check next time


def _report_problems(index: ImageIndex, strict: bool) -> None:
    """Skipped files and empty class folders: an error with `strict` (or when nothing is usable), else warnings."""
    skipped, empty = index.skipped, index.empty_classes
    if strict and (skipped or empty):
        problems = [index.skipped_summary()] if skipped else []
        if empty:
            problems.append(f"class folder(s) without usable images: {empty[:SHOW_SKIPPED]}")
        raise TerditError(f"--strict: {'; '.join(problems)}")
    if not index.paths:
        raise TerditError(f"{index.root}: no readable images with extensions {', '.join(IMAGE_EXTENSIONS)}"
                          + (f" ({index.skipped_summary()})" if skipped else ""))
    if skipped:
        _warn(index.skipped_summary())
    if empty:
        _warn(f"{len(empty)} class folder(s) have no usable images and keep their index: "
              f"{empty[:SHOW_SKIPPED]}")


def _stat(f: Path) -> tuple[int, int]:
    try:
        s = f.stat()
        return s.st_size, s.st_mtime_ns
    except OSError:
        return -1, 0


def _warn(msg: str) -> None:
    """A one-line report on stderr (logging's last-resort handler prints it when nothing is configured)."""
    log.warning(msg)


# -------------------------------------------------------------------------------------------- dataset


class ImageFolderDataset(Dataset):
    """Cropped (and, per ``flip_decision(seed, v)``, mirrored) images of an index, by virtual index."""

    def __init__(self, index: ImageIndex, resolution: int, *, seed: int = 0, flip: bool = True) -> None:
        self.index, self.resolution, self.seed, self.flip = index, resolution, seed, flip

    def __len__(self) -> int:
        return len(self.index)

    def pixels(self, i: int) -> np.ndarray:
        """Item i's cropped uint8 pixels; a file that broke after the scan is an error naming it."""
        path = self.index.root / self.index.paths[i]
        try:
            return load_image_array(path, self.resolution)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise TerditError(f"{path}: unreadable although it passed the scan (changed since?): {e}") from e

    def __getitem__(self, v: int) -> tuple[torch.Tensor, int]:
        i = v % len(self.index)
        arr = self.pixels(i)
        if self.flip and flip_decision(self.seed, v):
            arr = arr[:, ::-1]
        return to_tensor(arr), self.index.labels[i]
