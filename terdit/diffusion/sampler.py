"""The one reverse-process loop (DDPM / DDIM, guided or not), run by one of two backends.

Everything that samples (`terdit sample`, `sample-npz`, the pipeline's own sampler, reproduce, training's
sample grids, distillation) ends here, through `GaussianDiffusion.sample`. The loop is given a step function
(`GaussianDiffusion.reverse_step`: x_t -> x_{t-1} for a sampling index held in a device tensor) and a noise
source that draws the next step's noise, in loop order; the backends differ only in how they drive it:

- "eager": draws each step's noise when the step runs and calls the step function (any device);
- "cuda-graph": draws all per-step noise up front (same draws, same order; into pinned host memory), captures
  one step in a CUDA graph and replays it for every step but the last. Each step is then one graph launch
  instead of thousands of small kernel launches, and nothing in the loop waits for the GPU. Same samples as
  eager: the captured kernels are eager's.
- "auto": cuda-graph on CUDA, eager elsewhere. If capture fails under "auto" (a model that synchronises the
  host, or moves weights during its forward), the loop warns and runs eagerly from the same noise.

This module imports nothing from terdit but errors: the step function and the noise come from the caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from terdit.errors import TerditError

BACKENDS: tuple[str, ...] = ("auto", "eager", "cuda-graph")
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""(x, idx, noise, last) -> x at the previous index; idx is a [1] long device tensor holding the sampling index."""
Draw = Callable[[], torch.Tensor]
"""The next step's noise, float32 of x's shape, on any device; called once per step, in loop order."""
OnStep = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]
"""(loop position k, sampling index i, x after the step) -> replacement latents, or None to keep x."""
Progress = bool | Callable[[Sequence[int]], Iterable[int]]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"eager" or "cuda-graph" for `backend` on `device`; a bad name, or cuda-graph off CUDA, is a TerditError."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise TerditError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if backend == "cuda-graph" and device.type != "cuda":
        raise TerditError(f"backend='cuda-graph' needs a CUDA device, got {device}")
    return backend


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise TerditError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")


def predraw(draw: Draw, steps: int, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """`steps` draws stacked as [steps, *shape] in `dtype` (cast as eager casts each draw); row k is loop step k.

    Kept where the draws are made (host draws go to pinned memory when `pin`, for asynchronous copies)."""
    first = draw()
    on_host = first.device.type == "cpu"
    zs = torch.empty((steps, *first.shape), dtype=dtype, device=first.device, pin_memory=pin and on_host)
    zs[0] = first.to(dtype)
    for k in range(1, steps):
        zs[k] = draw().to(dtype)
    return zs


def predraw_noise(
    shape: tuple[int, ...], steps: int, seed: int, dtype: torch.dtype, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, per-step noise [steps, *shape]) from one CPU generator seeded with `seed`, in the order
    `terdit.sampling.generate.sample_latents` draws them (initial first, then one per step)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    return x0, predraw(lambda: torch.randn(shape, generator=gen, dtype=torch.float32), steps, dtype, pin)


def _indices(steps: int, progress: Progress, desc: str) -> Iterable[int]:
    order = range(steps - 1, -1, -1)
    if callable(progress):
        return progress(order)
    return tqdm(order, desc=desc, disable=not progress, leave=False)


def _apply(on_step: OnStep | None, k: int, i: int, x: torch.Tensor) -> torch.Tensor:
    if on_step is None:
        return x
    out = on_step(k, i, x)
    return x if out is None else out


@torch.no_grad()
def run_loop(
    step: Step,
    x: torch.Tensor,
    steps: int,
    draw: Draw,
    *,
    backend: str = "auto",
    progress: Progress = False,
    on_step: OnStep | None = None,
    warmup: int = 1,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run `steps` reverse steps from `x` (sampling index steps - 1 down to 0) with the chosen backend.

    `progress`: True for a tqdm bar, or a wrapper of the index sequence (a pipeline's progress_bar).
    `warmup` (cuda-graph): eager steps run before capture, results discarded; they compile/autotune kernels
    and size scratch buffers, which must not happen during capture."""
    resolved = resolve_backend(backend, x.device)
    if resolved == "eager":
        return _eager(step, x, _indices(steps, progress, desc), draw, on_step)
    zs = predraw(draw, steps, x.dtype, pin=x.device.type == "cuda")
    static_x, static_z = x.clone(), torch.empty_like(x)
    idx = torch.full((1,), steps - 1, dtype=torch.long, device=x.device)
    try:
        graph = _capture(step, static_x, static_z, idx, zs[0], warmup) if steps > 1 else None
    except RuntimeError as e:
        if backend != "auto":
            raise TerditError(f"backend='cuda-graph': capturing a sampling step failed ({e}); "
                              "use backend='eager'") from e
        warnings.warn(f"CUDA-graph capture failed ({str(e).splitlines()[0]}); sampling eagerly", stacklevel=2)
        rows = iter(zs)
        return _eager(step, x, _indices(steps, progress, desc), lambda: next(rows), on_step)
    return _replay(step, graph, static_x, static_z, idx, zs, _indices(steps, progress, desc), on_step)


def _eager(step: Step, x: torch.Tensor, order: Iterable[int], draw: Draw, on_step: OnStep | None) -> torch.Tensor:
    idx = torch.empty(1, dtype=torch.long, device=x.device)
    for k, i in enumerate(order):
        z = draw().to(x.device, x.dtype)
        idx.fill_(i)
        x = _apply(on_step, k, i, step(x, idx, z, i == 0))
    return x


def _replay(step: Step, graph: torch.cuda.CUDAGraph | None, static_x: torch.Tensor, static_z: torch.Tensor,
            idx: torch.Tensor, zs: torch.Tensor, order: Iterable[int], on_step: OnStep | None) -> torch.Tensor:
    """The graph replayed for indices steps-1 .. 1; index 0 (no noise) runs once, eagerly."""
    for k, i in enumerate(order):
        idx.fill_(i)  # a device fill: no host sync
        if i == 0:
            static_x = step(static_x, idx, static_z, True)
        else:
            static_z.copy_(zs[k], non_blocking=True)  # pinned host -> device, async
            graph.replay()
        if on_step is not None:
            out = on_step(k, i, static_x.clone())  # a copy: the static buffer is overwritten by the next replay
            if out is not None:
                static_x.copy_(out)
    return static_x


def _capture(step: Step, static_x: torch.Tensor, static_z: torch.Tensor, idx: torch.Tensor, z0: torch.Tensor,
             warmup: int) -> torch.cuda.CUDAGraph:
    """The graph of static_x <- step(static_x, idx, static_z), after `warmup` eager steps on a side stream."""
    device = static_x.device
    static_z.copy_(z0)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs requires
        for _ in range(max(1, warmup)):
            step(static_x, idx, static_z, False)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (a training DataLoader's pin-memory thread) may keep using CUDA meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_x.copy_(step(static_x, idx, static_z, False))
    return graph


__all__ = ["BACKENDS", "SAMPLERS", "check_sampler", "predraw", "predraw_noise", "resolve_backend", "run_loop"]
