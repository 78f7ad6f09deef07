"""Training-data throughput: stored latents vs encoding images through the VAE at every step.

Builds a synthetic image folder (JPEGs larger than the target, so the ADM crop does real work), a random
VAE (diffusers AutoencoderKL, downsampling 8 like the SD VAE but far narrower unless --vae names a real
one), extracts latents, then times batches of (fetch [+ encode] [+ one TerDiT-Micro training step]).

    python benchmarks/data_throughput.py                    # 64x64 images, tiny VAE, CPU
    python benchmarks/data_throughput.py --vae stabilityai/sd-vae-ft-ema --resolution 256 --device cuda

The tiny VAE makes encoding far cheaper than a real SD VAE (~34M encoder parameters), so the ratio here
is a lower bound on the gain from extracting latents.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from terdit.data.latents import extract_latents
from terdit.data.sources import open_image_data
from terdit.data.synthetic import save_tiny_vae, smooth_image


def make_jpegs(root: Path, n: int, classes: int, side: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = int(side * rng.uniform(1.0, 1.6)), int(side * rng.uniform(1.0, 1.6))
        Image.fromarray(smooth_image(rng, h, w)).save(d / f"{i:05d}.jpg", quality=90)


def timed_epoch(data, batch_size: int, batches: int, num_workers: int, device: torch.device,
                step=None) -> float:
    """Images per second over `batches` batches of virtual indices (after one warm-up batch)."""
    n = len(data.dataset)
    order = [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(batches + 1)]
    loader = DataLoader(data.dataset, batch_sampler=order, num_workers=num_workers)
    it = iter(loader)
    t0 = None
    for b in range(batches + 1):
        if b == 1:
            t0 = time.perf_counter()
        x, y = next(it)
        x = x.to(device)
        if data.encode is not None:
            x = data.encode(x)
        if step is not None:
            step(x, y.to(device) % 10)
        if device.type == "cuda":
            torch.cuda.synchronize()
    assert n > 0
    return batches * batch_size / (time.perf_counter() - t0)


def make_train_step(device: torch.device):
    from terdit.diffusion.gaussian import GaussianDiffusion
    from terdit.models import TerDiT, get_config

    model = TerDiT(get_config("TerDiT-Micro", input_size=8)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion.create()
    gen = torch.Generator(device=device).manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x[..., :8, :8] if x.shape[-1] > 8 else x  # the Micro model sees 8x8 latents
        t = torch.randint(0, 1000, (x.shape[0],), device=device, generator=gen)
        noise = torch.randn(x.shape, device=device, generator=gen)
        loss = diffusion.training_losses(lambda a, b: model(a, b, y, return_dict=False)[0], x, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--vae", help="hub id or local dir (default: a random tiny VAE with factor 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-train-step", action="store_true", help="time data only, no TerDiT-Micro step")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("TERDIT_CACHE", str(tmp / "cache"))
        make_jpegs(tmp / "images", args.images, args.classes, args.resolution)
        vae = args.vae or str(save_tiny_vae(tmp / "vae", (32, 32, 64, 64)))
        t0 = time.perf_counter()
        extract_latents(tmp / "images", tmp / "latents", vae=vae, resolution=args.resolution, flip=True,
                        batch_size=args.batch_size, shard_size=128, num_workers=args.num_workers,
                        device=args.device, progress=False)
        extract_s = time.perf_counter() - t0
        common = dict(resolution=args.resolution, seed=0, vae_sample=False, num_workers=args.num_workers)
        img = open_image_data(str(tmp / "images"), vae=vae, **common)
        lat = open_image_data(str(tmp / "latents"), vae=vae, **common)
        step = None if args.no_train_step else make_train_step(device)
        rate_img = timed_epoch(img, args.batch_size, args.batches, args.num_workers, device, step)
        rate_lat = timed_epoch(lat, args.batch_size, args.batches, args.num_workers, device, step)
    what = "fetch + train step" if step else "fetch only"
    print(f"device {device}, {args.images} images {args.resolution}px, batch {args.batch_size}, "
          f"workers {args.num_workers}, torch threads {torch.get_num_threads()}, {what}")
    print(f"extract-latents (with --flip, 2 encodes per image): {args.images / extract_s:9.1f} images/s")
    print(f"on-the-fly (decode, crop, VAE encode):              {rate_img:9.1f} images/s")
    print(f"stored latents (memory-mapped):                     {rate_lat:9.1f} images/s")
    print(f"stored latents are {rate_lat / rate_img:.1f}x faster")


if __name__ == "__main__":
    main()
