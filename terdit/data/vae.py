"""The image autoencoder between pixels and the diffusion model's latent space (diffusers AutoencoderKL).

Model space is ``(z - shift) * scale`` with ``scale`` from the VAE config's ``scaling_factor`` (0.18215
for the SD VAEs TerDiT/DiT use) and ``shift`` from ``shift_factor`` when the config has one (0 otherwise).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from terdit.errors import TerditError

DEFAULT_SCALE = 0.18215
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_MODES = ("mean", "sample")


class VAE:
    """An AutoencoderKL plus the latent scaling; encode/decode work in model space under no_grad."""

    def __init__(self, model: torch.nn.Module, spec: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        cfg = model.config
        self.scale = float(getattr(cfg, "scaling_factor", None) or DEFAULT_SCALE)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> VAE:
        self.model.to(device)
        return self

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise TerditError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor "
                              f"{self.downsample}")
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation of images x in [-1, 1], in model space, float32."""
        dist = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return (dist.mean.float() - self.shift) * self.scale, dist.std.float() * self.scale

    @torch.no_grad()
    def encode(self, x: Tensor, mode: str = "mean", generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> model-space latents: posterior mean, or a sample drawn with `generator`."""
        if mode not in VAE_MODES:
            raise TerditError(f"VAE mode must be one of {VAE_MODES}, got {mode!r}")
        mean, std = self.moments(x)
        if mode == "mean":
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Model-space latents -> images clamped to [-1, 1], float32."""
        z = (z.to(self.device, torch.float32) / self.scale + self.shift).to(self.dtype)
        return self.model.decode(z).sample.float().clamp_(-1, 1)


def resolve_vae_spec(spec: str) -> str:
    """'ema'/'mse' shorthands (DiT's --vae choices) -> hub ids; anything else unchanged."""
    return VAE_ALIASES.get(spec, spec)


def load_vae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """A VAE from a local directory (diffusers format, or a pipeline folder with a ``vae/`` subfolder) or
    a Hugging Face hub id (downloaded once, then read from the HF cache; offline needs a cached copy)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - diffusers is a dependency
        raise TerditError(f"loading a VAE needs diffusers ({e})") from e
    from terdit.models.kinds import is_hub_id

    repo = resolve_vae_spec(spec)
    local = Path(repo).expanduser()
    # low_cpu_mem_usage needs accelerate; saying so up front avoids diffusers' warning when it is absent
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    kwargs: dict = {"torch_dtype": dtype, "low_cpu_mem_usage": has_accelerate}
    if local.exists():
        if not local.is_dir():
            raise TerditError(f"--vae {spec}: expected a diffusers model directory, got a file")
        if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"
        elif not (local / "config.json").is_file():
            raise TerditError(f"--vae {spec}: {local} has no config.json "
                              "(not a diffusers AutoencoderKL directory)")
        source = repo = str(local.resolve())  # recorded in manifests: valid from any working directory
    elif not is_hub_id(repo, owner=True):
        raise TerditError(f"--vae {spec}: no such directory, and not a hub id like stabilityai/sd-vae-ft-ema")
    else:
        source = repo
    try:
        model = AutoencoderKL.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("" if local.exists() else
                " (a hub id needs network access once, or a copy in the Hugging Face cache when offline;"
                " a local diffusers directory also works)")
        raise TerditError(f"--vae {spec}: cannot load the VAE: {first}{hint}") from e
    return VAE(model.to(device), spec=repo)
