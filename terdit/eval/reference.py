"""ADM's batch format: an .npz whose `arr_0` holds uint8 images (N, H, W, C), optionally with precomputed
Inception statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial). Reading streams `arr_0` in
batches straight out of the zip, so a 50,000 x 256 x 256 x 3 sample batch (9.8 GB) never sits in memory."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from terdit.data.images import adm_center_crop as center_crop  # the one ADM crop (re-exported here)
from terdit.errors import TerditError
from terdit.io import atomic_write

IMAGE_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class NpzImages:
    """The `arr_0` array of an npz file, validated on open and read lazily in batches."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TerditError(f"{self.path}: file not found")
        if not zipfile.is_zipfile(self.path):
            raise TerditError(f"{self.path}: not an .npz file (not a zip archive, or truncated)")
        self.member = f"{IMAGE_KEY}.npy"
        try:
            with zipfile.ZipFile(self.path) as zf:
                if self.member not in zf.namelist():
                    keys = sorted(n.removesuffix(".npy") for n in zf.namelist())
                    raise TerditError(f"{self.path}: no '{IMAGE_KEY}' array (keys: {keys}); "
                                      f"images must be stored as {IMAGE_KEY}, shape (N, H, W, C), uint8")
                size = zf.getinfo(self.member).file_size
                with zf.open(self.member) as f:
                    shape, fortran, dtype = _read_npy_header(f, self.path)
                    self.data_offset = f.tell()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TerditError(f"{self.path}: unreadable npz ({e})") from e
        if dtype != np.uint8:
            raise TerditError(f"{self.path}: '{IMAGE_KEY}' has dtype {dtype}, expected uint8 images 0..255")
        if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
            raise TerditError(f"{self.path}: '{IMAGE_KEY}' has shape {shape}, expected (N, H, W, C) with "
                              f"N > 0 and C = 1 or 3")
        if fortran:
            raise TerditError(f"{self.path}: '{IMAGE_KEY}' is stored in Fortran order; save it C-contiguous")
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.image_bytes = int(np.prod(self.shape[1:]))
        if size != self.data_offset + self.image_bytes * self.shape[0]:
            raise TerditError(f"{self.path}: '{IMAGE_KEY}' holds {size - self.data_offset} bytes of data, "
                              f"its header promises {self.image_bytes * self.shape[0]} (truncated file?)")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive uint8 (B, H, W, C) batches in file order, the first `limit` images at most."""
        total = len(self) if limit is None else min(limit, len(self))
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                f.seek(self.data_offset)
                for start in range(0, total, batch_size):
                    n = min(batch_size, total - start)
                    buf = f.read(n * self.image_bytes)
                    if len(buf) != n * self.image_bytes:
                        raise TerditError(f"{self.path}: '{IMAGE_KEY}' ends early at image {start} "
                                          f"(truncated)")
                    yield np.frombuffer(buf, dtype=np.uint8).reshape((n, *self.shape[1:]))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise TerditError(f"{self.path}: unreadable '{IMAGE_KEY}' ({e})") from e

    def read(self, limit: int | None = None) -> np.ndarray:
        return np.concatenate(list(self.batches(4096, limit)), axis=0)


def _read_npy_header(f, path: Path):
    """(shape, fortran_order, dtype) of an .npy stream, refusing object arrays (they would need pickle)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise TerditError(f"{path}: '{IMAGE_KEY}' is not a valid .npy array ({e})") from e
    if dtype.hasobject:
        raise TerditError(f"{path}: '{IMAGE_KEY}' holds Python objects; only uint8 image arrays are accepted")
    return shape, fortran, dtype


@dataclass
class ReferenceBatch:
    """A reference (or sample) batch: its images and any statistics stored next to them."""

    path: Path
    images: NpzImages
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def stored_statistics(self, spatial: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(mu, sigma) from the file, or (mu_s, sigma_s) when spatial; None when the file has none."""
        mu, sigma = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
        if mu in self.stats and sigma in self.stats:
            return self.stats[mu], self.stats[sigma]
        return None


def load_batch(path: str | Path) -> ReferenceBatch:
    """Open an ADM-format npz, checking its images and the shapes of any stored statistics."""
    images = NpzImages(path)
    stats: dict[str, np.ndarray] = {}
    try:
        with np.load(images.path, allow_pickle=False) as npz:
            for key in STAT_KEYS:
                if key in npz.files:
                    stats[key] = np.asarray(npz[key], dtype=np.float64)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise TerditError(f"{images.path}: unreadable statistics ({e})") from e
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in stats) != (sigma in stats):
            raise TerditError(f"{images.path}: has only one of '{mu}' / '{sigma}'; both or neither needed")
        if mu in stats:
            d = stats[mu].shape
            if len(d) != 1 or stats[sigma].shape != (d[0], d[0]):
                raise TerditError(f"{images.path}: '{mu}' {d} and '{sigma}' {stats[sigma].shape} do not "
                                  f"form a mean and covariance")
    return ReferenceBatch(path=images.path, images=images, stats=stats)


def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC passes through; float NCHW in [-1, 1] becomes clamp(127.5 x + 128) truncated, like DiT."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise TerditError(f"uint8 images must be (N, H, W, C) with C = 1 or 3, got {a.shape}")
        return a
    if not np.issubdtype(a.dtype, np.floating) or a.ndim != 4 or a.shape[1] not in (1, 3):
        raise TerditError(f"float images must be (N, C, H, W) in [-1, 1] with C = 1 or 3, got {a.dtype} "
                          f"{a.shape}")
    return np.clip(127.5 * a + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def write_batch(path: str | Path, images: np.ndarray, stats: dict[str, np.ndarray] | None = None) -> Path:
    """Write images (uint8 NHWC, or float NCHW in [-1, 1]) and optional statistics as ADM npz, atomically."""
    arrays = {IMAGE_KEY: to_uint8_nhwc(images)}
    for key, value in (stats or {}).items():
        if key not in STAT_KEYS:
            raise TerditError(f"unknown statistics key {key!r}; allowed: {STAT_KEYS}")
        arrays[key] = np.asarray(value, dtype=np.float64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def resize_batch(images: np.ndarray, resolution: int) -> np.ndarray:
    """Center-crop/resize uint8 NHWC images to resolution x resolution (a no-op when they already are)."""
    if images.shape[1:3] == (resolution, resolution):
        return images
    mode = "L" if images.shape[-1] == 1 else "RGB"
    out = [np.asarray(center_crop(Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode), resolution))
           for im in images]
    return np.stack(out).reshape(len(images), resolution, resolution, images.shape[-1])


def images_from_folder(folder: str | Path, resolution: int, channels: int = 3) -> np.ndarray:
    """All images under `folder` (recursively, sorted by path), center-cropped to uint8 NHWC."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TerditError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise TerditError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if channels == 1 else "RGB"
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(center_crop(im.convert(mode), resolution)))
        except OSError as e:
            raise TerditError(f"{p}: not a readable image ({e})") from e
    return np.stack(out).reshape(len(files), resolution, resolution, channels)
