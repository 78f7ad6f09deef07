"""Diffusion process (DDPM with learned variance), samplers and classifier-free guidance."""

from terdit.diffusion.gaussian import GaussianDiffusion, linear_betas, spaced_timesteps
from terdit.diffusion.guidance import guided_model_fn

__all__ = ["GaussianDiffusion", "guided_model_fn", "linear_betas", "spaced_timesteps"]
