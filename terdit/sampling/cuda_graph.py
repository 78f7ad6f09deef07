"""Fast sampling on CUDA: one guided model step captured in a CUDA graph, replayed for every step.

`sample_latents_fast` gives the same samples as `terdit.sampling.generate.sample_latents` for the same arguments
and seed. What makes it fast on a GPU:

- the guided step (cond + uncond batched in one forward, the guidance mix and the DDPM/DDIM update) is
  captured once in a CUDA graph, so each of the 250 steps is one graph launch instead of thousands of
  small kernel launches (most of the step time of a small-batch DiT);
- all per-step noise is drawn up front from the same CPU generator, in the reference's order, into
  pinned host memory, and copied with non_blocking=True; the schedule coefficients and timestep map
  live on the device and are indexed by a device step counter. Nothing inside the loop waits for the
  GPU (the reference's per-step `torch.from_numpy(...).to(device)` and pageable noise copies each
  synchronise the host).

The step arithmetic mirrors `GaussianDiffusion.ddpm_step` / `ddim_step` operation for operation (same
dtypes, same order), which is what makes the outputs equal; `tests/test_kernels.py` checks that equality
bitwise in eager mode. On CPU (or with mode="eager") the same step function runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.errors import TerditError
from terdit.sampling.generate import check_sampling_args

MODES: tuple[str, ...] = ("auto", "graph", "eager")


class _Stepper:
    """The reverse step with schedule tables on the device, indexed by a device tensor `idx` (shape [1])."""

    def __init__(self, diffusion: GaussianDiffusion, fn: Callable, sampler: str, eta: float, n: int, device):
        def table(arr: np.ndarray) -> torch.Tensor:
            # as `_take`: float64 numpy -> float32, the same rounding the reference does per step
            return torch.from_numpy(np.asarray(arr, dtype=np.float64)).float().to(device)

        d = diffusion
        self.diffusion, self.fn, self.sampler, self.eta, self.n = d, fn, sampler, eta, n
        self.sqrt_recip = table(d.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1 = table(d.sqrt_recipm1_alphas_cumprod)
        self.coef1 = table(d.posterior_mean_coef1)
        self.coef2 = table(d.posterior_mean_coef2)
        self.log_var_min = table(d.posterior_log_variance_clipped)
        self.log_var_max = table(np.log(d.betas))
        if not d.learn_sigma:  # (the reference needs >= 2 steps for this table too)
            self.log_var_fixed = table(np.log(np.append(d.posterior_variance[1], d.betas[1:])))
        self.acp = table(d.alphas_cumprod)
        self.acp_prev = table(d.alphas_cumprod_prev)
        self.timestep_map = torch.from_numpy(np.asarray(d.timestep_map)).long().to(device)

    def take(self, tab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """tab[i] as [n, 1, 1, 1] float32: the shape and dtype `_take` gives (same broadcasting, same math)."""
        return tab.index_select(0, idx.expand(self.n)).view(-1, 1, 1, 1)

    def step(self, x: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor, last: bool) -> torch.Tensor:
        """x_t -> x_{t-1} for sampling index idx; `last` (index 0) adds no noise, as the reference."""
        t_model = self.timestep_map.index_select(0, idx.expand(self.n))
        out = self.fn(x, t_model)
        eps, v = self.diffusion.split_output(out, x.shape[1])
        take = self.take
        if self.sampler == "ddpm":
            if v is None:
                log_var = take(self.log_var_fixed, idx)
            else:
                min_log, max_log = take(self.log_var_min, idx), take(self.log_var_max, idx)
                frac = (v.float() + 1) / 2
                log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = take(self.sqrt_recip, idx) * x - take(self.sqrt_recipm1, idx) * eps.float()
        if self.sampler == "ddpm":
            mean = take(self.coef1, idx) * pred_x0 + take(self.coef2, idx) * x
            if last:
                return mean.to(x.dtype)
            return (mean + torch.exp(0.5 * log_var) * noise).to(x.dtype)
        eps = (take(self.sqrt_recip, idx) * x - pred_x0) / take(self.sqrt_recipm1, idx)
        ab, ab_prev = take(self.acp, idx), take(self.acp_prev, idx)
        sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        if last:
            return mean.to(x.dtype)
        return (mean + sigma * noise).to(x.dtype)


def predraw_noise(
    shape: tuple[int, ...], steps: int, seed: int, dtype: torch.dtype, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, per-step noise [steps, *shape]) drawn from one CPU generator in the reference order.

    Row k of the per-step noise is used at loop iteration k (sampling index steps - 1 - k). Both are cast
    to `dtype` on the host (the same round-to-nearest the reference's `.to(device, dtype)` does).
    """
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    zs = torch.empty((steps, *shape), dtype=dtype, pin_memory=pin)
    for k in range(steps):
        zs[k] = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return x0, zs


@torch.no_grad()
def sample_latents_fast(
    model: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    cfg_scale: float = 4.0,
    steps: int = 250,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    guide_channels: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    mode: str = "auto",
    warmup: int = 1,
) -> torch.Tensor:
    """`terdit.sampling.generate.sample_latents` with a CUDA-graph loop: same arguments, same samples (N, C, H, W) fp32.

    mode: "graph" (CUDA only), "eager" (any device; the same step function without capture) or "auto"
    (graph on CUDA, eager elsewhere). `warmup` eager steps run before capture (their results are
    discarded): they compile/autotune the Triton kernels and size the unpack scratch, which must not
    happen during capture.
    """
    if mode not in MODES:
        raise TerditError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sampler not in ("ddpm", "ddim"):
        raise TerditError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    cfg = model.config
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    check_sampling_args(cfg.num_classes, labels_t.tolist(), cfg_scale, steps)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if mode == "auto":
        mode = "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise TerditError(f"mode='graph' needs a CUDA device, got {device}")
    dtype = dtype or torch.float32
    shape = (len(labels_t), cfg.in_channels, cfg.input_size, cfg.input_size)
    x0, zs = predraw_noise(shape, steps, seed, dtype, pin=device.type == "cuda")
    diffusion = GaussianDiffusion.create(steps, learn_sigma=cfg.learn_sigma)
    fn = guided_model_fn(model, labels_t.to(device), cfg_scale, cfg.num_classes, guide_channels)
    stepper = _Stepper(diffusion, fn, sampler, eta, len(labels_t), device)
    was_training = model.training
    model.eval()
    try:
        if mode == "eager":
            x = _loop_eager(stepper, x0.to(device), zs, steps, device)
        else:
            x = _loop_graph(stepper, x0.to(device), zs, steps, device, warmup)
    finally:
        model.train(was_training)
    return x.float()


def _loop_eager(stepper: _Stepper, x: torch.Tensor, zs: torch.Tensor, steps: int, device) -> torch.Tensor:
    idx = torch.empty(1, dtype=torch.long, device=device)
    for k, i in enumerate(range(steps - 1, -1, -1)):
        idx.fill_(i)
        x = stepper.step(x, idx, zs[k].to(device, non_blocking=True), last=i == 0)
    return x


def _loop_graph(stepper: _Stepper, x: torch.Tensor, zs: torch.Tensor, steps: int, device, warmup: int) -> torch.Tensor:
    static_x = x.clone()
    static_z = torch.empty_like(static_x)
    idx = torch.full((1,), steps - 1, dtype=torch.long, device=device)
    if steps > 1:
        static_z.copy_(zs[0])
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs requires
            for _ in range(max(1, warmup)):
                stepper.step(static_x, idx, static_z, last=False)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_x.copy_(stepper.step(static_x, idx, static_z, last=False))
        for k, i in enumerate(range(steps - 1, 0, -1)):
            idx.fill_(i)  # a device fill: no host sync
            static_z.copy_(zs[k], non_blocking=True)  # pinned host -> device, async
            graph.replay()
        del graph
    idx.fill_(0)
    return stepper.step(static_x, idx, static_z, last=True)  # index 0: no noise; run once, eagerly


__all__ = ["MODES", "predraw_noise", "sample_latents_fast"]
