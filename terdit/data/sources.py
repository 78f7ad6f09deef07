"""`--data PATH` for images: an image folder encoded on the fly, or a directory of extracted latents.

Both give the same model-space tensor for the same (seed, virtual index) when the latents were
extracted with ``--vae-mode mean`` and the folder is encoded with the posterior mean (``vae_sample=False``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from terdit.data.base import TrainingData
from terdit.data.images import ImageFolderDataset, _warn, scan_image_folder
from terdit.data.latents import MANIFEST, LatentDataset, read_manifest
from terdit.data.vae import VAE, load_vae
from terdit.errors import TerditError

PIXEL_SPACE = "none"  # --vae none: train directly on pixels (small images only)


class _OnDevice:
    """encode/decode callables that move the VAE to the batch's device on first use (the training loop
    calls them on-device; the data source does not know the device when it is opened)."""

    def __init__(self, vae: VAE, sample: bool, seed: int) -> None:
        self.vae, self.sample, self.seed = vae, sample, seed
        self._gen: torch.Generator | None = None

    def _follow(self, x: Tensor) -> None:
        if self.vae.device != x.device:
            self.vae.to(x.device)
            self._gen = None

    def encode(self, x: Tensor) -> Tensor:
        self._follow(x)
        if not self.sample:
            return self.vae.encode(x, "mean")
        if self._gen is None:  # one stream per run: deterministic for a seed, not across resumes
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        return self.vae.encode(x, "sample", generator=self._gen)

    def decode(self, z: Tensor) -> Tensor:
        self._follow(z)
        return self.vae.decode(z)


def is_latent_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_image_data(
    path: str,
    *,
    resolution: int | None,
    vae: str | None,
    seed: int,
    flip: bool = True,
    vae_sample: bool = True,
    class_map: str | None = None,
    num_workers: int = 0,
    strict: bool = False,
) -> TrainingData:
    """A TrainingData for an image folder (needs `vae`: a hub id, a local dir, or "none" for pixels) or a
    latent directory (its own VAE is used for decoding unless `vae` names another)."""
    root = Path(path)
    if not root.is_dir():
        raise TerditError(f"--data {path}: not a directory")
    if is_latent_dir(root):
        if resolution is None:  # the latents know their resolution
            resolution = int(read_manifest(root)["resolution"])
        return _latent_data(root, resolution=resolution, vae=vae, seed=seed, flip=flip, vae_sample=vae_sample)
    if any(root.glob("shard-*.safetensors")):
        raise TerditError(f"--data {path}: latent extraction is unfinished (no {MANIFEST}); "
                          "rerun the same extract-latents command to complete it")
    if resolution is None:
        raise TerditError(f"--data {path} is an image folder: pass --resolution (e.g. 256)")
    if vae is None:
        raise TerditError(f"--data {path} is an image folder: pass --vae (e.g. stabilityai/sd-vae-ft-ema, "
                          f"a local diffusers directory, or '{PIXEL_SPACE}' to train on pixels)")
    index = scan_image_folder(root, class_map=class_map, strict=strict, num_workers=num_workers)
    dataset = ImageFolderDataset(index, resolution, seed=seed, flip=flip)
    what = f"{len(index)} images in {index.num_classes} classes from {index.root} at {resolution}px"
    if index.skipped:
        what += f" ({len(index.skipped)} files skipped)"
    if vae == PIXEL_SPACE:
        return TrainingData(dataset, index.num_classes, (3, resolution, resolution), None, None,
                            f"{what}, pixel space")
    model = load_vae(vae)
    dev = _OnDevice(model, vae_sample, seed)
    mode = "posterior sample" if vae_sample else "posterior mean"
    return TrainingData(dataset, index.num_classes, model.latent_shape(resolution), dev.encode, dev.decode,
                        f"{what}, encoded on the fly by {model.spec} ({mode}, x{model.scale:g})")


def _latent_data(root: Path, *, resolution: int, vae: str | None, seed: int, flip: bool,
                 vae_sample: bool) -> TrainingData:
    m = read_manifest(root)
    if resolution != m["resolution"]:
        raise TerditError(f"--data {root}: latents were extracted at {m['resolution']}px, not --resolution "
                          f"{resolution}; extract again at {resolution} or change --resolution")
    ds = LatentDataset(root, seed=seed, flip=flip, sample=vae_sample)
    spec = vae if vae not in (None, PIXEL_SPACE) else m["vae"]
    model = load_vae(spec)
    if abs(model.scale - m["scale_factor"]) > 1e-9 or abs(model.shift - m["shift_factor"]) > 1e-9:
        raise TerditError(f"--vae {spec}: its latent scaling ({model.scale:g}, shift {model.shift:g}) "
                          f"differs from the extraction's ({m['scale_factor']:g}, {m['shift_factor']:g})")
    if vae_sample and m["vae_mode"] == "mean":
        _warn(f"{root}: latents hold the posterior mean only; training on means (extract with "
              "--vae-mode moments or sample for sampled latents)")
    dev = _OnDevice(model, False, seed)
    drawn = "posterior samples drawn per step" if ds.sample else "posterior means"
    stored = {"mean": "posterior means", "sample": "one stored posterior sample per image",
              "moments": drawn}[m["vae_mode"]]
    flips = ("stored mirrored latents" if ds.stored_flip else "mirrored latents") if flip else "no flips"
    desc = (f"{len(ds)} latents in {m['num_classes']} classes from {root} ({m['resolution']}px, {m['vae']}, "
            f"{stored}, {flips})")
    return TrainingData(ds, int(m["num_classes"]), tuple(m["latent_shape"]), None, dev.decode, desc)
