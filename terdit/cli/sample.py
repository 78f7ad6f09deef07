"""`terdit sample` (a PNG grid or an ADM npz from a run) and `terdit sample-npz` (DiT's FID protocol, whose
settings are `MassSampleArgs` in terdit.sampling.npz)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from terdit.cli.args import add_command, settings_from
from terdit.defaults import nonneg_float, overwrite_setting, positive_int, setting
from terdit.deploy.packed_linear import POLICIES
from terdit.errors import TerditError
from terdit.sampling.generate import SamplingSettings
from terdit.sampling.npz import MassSampleArgs


@dataclass(kw_only=True)
class SampleArgs(SamplingSettings):
    """Everything `terdit sample` takes."""

    classes: list[int] | None = setting(None, "class ids (default: 0..min(K,10)-1)", type=int, nargs="+")
    num_per_class: int = setting(1, type=positive_int)
    cfg: float = setting(4.0, "classifier-free guidance scale (1 = none)", type=nonneg_float)
    out: str | None = setting(None, ".png grid or .npz (default: RUN/sample.png)")
    overwrite: bool = overwrite_setting("sample file")
    vae: str | None = setting(None, "VAE to decode latents (default: the one the run trained with)")
    policy: str = setting("memory", "packed models: unpack per call (memory: smallest, exact), cache unpacked weights "
                          "(speed), or CPU integer compute with 8-bit activations, codes resident (int8; adaLN's stay "
                          "packed) or packed (int8-packed): the fastest on CPUs with VNNI / AMX (600M: 1.4-1.7x FP "
                          "bf16), the exact float path elsewhere",
                          choices=POLICIES)


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "sample", "draw samples from a run to a PNG grid or an ADM npz", SampleArgs, cmd_sample)

    add_command(sub, "sample-npz", "draw many samples into one ADM npz for FID (DiT's protocol; resumable, "
                "torchrun-parallel)", MassSampleArgs, cmd_sample_npz)


def cmd_sample(args: argparse.Namespace) -> int:
    sample(settings_from(SampleArgs, args))
    return 0


def sample(a: SampleArgs) -> Path:
    """Draw the samples `a` asks for and write them to a.out (default RUN/sample.png)."""
    import torch

    from terdit.io import check_output
    from terdit.loading.serving import load_for_sampling
    from terdit.models.memory import check_batch_fits
    from terdit.sampling.generate import check_sampling_args, generate, save_samples

    out = Path(a.out) if a.out else Path(a.run) / "sample.png"
    if out.suffix.lower() not in (".png", ".npz"):
        raise TerditError(f"--out {out}: must end in .png (grid) or .npz (ADM arrays)")
    # before sampling: a refused or unwritable --out must not cost the whole run first
    check_output(out, own=lambda p: p.is_file() and p.suffix.lower() == out.suffix.lower(),
                 kind=f"{out.suffix.lower()} file", overwrite=a.overwrite, folder=False)
    model, decode, map_labels = load_for_sampling(a.run, ema=a.ema, device=a.device, dtype=a.dtype, vae=a.vae,
                                                  policy=a.policy)
    classes = a.classes if a.classes is not None else list(range(min(model.config.num_classes, 10)))
    check_sampling_args(model.config.num_classes, classes, a.cfg, a.steps, a.cfg_channels, model.config.in_channels)
    check_batch_fits(model.config, 2 * len(classes) * a.num_per_class, next(model.parameters()).device,
                     f"--num-per-class {a.num_per_class}")
    labels = [c for c in classes for _ in range(a.num_per_class)]
    dtype = next(model.parameters()).dtype
    images = generate(model, map_labels(labels), decode=decode, cfg_scale=a.cfg, steps=a.steps, sampler=a.sampler,
                      eta=a.eta, seed=a.seed, guide_channels=a.cfg_channels,
                      dtype=dtype if dtype != torch.float32 else None, progress=True, backend=a.backend)
    save_samples(images, labels, out, nrow=a.num_per_class if a.num_per_class > 1 else None)
    print(f"wrote {len(labels)} samples to {out}")
    return out


def cmd_sample_npz(args: argparse.Namespace) -> int:
    from terdit.sampling.npz import sample_npz

    path = sample_npz(settings_from(MassSampleArgs, args))
    if path is not None:
        print(f"wrote {args.num_samples} samples to {path}")
    return 0
