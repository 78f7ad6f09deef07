"""Gaussian diffusion as DiT trains and samples it.

Linear beta schedule (1e-4 .. 0.02 over 1000 steps), epsilon prediction with a learned-range
variance, loss = MSE(eps) + the variational bound with the mean detached, timestep respacing,
ancestral DDPM and DDIM steps (`ReverseStep`, the one step function every sampling loop runs; the loop and
its backends are in terdit.diffusion.sampler). Schedules are float64 (numpy), cast to float32 where used, as
DiT does (the sampler casts each table once, to the same values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from terdit.diffusion.sampler import Draw, OnStep, Progress, check_sampler, run_loop

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def spaced_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """`num_steps` evenly spaced timesteps of [0, T-1], both ends included (DiT's "250" respacing)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {num_steps}")
    if num_steps == 1:
        return [num_train_steps - 1]
    stride = (num_train_steps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


def _take(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a float tensor broadcastable against `like`."""
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.view(-1, *([1] * (like.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log-likelihood of data in [-1, 1] quantised to 256 bins (the decoder term at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


class GaussianDiffusion:
    """A (possibly respaced) diffusion process. `timestep_map[i]` is the training-time step that
    sampling step i corresponds to; the network always sees training-time steps."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(len(betas)))
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod, self.alphas_cumprod_prev = acp, acp_prev
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # the posterior variance is 0 at t = 0: clip the log to the next value
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp)

    @classmethod
    def create(cls, steps: int | None = None, num_train_steps: int = 1000, learn_sigma: bool = True):
        """The training process (steps=None) or one respaced to `steps` sampling steps."""
        betas = linear_betas(num_train_steps)
        if steps is None or steps == num_train_steps:
            return cls(betas, learn_sigma)
        keep = spaced_timesteps(num_train_steps, steps)
        acp = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for t in keep:
            new_betas.append(1 - acp[t] / last)
            last = acp[t]
        return cls(np.array(new_betas), learn_sigma, timestep_map=keep)

    # -- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _take(self.sqrt_alphas_cumprod, t, x0) * x0 + _take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = _take(self.posterior_mean_coef1, t, xt) * x0 + _take(self.posterior_mean_coef2, t, xt) * xt
        return mean, _take(self.posterior_variance, t, xt), _take(self.posterior_log_variance_clipped, t, xt)

    # -- the model's reverse step -----------------------------------------------------------------
    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.learn_sigma:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"model output has {out.shape[1]} channels, expected {2 * channels}")
            return out[:, :channels], out[:, channels:]
        return out, None

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """Mean and variance of p(x_{t-1} | x_t) from the network output (eps, v)."""
        eps, v = self.split_output(out, xt.shape[1])
        if v is None:  # fixed large variance, as improved-DDPM's FIXED_LARGE
            var_arr = np.append(self.posterior_variance[1], self.betas[1:]) if len(self.betas) > 1 else self.betas
            log_var = _take(np.log(var_arr), t, xt)
        else:
            min_log = _take(self.posterior_log_variance_clipped, t, xt)
            max_log = _take(np.log(self.betas), t, xt)
            frac = (v.float() + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = _take(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _take(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        ) * eps.float()
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0, "eps": eps}

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    # -- training -----------------------------------------------------------------------------------
    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss = MSE(eps) + VB (variance channels only; the eps is detached in the VB)."""
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t))
        eps, v = self.split_output(out, x0.shape[1])
        mse = mean_flat((noise - eps.float()) ** 2)
        terms = {"mse": mse}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_bits(frozen, x0, xt, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def vb_bits(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits; the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- samplers -------------------------------------------------------------------------------------
    def reverse_step(self, model_fn: ModelFn, batch: int, device: torch.device | str, sampler: str = "ddpm",
                     eta: float = 0.0) -> ReverseStep:
        """The step function every sampling loop runs (see `ReverseStep`)."""
        return ReverseStep(self, model_fn, batch, torch.device(device), sampler, eta)

    def ddpm_step(self, model_fn: ModelFn, x: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step from sampling index i (x_t -> x_{t-1})."""
        return self._one_step(model_fn, x, i, noise, "ddpm", 0.0)

    def ddim_step(self, model_fn: ModelFn, x: torch.Tensor, i: int, noise: torch.Tensor, eta: float = 0.0):
        """One DDIM step from sampling index i (noise used only when eta > 0)."""
        return self._one_step(model_fn, x, i, noise, "ddim", eta)

    def _one_step(self, model_fn: ModelFn, x: torch.Tensor, i: int, noise: torch.Tensor, sampler: str,
                  eta: float) -> torch.Tensor:
        idx = torch.full((1,), i, dtype=torch.long, device=x.device)
        return self.reverse_step(model_fn, x.shape[0], x.device, sampler, eta)(x, idx, noise, i == 0)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        sampler: str = "ddpm",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: Progress = False,
        *,
        backend: str = "auto",
        draw: Draw | None = None,
        on_step: OnStep | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from `noise` with terdit's one sampling loop (`terdit.diffusion.sampler`).

        Per-step noise: `draw()` if given (e.g. a pipeline's generators), else float32 draws from `generator`
        on CPU (None: the global RNG), one per step in loop order. `backend`: "auto" | "eager" | "cuda-graph"."""
        check_sampler(sampler)
        if draw is None:
            def draw() -> torch.Tensor:
                return torch.randn(noise.shape, generator=generator, dtype=torch.float32)
        step = self.reverse_step(model_fn, noise.shape[0], noise.device, sampler, eta)
        return run_loop(step, noise, self.num_timesteps, draw, backend=backend, progress=progress,
                        on_step=on_step, desc=f"{sampler} sampling")


class ReverseStep:
    """x_t -> x_{t-1} (DDPM or DDIM) with the schedule as float32 tables on the device, indexed by a device
    tensor `idx` (shape [1]): no host work per step, so a CUDA graph can capture it.

    The arithmetic is DiT's (float64 schedules cast to float32 per step, then the same operations in the same
    order as improved-DDPM's p_mean_variance / q_posterior / DDIM update), so every loop gives DiT's samples."""

    def __init__(self, diffusion: GaussianDiffusion, model_fn: ModelFn, batch: int, device: torch.device,
                 sampler: str = "ddpm", eta: float = 0.0) -> None:
        check_sampler(sampler)
        d = diffusion

        def table(arr: np.ndarray) -> torch.Tensor:  # float64 -> float32 once: the rounding `_take` does per step
            return torch.from_numpy(np.asarray(arr, dtype=np.float64)).float().to(device)

        self.diffusion, self.fn, self.sampler, self.eta, self.n = d, model_fn, sampler, eta, batch
        self.sqrt_recip = table(d.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1 = table(d.sqrt_recipm1_alphas_cumprod)
        self.coef1 = table(d.posterior_mean_coef1)
        self.coef2 = table(d.posterior_mean_coef2)
        self.log_var_min = table(d.posterior_log_variance_clipped)
        self.log_var_max = table(np.log(d.betas))
        # fixed large variance (improved-DDPM's FIXED_LARGE) for models without learned sigma
        self.log_var_fixed = table(np.log(np.append(d.posterior_variance[1], d.betas[1:]) if len(d.betas) > 1
                                          else d.betas))
        self.acp = table(d.alphas_cumprod)
        self.acp_prev = table(d.alphas_cumprod_prev)
        self.timestep_map = torch.from_numpy(np.asarray(d.timestep_map)).long().to(device)

    def take(self, tab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """tab[i] as [n, 1, 1, 1] float32: the shape and dtype `_take` gives (same broadcasting, same math)."""
        return tab.index_select(0, idx.expand(self.n)).view(-1, 1, 1, 1)

    def log_variance(self, v: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        if v is None:
            return self.take(self.log_var_fixed, idx)
        min_log, max_log = self.take(self.log_var_min, idx), self.take(self.log_var_max, idx)
        frac = (v.float() + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor, last: bool) -> torch.Tensor:
        """x_t -> x_{t-1} for sampling index idx; `last` (index 0) adds no noise."""
        out = self.fn(x, self.timestep_map.index_select(0, idx.expand(self.n)))
        eps, v = self.diffusion.split_output(out, x.shape[1])
        take = self.take
        pred_x0 = take(self.sqrt_recip, idx) * x - take(self.sqrt_recipm1, idx) * eps.float()
        if self.sampler == "ddpm":
            mean = take(self.coef1, idx) * pred_x0 + take(self.coef2, idx) * x
            if last:
                return mean.to(x.dtype)
            return (mean + torch.exp(0.5 * self.log_variance(v, idx)) * noise).to(x.dtype)
        eps = (take(self.sqrt_recip, idx) * x - pred_x0) / take(self.sqrt_recipm1, idx)
        ab, ab_prev = take(self.acp, idx), take(self.acp_prev, idx)
        sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        if last:
            return mean.to(x.dtype)
        return (mean + sigma * noise).to(x.dtype)
