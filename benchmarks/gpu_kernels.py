"""Ternary Triton kernels vs bf16 on a CUDA GPU: per-layer times, then whole 250-step sampling.

    python benchmarks/gpu_kernels.py                                  # 600M and 4.2B, batches 1 2 8 32
    python benchmarks/gpu_kernels.py --configs TerDiT-600M --e2e-batches 1 --json out.json
    python benchmarks/gpu_kernels.py --skip-e2e --formats 2bit base3

Per layer (triton.testing.do_bench, median ms), for each DiT shape: wq/wk/wv/wo dim->dim, w1/w3
dim->FFN, w2 FFN->dim on tokens = 256 x batch x 2 rows (guidance doubles the batch), and the adaLN
projection 1024->6*dim on batch x 2 rows. Each is timed as bf16 `F.linear`, as the Triton kernel on packed
codes, and as the unpack-then-matmul path (`PackedLinear`, memory policy, kernels off); for the adaLN
rows the skinny and tiled kernels are also timed on their own, to place SKINNY_MAX_M.

End to end: `sample_latents(backend="cuda-graph")` for `--steps` steps with guidance, random weights, three
models of the same architecture: ternary 2bit + Triton kernels, bf16 (fp linears, adaLN RMSNorm kept),
and ternary 2bit on the unpack path. Time is wall clock of the whole call (graph capture included, after
one warm-up call that compiles and autotunes); peak memory is torch.cuda.max_memory_allocated from
before the model is loaded to the end of sampling (pre-drawn noise lives in pinned host memory).

All ratios are measured in this one run, on this GPU. Targets (issue 7) are printed next to them.
Without CUDA this prints that and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TARGETS = {
    "adaln_speedup_batch_le_8": 3.0,  # bf16 time / ternary time, adaLN projection, batch <= 8
    "token_speedup_batch_1_2": 1.2,  # token projections, batch 1-2
    "token_speedup_batch_32": 0.9,  # token projections, batch 32
    "e2e_time_ratio_max": 0.9,  # ternary time / bf16 time
    "e2e_speedup_over_unpack": 1.5,  # unpack-path time / ternary time
    "e2e_peak_memory_ratio_max": 0.2,  # ternary peak / bf16 peak
}


def layer_shapes(config_name: str) -> list[tuple[str, int, int, str]]:
    """(name, in_features K, out_features N, row kind) of the distinct ternary linears of one block."""
    from terdit.models import get_config

    cfg = get_config(config_name)
    return [
        ("wq/wk/wv/wo", cfg.dim, cfg.dim, "tokens"),
        ("w1/w3", cfg.dim, cfg.ffn_hidden, "tokens"),
        ("w2", cfg.ffn_hidden, cfg.dim, "tokens"),
        ("adaLN", cfg.cond_dim, 6 * cfg.dim, "adaln"),
    ]


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


@torch.no_grad()
def bench_layers(config_name: str, batches: list[int], fmt: str, log=print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, k, n, kind in layer_shapes(config_name):
        rows += _bench_shape(config_name, name, k, n, kind, batches, fmt, log)
        torch.cuda.empty_cache()
    return rows


def _bench_shape(
    config_name: str, name: str, k: int, n: int, kind: str, batches: list[int], fmt: str, log
) -> list[dict[str, Any]]:
    from terdit.deploy import PackedLinear
    from terdit.deploy import triton_kernels as tk
    from terdit.quant.packing import pack_rows

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    packed = pack_rows(codes, fmt)[0].to(dev)
    alpha = torch.tensor([0.02], device=dev)
    bias = (torch.randn(n, device=dev) * 0.02).to(torch.bfloat16) if kind == "adaln" else None
    w_bf16 = (alpha * codes.to(dev).float()).to(torch.bfloat16)
    layer = PackedLinear(k, n, bias is not None, fmt, policy="memory", device=dev, dtype=torch.bfloat16)
    layer.packed.copy_(packed)
    layer.alphas.copy_(alpha)
    if bias is not None:
        layer.bias.copy_(bias)

    def ternary(x: torch.Tensor, path: str = "auto") -> torch.Tensor:
        return tk.ternary_linear(x, packed, alpha, bias, fmt, k, path)

    def unpack(x: torch.Tensor) -> torch.Tensor:
        os.environ["TERDIT_NO_KERNELS"] = "1"
        try:
            return layer(x)
        finally:
            del os.environ["TERDIT_NO_KERNELS"]

    rows = []
    for b in batches:
        m = 2 * b if kind == "adaln" else 256 * b * 2
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, w_bf16, bias).float()
        rel_err = ((ternary(x).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        t_bf16 = bench_ms(lambda x=x: F.linear(x, w_bf16, bias))
        t_tern = bench_ms(lambda x=x: ternary(x))
        t_unpack = bench_ms(lambda x=x: unpack(x))
        row = dict(config=config_name, layer=name, fmt=fmt, batch=b, rows=m, K=k, N=n, bf16_ms=t_bf16,
                   ternary_ms=t_tern, unpack_ms=t_unpack, speedup_vs_bf16=t_bf16 / t_tern,
                   speedup_vs_unpack=t_unpack / t_tern, max_rel_err=rel_err)  # fmt: skip
        if m <= 16:
            row["skinny_ms"] = bench_ms(lambda x=x: ternary(x, "skinny"))
            row["tiled_ms"] = bench_ms(lambda x=x: ternary(x, "tiled"))
        row["target"], row["pass"] = _layer_target(kind, b, row["speedup_vs_bf16"])
        rows.append(row)
        log(_format_layer(row))
    return rows


def _layer_target(kind: str, batch: int, speedup: float) -> tuple[float | None, bool | None]:
    if kind == "adaln":
        target = TARGETS["adaln_speedup_batch_le_8"] if batch <= 8 else None
    elif batch <= 2:
        target = TARGETS["token_speedup_batch_1_2"]
    elif batch >= 32:
        target = TARGETS["token_speedup_batch_32"]
    else:
        target = None
    return target, (None if target is None else speedup >= target)


def _format_layer(r: dict[str, Any]) -> str:
    extra = ""
    if "skinny_ms" in r:
        extra = f"  skinny {r['skinny_ms'] * 1e3:7.1f}us tiled {r['tiled_ms'] * 1e3:7.1f}us"
    target = "" if r["target"] is None else f"  target >= {r['target']:.1f}x: {'PASS' if r['pass'] else 'FAIL'}"
    return (
        f"{r['config']:12s} {r['layer']:12s} {r['fmt']:5s} b={r['batch']:<3d} M={r['rows']:<6d} "
        f"K={r['K']:<5d} N={r['N']:<6d} bf16 {r['bf16_ms'] * 1e3:8.1f}us  ternary {r['ternary_ms'] * 1e3:8.1f}us "
        f"unpack {r['unpack_ms'] * 1e3:8.1f}us  x{r['speedup_vs_bf16']:.2f} vs bf16  x{r['speedup_vs_unpack']:.2f} "
        f"vs unpack  err {r['max_rel_err']:.1e}{extra}{target}"
    )


# --- end to end -------------------------------------------------------------------------------------


def _bf16_model(config_name: str):
    """The same architecture with bf16 fp linears (adaLN RMSNorm kept), random weights, built on the GPU."""
    from terdit.models import TerDiT, get_config

    cfg = get_config(config_name, linear="fp", adaln_norm=True)
    with torch.device("meta"):
        model = TerDiT(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def _ternary_dir(config_name: str, workdir: Path, log=print) -> Path:
    from terdit.deploy.bench import random_deploy_dir
    from terdit.models import get_config

    out = workdir / f"{config_name}-2bit"
    if (out / "config.json").exists():
        return out
    log(f"[e2e] writing a random 2bit deploy directory for {config_name} in {out} ...")
    return random_deploy_dir(get_config(config_name), "2bit", out, store_dtype="bf16")


def _run_e2e(variant: str, config_name: str, deploy_dir: Path, batch: int, steps: int) -> dict[str, Any]:
    from terdit.deploy import load_deployed
    from terdit.deploy.triton_kernels import disable_triton_kernels, enable_triton_kernels
    from terdit.sampling.generate import sample_latents

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if variant == "bf16":
        model = _bf16_model(config_name)
    else:
        model = load_deployed(deploy_dir, device="cuda", dtype="bf16", policy="memory")
    if variant == "unpack":
        disable_triton_kernels("cuda")
    else:
        enable_triton_kernels("cuda")
    labels = [(207 + 97 * i) % 1000 for i in range(batch)]
    kwargs = dict(cfg_scale=4.0, seed=0, dtype=torch.bfloat16, backend="eager" if variant == "eager" else "cuda-graph")
    sampler = sample_latents
    try:
        sampler(model, labels, steps=2, **kwargs)  # compiles and autotunes the kernels
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sampler(model, labels, steps=steps, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        finite = bool(torch.isfinite(out).all())
    finally:
        enable_triton_kernels("cuda")
    peak = torch.cuda.max_memory_allocated() - base
    return dict(config=config_name, variant=variant, batch=batch, steps=steps, seconds=seconds,
                peak_mb=peak / 2**20, finite=finite)  # fmt: skip


def bench_e2e(
    config_name: str, batches: list[int], steps: int, workdir: Path, with_eager: bool, log=print
) -> list[dict[str, Any]]:
    deploy_dir = _ternary_dir(config_name, workdir, log)
    results = []
    variants = ["ternary", "bf16", "unpack"] + (["eager"] if with_eager else [])
    for b in batches:
        got = {}
        for v in variants:
            r = _run_e2e(v, config_name, deploy_dir, b, steps)
            got[v] = r
            log(f"[e2e] {config_name} batch {b} {v:8s}: {r['seconds']:8.2f} s  peak {r['peak_mb']:9.0f} MB")
        t, f, u = got["ternary"], got["bf16"], got["unpack"]
        summary = dict(
            config=config_name, batch=b, steps=steps, runs=got,
            time_ratio_vs_bf16=t["seconds"] / f["seconds"],
            speedup_vs_unpack=u["seconds"] / t["seconds"],
            peak_memory_ratio_vs_bf16=t["peak_mb"] / f["peak_mb"],
        )  # fmt: skip
        if with_eager:
            summary["graph_speedup_vs_eager"] = got["eager"]["seconds"] / t["seconds"]
        summary["pass"] = {
            "time_ratio": summary["time_ratio_vs_bf16"] <= TARGETS["e2e_time_ratio_max"],
            "vs_unpack": summary["speedup_vs_unpack"] >= TARGETS["e2e_speedup_over_unpack"],
            "peak_memory": summary["peak_memory_ratio_vs_bf16"] <= TARGETS["e2e_peak_memory_ratio_max"],
        }
        ok = summary["pass"]
        log(
            f"[e2e] {config_name} batch {b}: time ternary/bf16 {summary['time_ratio_vs_bf16']:.2f} "
            f"(target <= {TARGETS['e2e_time_ratio_max']}: {'PASS' if ok['time_ratio'] else 'FAIL'}), "
            f"unpack/ternary {summary['speedup_vs_unpack']:.2f} "
            f"(target >= {TARGETS['e2e_speedup_over_unpack']}: {'PASS' if ok['vs_unpack'] else 'FAIL'}), "
            f"peak ternary/bf16 {summary['peak_memory_ratio_vs_bf16']:.3f} "
            f"(target <= {TARGETS['e2e_peak_memory_ratio_max']}: {'PASS' if ok['peak_memory'] else 'FAIL'})"
            + (f", graph vs eager x{summary['graph_speedup_vs_eager']:.2f}" if with_eager else "")
        )
        results.append(summary)
    return results


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.replace(",", " ").split()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["TerDiT-600M", "TerDiT-4.2B"])
    p.add_argument("--batches", type=_ints, default=[1, 2, 8, 32], help="per-layer batches, e.g. '1,2,8,32'")
    p.add_argument("--formats", nargs="+", default=["2bit"], choices=["2bit", "base3"])
    p.add_argument("--e2e-batches", type=_ints, default=[1, 8])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--with-eager", action="store_true", help="also time the reference eager sampler (ternary)")
    p.add_argument("--workdir", type=Path, default=None, help="keep random deploy directories here (reused)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: CUDA is not available on this machine; nothing measured (the kernels are tested on "
              "CPU by tests/test_kernels.py under TRITON_INTERPRET=1).")  # fmt: skip
        return 0
    try:
        import triton
    except ImportError:
        print("gpu_kernels: Triton is not installed (pip install triton); nothing measured.")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("targets:", json.dumps(TARGETS))
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "targets": TARGETS, "layers": [], "e2e": []}
    if not a.skip_layers:
        for name in a.configs:
            for fmt in a.formats:
                result["layers"] += bench_layers(name, a.batches, fmt)
    if not a.skip_e2e:
        tmp = None
        if a.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="terdit-gpu-bench-")
        workdir = Path(a.workdir or tmp.name)  # type: ignore[union-attr]
        try:
            for name in a.configs:
                result["e2e"] += bench_e2e(name, a.e2e_batches, a.steps, workdir, a.with_eager)
        finally:
            if tmp is not None:
                tmp.cleanup()
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
