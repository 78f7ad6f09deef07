"""Diffusion process (DDPM with learned variance), the one sampling loop with its backends, and classifier-free
guidance."""

from terdit.diffusion.gaussian import GaussianDiffusion, ReverseStep, linear_betas, spaced_timesteps
from terdit.diffusion.guidance import guided_model_fn
from terdit.diffusion.sampler import BACKENDS, resolve_backend, run_loop

__all__ = ["BACKENDS", "GaussianDiffusion", "ReverseStep", "guided_model_fn", "linear_betas", "resolve_backend",
           "run_loop", "spaced_timesteps"]
