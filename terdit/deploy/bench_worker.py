"""Benchmark measurements, each in a fresh process; prints one JSON line.

    python -m terdit.deploy.bench_worker memory --dir D --policy P   peak memory of one variant
    python -m terdit.deploy.bench_worker times --dir D1 --policy P1 --dir D2 --policy P2 ...

Memory: a fresh process per variant keeps resident-memory numbers independent; the resident size of the
runtime (torch, diffusers, terdit imported, nothing loaded) is read first; the peak of the sampling steps is
measured after loading, on CPU by resetting the kernel's high-water mark (/proc/self/clear_refs)
and reading VmHWM, on CUDA with torch.cuda.max_memory_allocated. Time: all variants in one process,
interleaved (see `measure_times`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP_ROUNDS = 2
COMPILED = "+compiled"  # policy suffix: the loaded model runs through torch.compile as `compile_like_int8_` does


def compile_like_int8_(model: nn.Module) -> int:
    """torch.compile, in place, the units the int8 policy compiles around its layers (`compile_int8_`, through
    `compile_units`; TerDiT: each transformer block), here around the linears a ternary model quantizes
    (`paper_filter`): a full-precision baseline whose element-wise work (norms, modulation, RoPE, SwiGLU, gates)
    is fused the same way. Returns how many."""
    from terdit.models.compiling import compile_units
    from terdit.quant.module_swap import paper_filter

    linears = {id(m) for fqn, m in model.named_modules() if paper_filter(m, fqn)}
    units = compile_units(model, lambda m: id(m) in linears)
    for m in units:
        m.compile(dynamic=False)
    return len(units)


def _setup(directory: str, policy: str, dev: torch.device, dt: torch.dtype, batch: int, cfg: float, seed: int):
    """Load a deploy directory and return (model, one-sampling-step callable, load seconds).
    `policy` may end in "+compiled" (see `compile_like_int8_`)."""
    from terdit.deploy.loader import load_deployed
    from terdit.diffusion.guidance import guided_model_fn

    compiled = policy.endswith(COMPILED)
    policy = policy.removesuffix(COMPILED)
    t0 = time.perf_counter()
    model = load_deployed(directory, device=dev, dtype=dt, policy=policy)
    if compiled and not compile_like_int8_(model):
        raise ValueError(f"policy {policy}{COMPILED}: {directory} has no nn.Linear layers to compile around")
    _sync(dev)
    load_s = time.perf_counter() - t0
    c = model.config
    gen = torch.Generator().manual_seed(seed)  # the same inputs for every variant
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=gen).to(dev, dt)
    labels = torch.randint(0, c.num_classes, (batch,), generator=gen).to(dev)
    t = torch.full((batch,), 500, device=dev)
    fn = guided_model_fn(model, labels, cfg, null_class=c.num_classes)
    return model, (lambda: fn(x, t)), load_s


def _timed(step, dev: torch.device) -> float:
    _sync(dev)
    s = time.perf_counter()
    with torch.inference_mode():
        step()
    _sync(dev)
    return time.perf_counter() - s


def measure_memory(directory: str, policy: str, device: str, dtype: str, batch: int, cfg: float, seed: int) -> dict:
    """Peak memory of sampling steps (a warm-up and one more) in this fresh process, after loading."""
    import terdit.deploy.loader  # noqa: F401 - the runtime every variant pays before its first weight:
    import terdit.models  # noqa: F401 - torch, diffusers (the models' base class) and terdit
    from terdit.defaults import parse_dtype

    rss_runtime = _status_kb("VmRSS")
    dev = torch.device(device)
    _, step, load_s = _setup(directory, policy, dev, parse_dtype(dtype), batch, cfg, seed)
    rss_loaded = _status_kb("VmRSS")
    load_peak = _status_kb("VmHWM")  # includes loading; not ru_maxrss, which keeps the parent's peak over exec
    peak_reset = _reset_peak_rss() if dev.type == "cpu" else False
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = [_timed(step, dev)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    times.append(_timed(step, dev))
    after = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "load_s": load_s,
        "unpaired_step_s": times[-1],
        # the second step's page faults and kernel CPU time: what handing freed memory back to the OS costs (each
        # page of a fresh buffer faults in again), a cost whose seconds do not depend on how fast the matmuls are
        "step_minor_faults": after.ru_minflt - before.ru_minflt,
        "step_sys_s": after.ru_stime - before.ru_stime,
        "rss_runtime_mb": rss_runtime / 1024 if rss_runtime else None,
        "rss_after_load_mb": rss_loaded / 1024 if rss_loaded else None,
        "load_peak_rss_mb": load_peak / 1024 if load_peak else None,
    }
    if dev.type == "cuda":
        out["peak_step_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_kind"] = "CUDA max_memory_allocated during the steps"
    else:
        hwm = _status_kb("VmHWM")
        out["peak_step_mb"] = (hwm or 0) / 1024
        out["peak_kind"] = "RSS high-water mark during the steps" if peak_reset else "process peak RSS (incl. loading)"
    return out


def measure_times(
    specs: list[tuple[str, str]],
    device: str,
    dtype: str | list[str],
    batch: int,
    repeats: int,
    cfg: float,
    seed: int,
) -> dict:
    """Step times of several variants loaded side by side, interleaved round by round.

    Interleaving makes the comparison fair on a shared machine: a burst of background load hits every
    variant of a round alike. The order rotates from round to round so that no variant always runs right
    after the same neighbour. The first two rounds are a warm-up (compiled blocks compile on the first call).
    Ratios are medians of per-round ratios to variant 0.
    `dtype`: one for all variants or one per variant (e.g. full precision in fp32 and in bf16 side by side).
    """
    from terdit.defaults import parse_dtype

    dev = torch.device(device)
    dtypes = [dtype] * len(specs) if isinstance(dtype, str) else dtype
    steps = [_setup(d, p, dev, parse_dtype(dt), batch, cfg, seed)[1] for (d, p), dt in zip(specs, dtypes)]
    load_before = os.getloadavg()[0]
    times: list[list[float]] = [[] for _ in specs]
    for r in range(repeats + WARMUP_ROUNDS):
        for k in range(len(steps)):
            i = (k + r) % len(steps)
            dt = _timed(steps[i], dev)
            if r >= WARMUP_ROUNDS:
                times[i].append(dt)
    ratios = [[t / t0 for t, t0 in zip(ts, times[0])] for ts in times]
    return {
        "step_s": times,
        "median_step_s": [statistics.median(ts) for ts in times],
        "median_ratio_to_first": [statistics.median(rs) for rs in ratios],
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["memory", "times"])
    p.add_argument("--dir", action="append", required=True, help="deploy directory (repeat for 'times')")
    p.add_argument("--policy", action="append", required=True,
                   help=f"policy per --dir; with '{COMPILED}' appended, torch.compile as the int8 policy does")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", action="append", default=None, help="compute dtype: once, or once per --dir")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    dtypes = a.dtype or ["fp32"]
    if len(dtypes) not in (1, len(a.dir)):
        p.error("give --dtype once or once per --dir")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "memory":
        out = measure_memory(a.dir[0], a.policy[0], a.device, dtypes[0], a.batch, a.cfg, a.seed)
    else:
        dt = dtypes[0] if len(dtypes) == 1 else dtypes
        out = measure_times(list(zip(a.dir, a.policy)), a.device, dt, a.batch, a.repeats, a.cfg, a.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
