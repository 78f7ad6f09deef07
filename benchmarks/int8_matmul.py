"""Is the CPU integer path worth it on this CPU? One ternary layer's matmul, at TerDiT-600M shapes, per dtype.

    python benchmarks/int8_matmul.py                  # 1 thread, M = 512 rows (batch 1 with guidance)
    python benchmarks/int8_matmul.py --threads 2 --rows 2048

Times, per (K, N) weight shape, interleaved round by round (median of --repeats rounds):
    fp32          x @ W.T, float32 (MKL / oneDNN)
    bf16          the same in bfloat16 (fast only with AVX512-BF16 or AMX)
    int8-onednn   the int8 policy's matmul: uint8 activations x prepacked int8 codes (oneDNN qlinear, int32
                  accumulation), what `terdit.deploy.cpu_int8` runs where the CPU has int8 dot products
    int8-int_mm   torch._int_mm (the int8-packed policy's matmul)
and each one's speed-up over fp32 and over bf16. `terdit.deploy.cpu_int8.has_int8_dot()` (VNNI / AMX flags)
decides whether the int8 policies take the integer path; on a CPU without those flags this shows why it
does not (on the AVX2-only EPYC host: int8-onednn 0.9-1.1x of fp32, int8-int_mm ~18x slower).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from terdit.deploy import cpu_int8
from terdit.models.configs import get_config

VARIANTS = ("fp32", "bf16", "int8-onednn", "int8-int_mm")


def shapes(config: str) -> list[tuple[int, int]]:
    """(in, out) of the block linears of `config`: attention (dim -> dim), FFN (dim -> hidden, hidden -> dim)."""
    c = get_config(config)
    return [(c.dim, c.dim), (c.dim, c.ffn_hidden), (c.ffn_hidden, c.dim)]


def layer_calls(rows: int, k: int, n: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """One zero-argument call per variant on the same random activations and ternary codes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    w32, xb, wb = codes.float(), x.bfloat16(), codes.bfloat16()
    prepacked, handle = cpu_int8.prepack(codes)  # the closure below keeps `prepacked` alive (held weakly)
    qu, _ = cpu_int8.quant_fn(x, True)
    qs, _ = cpu_int8.quant_fn(x, False)
    alpha = torch.tensor([0.02])
    return {
        "fp32": lambda: x @ w32.t(),
        "bf16": lambda: xb @ wb.t(),
        "int8-onednn": lambda: prepacked is not None and cpu_int8.qlinear_u8(qu, handle, alpha, torch.bfloat16),
        "int8-int_mm": lambda: torch._int_mm(qs, codes.t()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="TerDiT-600M")
    p.add_argument("--rows", type=int, default=512, help="activation rows (600M: 256 tokens x 2 with guidance)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    if a.rows < 1 or a.threads < 1 or a.repeats < 1:
        p.error("--rows, --threads and --repeats must be at least 1")
    torch.set_num_threads(a.threads)
    flags = sorted(f for f in cpu_int8.cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni", "avx2")))
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.rows} rows; CPU flags: {' '.join(flags) or '?'}; "
          f"int8 path enabled here: {cpu_int8.has_int8_dot()}")
    for k, n in shapes(a.config):
        calls = layer_calls(a.rows, k, n)
        for f in calls.values():  # warm-up (oneDNN picks and caches its kernels)
            f()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(a.repeats):
            for i in range(len(VARIANTS)):
                v = VARIANTS[(i + r) % len(VARIANTS)]
                t = time.perf_counter()
                calls[v]()
                times[v].append(time.perf_counter() - t)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        cols = "  ".join(
            f"{v} {med[v] * 1e3:8.2f} ms (x{med['fp32'] / med[v]:.2f} fp32, x{med['bf16'] / med[v]:.2f} bf16)"
            for v in VARIANTS
        )
        print(f"K {k:>5} N {n:>5}: {cols}")


if __name__ == "__main__":
    main()
