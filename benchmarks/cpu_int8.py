"""Ternary integer path on CPU vs full precision in bf16 (what a CPU user picks) and fp32.

    python benchmarks/cpu_int8.py            # TerDiT-600M, batch 1 and 4, 1 and 2 threads (~15 min)
    python benchmarks/cpu_int8.py --quick    # batch 1, 2 threads, 2 rounds, no fp32 (~2 min)
    python benchmarks/cpu_int8.py --eager    # the integer path without torch.compile (smaller, slower)
    python benchmarks/cpu_int8.py --config TerDiT-Digits --batch 4 --threads 1 --json out.json
    TERDIT_CPU_INT8=1 python benchmarks/cpu_int8.py --memory-only   # memory only, int8 path forced (no VNNI)
    python benchmarks/cpu_int8.py --memory-only --memory-processes 3   # three processes per peak, medians
    python benchmarks/cpu_int8.py --mmap-threshold 131072   # every variant with glibc's fixed mmap threshold

One sampling step = one guided model call for `batch` images (2 x batch forward rows, 256 tokens each for
600M), random weights (ternary codes uniform in {-1, 0, 1}). Variants, each loaded once:

    fp32         full-precision twin (linear="fp"), fp32 compute
    fp-bf16      full-precision twin, bf16 compute (oneDNN's bf16 matmuls)
    fp-bf16-compiled  the same, with torch.compile around each transformer block, as the int8 policy compiles
                 its blocks: the non-matmul work (norms, modulation, RoPE, gates) fused for both sides
    int8         ternary, codes resident as int8, integer matmuls, the rest in bf16
    int8-packed  ternary, 2-bit packed, unpacked to int8 block by block, integer matmuls, the rest in bf16
    (--float-policies adds the packed "memory" and "speed" policies in bf16, the float paths)

Time: all variants in one process per (threads, batch), interleaved round by round in rotating order after
two warm-up rounds (terdit.deploy.bench_worker); ratios are medians (and minima) of per-round ratios, so a burst
of load on a shared machine hits both sides of a ratio. Peak memory: a fresh process per variant and batch
(RSS high-water mark during two steps, after loading), at the largest thread count; `--memory-processes N`
runs N of each in rotating order and takes ratios of the median peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from terdit.deploy.bench import random_deploy_dir
from terdit.deploy.cpu_int8 import has_int8_dot
from terdit.models.configs import get_config

# name -> (checkpoint, policy, compute dtype)
VARIANTS = {
    "fp32": ("fp", "memory", "fp32"),
    "fp-bf16": ("fp", "memory", "bf16"),
    "fp-bf16-compiled": ("fp", "memory+compiled", "bf16"),
    "int8": ("ternary", "int8", "bf16"),
    "int8-packed": ("ternary", "int8-packed", "bf16"),
    "memory-bf16": ("ternary", "memory", "bf16"),
    "speed-bf16": ("ternary", "speed", "bf16"),
}
TARGETS = {"int8": (1.4, 0.55), "int8-packed": (1.0, 0.35)}  # (speed-up vs fp-bf16 >=, peak vs fp-bf16 <=)
TARGET_CONFIG = "TerDiT-600M"  # the config the targets are set for (a small model is all compile and runtime)
BF16_BASES = ("fp-bf16", "fp-bf16-compiled")  # a target is judged against the faster / smaller of those measured
BASES = (*BF16_BASES, "fp32")


def _worker(args: list[str], threads: int, timeout: float, eager: bool = False,
            mmap_threshold: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if eager:
        env["TERDIT_CPU_COMPILE"] = "0"
    if mmap_threshold is not None:  # glibc's own setting, the same for every variant
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "terdit.deploy.bench_worker", *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(dirs: dict[str, Path], name: str) -> list[str]:
    ckpt, policy, dtype = VARIANTS[name]
    return ["--dir", str(dirs[ckpt]), "--policy", policy, "--dtype", dtype]


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def run(a: argparse.Namespace, log=print) -> dict:
    cfg = get_config(a.config)
    fp_cfg = get_config(a.config, ternary=False) if cfg.ternary else cfg
    out: dict = {
        "config": a.config,
        "variants": a.variants,
        "repeats": a.repeats,
        "cpu_int8_dot": has_int8_dot(),
        "cpu_count": os.cpu_count(),
        "compile": not a.eager,
        "mmap_threshold": a.mmap_threshold,
        "torch": torch.__version__,
        "times": [],
        "memory": [],
    }
    with tempfile.TemporaryDirectory(prefix="terdit-cpu-int8-") as tmp:
        root = Path(tmp)
        log(f"[cpu_int8] writing random {a.config} checkpoints (full precision and 2-bit ternary) ...")
        dirs = {"fp": random_deploy_dir(fp_cfg, "fp", root / "fp", store_dtype="bf16"),
                "ternary": random_deploy_dir(cfg, "2bit", root / "2bit", store_dtype="bf16")}
        for threads in a.threads if a.times else []:
            for batch in a.batch:
                names = [n for n in a.variants if not (n == "fp32" and batch in a.skip_fp32_batch)]
                args = ["times", "--batch", str(batch), "--repeats", str(a.repeats)]
                for n in names:
                    args += _spec(dirs, n)
                t0 = time.perf_counter()
                r = _worker(args, threads, a.timeout, a.eager, a.mmap_threshold)
                steps = dict(zip(names, r["step_s"]))
                row = {"threads": threads, "batch": batch, "step_s": steps, "loadavg_1min": r["loadavg_1min"],
                       "wall_s": time.perf_counter() - t0}
                for base in BASES:
                    if base in steps:
                        row[f"speedup_vs_{base}"] = {
                            n: {"median": statistics.median(_ratios(steps[base], s)),
                                "min": min(_ratios(steps[base], s)),
                                "max": max(_ratios(steps[base], s))}
                            for n, s in steps.items() if n != base
                        }
                out["times"].append(row)
                log(format_times(row))
        if a.memory:
            threads = max(a.threads)
            for batch in a.batch:
                names = [n for n in a.variants if not (n == "fp32" and batch in a.skip_fp32_batch)]
                for proc in range(a.memory_processes):
                    for k in range(len(names)):
                        n = names[(k + proc) % len(names)]  # rotating order, as the timed rounds
                        args = ["memory", "--batch", str(batch), *_spec(dirs, n)]
                        r = _worker(args, threads, a.timeout, a.eager, a.mmap_threshold)
                        out["memory"].append({"variant": n, "batch": batch, "process": proc,
                                              "peak_mb": r["peak_step_mb"], "rss_runtime_mb": r.get("rss_runtime_mb"),
                                              "rss_after_load_mb": r["rss_after_load_mb"],
                                              "step_minor_faults": r.get("step_minor_faults"),
                                              "step_sys_s": r.get("step_sys_s"),
                                              "peak_kind": r["peak_kind"]})
                        log(f"[cpu_int8] peak memory batch {batch} {n:<16} {r['peak_step_mb']:8.0f} MB "
                            f"(runtime before loading {r.get('rss_runtime_mb') or 0:.0f} MB, "
                            f"after load {r['rss_after_load_mb']:.0f} MB; a step's page faults "
                            f"{r.get('step_minor_faults') or 0:,}, kernel time {r.get('step_sys_s') or 0:.2f} s)")
    out["targets"] = targets(out)
    return out


def format_times(row: dict) -> str:
    lines = [f"[cpu_int8] threads {row['threads']}, batch {row['batch']} "
             f"(load {row['loadavg_1min'][0]:.1f} -> {row['loadavg_1min'][1]:.1f}, {row['wall_s']:.0f} s):"]
    for n, s in row["step_s"].items():
        parts = [f"  {n:<16} median {statistics.median(s):7.3f} s  min {min(s):7.3f} s"]
        for base in BASES:
            sp = row.get(f"speedup_vs_{base}", {}).get(n)
            if sp:
                parts.append(f"x{sp['median']:.2f} vs {base} (min x{sp['min']:.2f}, max x{sp['max']:.2f})")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def peak_ratios(out: dict) -> dict[tuple[str, int], tuple[float | None, float | None]]:
    """(variant, batch) -> its peak memory over the smaller FP bf16 peak (eager or compiled) of that batch:
    (whole process, above the runtime), each peak the median over its processes (`--memory-processes`).
    Above the runtime = less the resident size of torch + diffusers + terdit imported, nothing loaded: what
    the model itself adds (the targets are whole-process peaks)."""
    def medians(rows: list[tuple[tuple[str, int], float]]) -> dict[tuple[str, int], float]:
        groups: dict[tuple[str, int], list[float]] = {}
        for key, v in rows:
            groups.setdefault(key, []).append(v)
        return {key: statistics.median(vs) for key, vs in groups.items()}

    peak = medians([((m["variant"], m["batch"]), m["peak_mb"]) for m in out["memory"]])
    own = medians([((m["variant"], m["batch"]), m["peak_mb"] - m["rss_runtime_mb"]) for m in out["memory"]
                   if m.get("rss_runtime_mb")])

    def to_smallest_base(table: dict, n: str, batch: int) -> float | None:
        bases = [table[(b, batch)] for b in BF16_BASES if (b, batch) in table]
        return table[(n, batch)] / min(bases) if bases and (n, batch) in table else None

    return {key: (to_smallest_base(peak, *key), to_smallest_base(own, *key)) for key in peak}


def targets(out: dict) -> dict:
    """The issue's targets, per measured (threads, batch): speed-up (median) and peak memory ratio against full
    precision in bf16, eager or compiled, whichever is faster (speed) or smaller (memory): the strictest.
    Empty for any config but TARGET_CONFIG."""
    if out.get("config") != TARGET_CONFIG:
        return {}
    ratios = peak_ratios(out)
    res = {}
    for row in out["times"]:
        for n, (speed, mem) in TARGETS.items():
            sps = [row[f"speedup_vs_{b}"][n]["median"] for b in BF16_BASES if n in row.get(f"speedup_vs_{b}", {})]
            if not sps:
                continue
            key = f"{n} threads={row['threads']} batch={row['batch']}"
            ratio, above_runtime = ratios.get((n, row["batch"]), (None, None))
            speed_met, peak_met = min(sps) >= speed, _le(ratio, mem)
            res[key] = {"speedup": min(sps), "speedup_target": speed, "speed_met": speed_met,
                        "peak_ratio": ratio, "peak_target": mem, "peak_met": peak_met,
                        "peak_ratio_above_runtime": above_runtime, "peak_met_above_runtime": _le(above_runtime, mem),
                        "met": speed_met and peak_met is True}
    return res


def _le(ratio: float | None, target: float) -> bool | None:
    """ratio <= target, or None where the ratio was not measured (no peak-memory processes)."""
    return None if ratio is None else ratio <= target


def verdict(key: str, t: dict) -> str:
    """One line per target: speed and memory judged apart, memory as whole processes and above the runtime
    (what the model adds), and "not measured" where this run took no peaks."""
    def mark(met: bool | None) -> str:
        return "not measured" if met is None else ("MET" if met else "NOT met")

    line = (f"target {key}: speed-up x{t['speedup']:.2f} vs the faster FP bf16 (>= {t['speedup_target']}) "
            f"{mark(t['speed_met'])}; peak (<= {t['peak_target']} of the smaller FP bf16) ")
    if t["peak_ratio"] is None:
        return line + mark(None)
    line += f"x{t['peak_ratio']:.3f} whole process {mark(t['peak_met'])}"
    if t["peak_ratio_above_runtime"] is not None:
        line += f", x{t['peak_ratio_above_runtime']:.3f} above the runtime {mark(t['peak_met_above_runtime'])}"
    return line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="TerDiT-600M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts (default: 1 and 2, and all cores where there are more)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after two warm-up rounds (default 3: ~15 min)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=["fp-bf16", "fp-bf16-compiled", "fp32", "int8", "int8-packed"])
    p.add_argument("--float-policies", action="store_true", help="also the packed memory / speed policies in bf16")
    p.add_argument("--skip-fp32-batch", type=int, nargs="*", default=[],
                   help="batch sizes timed without the (slow) fp32 variant")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    p.add_argument("--memory-processes", type=int, default=1, metavar="N",
                   help="fresh peak-memory processes per variant and batch, in rotating order; ratios use the "
                        "median peak (a process's peak varies by ~25 MiB with the allocator's state)")
    p.add_argument("--memory-only", dest="times", action="store_false",
                   help="only the peak-memory processes (e.g. where the int8 path is forced on a CPU without int8 "
                        "dot products, TERDIT_CPU_INT8=1: memory is that of the int8 path, times are not)")
    p.add_argument("--eager", action="store_true",
                   help="integer path without torch.compile (TERDIT_CPU_COMPILE=0: 600M peak 66 MiB lower; slower)")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run every variant with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 131072: freed buffers above "
                        "it go back to the system instead of staying in the heap; less memory, slower steps)")
    p.add_argument("--quick", action="store_true", help="batch 1, 2 threads, 2 rounds, no fp32")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads is None:
        a.threads = sorted({1, 2, os.cpu_count() or 2})
    if a.float_policies:
        a.variants += [v for v in ("memory-bf16", "speed-bf16") if v not in a.variants]
    if a.quick:
        a.batch, a.threads, a.repeats = [1], [2], 2
        a.variants = [v for v in a.variants if v not in ("fp32", "fp-bf16-compiled")]
    if a.memory_processes < 1:
        p.error("--memory-processes must be >= 1")
    if a.mmap_threshold is not None and a.mmap_threshold < 0:
        p.error("--mmap-threshold must be a byte count >= 0")
    if "fp-bf16" not in a.variants:
        p.error("--variants must include fp-bf16 (every ratio is taken against it)")
    a.variants = ["fp-bf16"] + [v for v in a.variants if v != "fp-bf16"]
    out = run(a)
    for (n, batch), (whole, above) in peak_ratios(out).items():
        if whole is not None:
            print(f"peak batch {batch} {n:<16} x{whole:.3f} of the smaller FP bf16 peak"
                  + ("" if above is None else f", above the runtime x{above:.3f}"))
    for key, t in out["targets"].items():
        print(verdict(key, t))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
