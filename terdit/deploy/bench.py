"""Deployment efficiency (the paper's Table II on this machine): full precision vs ternary packed.

For one config, with random weights: checkpoint size on disk, peak memory during one sampling step and
median time per sampling step. One sampling step = one guided model call for `batch` images, i.e. a
forward over 2 * batch rows (conditional + unconditional). Each variant is measured in a fresh process
(`bench_worker`). Full-precision weights are never built for the packed variants: random codes are
drawn and packed layer by layer, so the 4.2B packed run fits in little memory even when the
full-precision one (about 17 GB) is skipped with `skip_fp`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from terdit.deploy.export import int8_rows, write_deploy
from terdit.deploy.format import WEIGHTS_FILE, DeployInfo
from terdit.errors import TerditError
from terdit.models.configs import TerDiTConfig, get_config
from terdit.models.terdit import TerDiT
from terdit.quant.packing import FORMATS, pack_codes, padding

# Targets stated for this project (checked only where the measured setting matches).
TARGETS = {
    "size_ratio_2bit": 15.0,
    "size_ratio_base3": 19.0,
    "peak_gb_4.2B_cpu": 1.6,
    "time_ratio_memory": 1.15,
    "time_ratio_speed": 1.05,
}


@torch.no_grad()
def random_deploy_dir(
    config: TerDiTConfig, fmt: str, out: Path, seed: int = 0, store_dtype: str = "fp32", int8: bool = False
) -> Path:
    """A deploy directory with random weights: codes uniform in {-1, 0, 1}, floats N(0, 0.02^2).

    `int8`: the large float matrices as int8 rows (as `terdit export --int8`)."""
    with torch.device("meta"):
        model = TerDiT(config)
    gen = torch.Generator().manual_seed(seed)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[store_dtype]
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    layers = model.ternary_layers() if fmt != "fp" else {}
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        codes = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
        tensors[f"{name}.weight"] = pack_codes(codes, fmt, name)[0]
        tensors[f"{name}.alphas"] = torch.tensor([0.02])
        if layer.bias is not None:
            tensors[f"{name}.bias"] = (torch.randn(shape[0], generator=gen) * 0.02).to(dt)
        table[name] = {"shape": list(shape), "pad": padding(fmt, *shape)}
    prefixes = tuple(f"{n}." for n in layers)
    for key, p in model.named_parameters():
        if not key.startswith(prefixes):
            tensors[key] = (torch.randn(p.shape, generator=gen) * 0.02).to(dt)
    info = DeployInfo(
        format=fmt,
        dtype=store_dtype,
        packed=table,
        source={"kind": "random", "seed": seed},
        int8_rows=int8_rows(tensors) if int8 else [],
    )
    return write_deploy(out, config, info, tensors)


@dataclass
class Variant:
    name: str
    fmt: str
    policy: str
    directory: Path
    size_bytes: int
    result: dict[str, Any] = field(default_factory=dict)


def _worker(
    mode: str,
    variants: list[Variant],
    device: str,
    dtype: str,
    batch: int,
    repeats: int,
    timeout: float | None,
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "terdit.deploy.bench_worker",
        mode,
        "--device",
        device,
        "--dtype",
        dtype,
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
    ]
    for v in variants:
        cmd += ["--dir", str(v.directory), "--policy", "memory" if v.fmt == "fp" else v.policy]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        names = ", ".join(v.name for v in variants)
        raise RuntimeError(f"benchmark worker ({mode}: {names}) failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(
    config_name: str,
    formats: list[str],
    policies: list[str],
    device: str = "cpu",
    dtype: str = "fp32",
    batch: int = 2,
    repeats: int = 3,
    skip_fp: bool = False,
    workdir: str | Path | None = None,
    seed: int = 0,
    timeout: float | None = None,
    timing: bool = True,
    extra_sizes: bool = True,
    log=print,
) -> dict[str, Any]:
    """Build the checkpoints, measure memory per variant (a process each) and step times (all variants in
    one process, interleaved), and return sizes, times and ratios. `extra_sizes`: also write (and delete)
    the bf16 and int8-rows storage variants, for their checkpoint sizes."""
    for f in formats:
        if f not in FORMATS:
            raise TerditError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    base = get_config(config_name)
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="terdit-bench-")
    root = Path(workdir if workdir is not None else tmp.name)  # type: ignore[union-attr]
    try:
        variants: list[Variant] = []
        fp_cfg = get_config(config_name, ternary=False)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in TerDiT(fp_cfg).parameters())
        fp_size = n_params * 4
        if not skip_fp:
            log(f"[bench] writing random full-precision {config_name} ({n_params / 1e6:.1f}M params)")
            d = random_deploy_dir(fp_cfg, "fp", root / "fp32", seed)
            fp_size = (d / WEIGHTS_FILE).stat().st_size
            variants.append(Variant("fp32", "fp", "-", d, fp_size))
        sizes: dict[str, int] = {}
        for fmt in formats:
            log(f"[bench] writing random packed {config_name} ({fmt})")
            d = random_deploy_dir(base, fmt, root / fmt, seed)
            sizes[fmt] = (d / WEIGHTS_FILE).stat().st_size
            for suffix, int8 in (("bf16", False), ("int8", True)) if extra_sizes else ():  # sizes only
                d2 = random_deploy_dir(base, fmt, root / f"{fmt}-{suffix}", seed, store_dtype="bf16", int8=int8)
                sizes[f"{fmt}+{suffix}"] = (d2 / WEIGHTS_FILE).stat().st_size
                shutil.rmtree(d2)
            for policy in policies:
                variants.append(Variant(f"{fmt}/{policy}", fmt, policy, d, sizes[fmt]))
        for v in variants:
            log(f"[bench] peak memory of {v.name} (fresh process) ...")
            v.result = _worker("memory", [v], device, dtype, batch, repeats, timeout)
            log(f"[bench]   {v.name}: peak {v.result['peak_step_mb']:.0f} MB")
        if timing:
            log(f"[bench] step times, {len(variants)} variants interleaved, {repeats} rounds after a warm-up ...")
            times = _worker("times", variants, device, dtype, batch, repeats, timeout)
        else:  # the second step of each memory run, unpaired
            times = {
                "step_s": [[v.result["unpaired_step_s"]] for v in variants],
                "median_step_s": [v.result["unpaired_step_s"] for v in variants],
                "median_ratio_to_first": [
                    v.result["unpaired_step_s"] / variants[0].result["unpaired_step_s"] for v in variants
                ],
                "loadavg_1min": list(os.getloadavg()[:1]) * 2,
                "threads": torch.get_num_threads(),
            }
        for i, v in enumerate(variants):
            v.result.update(
                step_s=times["step_s"][i],
                median_step_s=times["median_step_s"][i],
                ratio_to_first=times["median_ratio_to_first"][i],
            )
            log(f"[bench]   {v.name}: median step {v.result['median_step_s']:.3f} s")
        out = _summarise(config_name, n_params, fp_size, skip_fp, sizes, variants, device, dtype, batch, repeats)
        out["repeats"] = repeats if timing else 1
        out["timing"] = "interleaved" if timing else "unpaired (one step per variant, after a warm-up)"
        out["loadavg_1min"] = times["loadavg_1min"]
        out["threads"] = times["threads"]
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def _summarise(config_name, n_params, fp_size, skip_fp, sizes, variants, device, dtype, batch, repeats) -> dict:
    fp = next((v for v in variants if v.fmt == "fp"), None)
    rows = []
    for v in variants:
        r = v.result
        row = {
            "variant": v.name,
            "format": v.fmt,
            "policy": v.policy,
            "size_bytes": v.size_bytes,
            "median_step_s": r["median_step_s"],
            "step_s": r["step_s"],
            "peak_step_mb": r["peak_step_mb"],
            "peak_kind": r["peak_kind"],
            "rss_after_load_mb": r["rss_after_load_mb"],
            "load_peak_rss_mb": r.get("load_peak_rss_mb"),
            "load_s": r["load_s"],
        }
        if fp is not None and v is not fp:
            row["time_ratio_vs_fp32"] = r["ratio_to_first"]  # median of paired per-round ratios
            row["peak_ratio_vs_fp32"] = r["peak_step_mb"] / fp.result["peak_step_mb"]
        rows.append(row)
    size_ratios = {k: fp_size / s for k, s in sizes.items()}
    out = {
        "config": config_name,
        "params": n_params,
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "forward_rows": 2 * batch,
        "repeats": repeats,
        "fp32_size_bytes": fp_size,
        "fp32_size_measured": not skip_fp,
        "packed_size_bytes": sizes,
        "size_ratio_fp32_over_packed": size_ratios,
        "variants": rows,
    }
    out["targets"] = _targets(config_name, device, size_ratios, rows)
    return out


def _targets(config_name: str, device: str, size_ratios: dict, rows: list[dict]) -> dict:
    """Which of the project's targets this run can check, and whether they were met."""
    t: dict[str, dict] = {}
    if config_name == "TerDiT-600M":
        for fmt, key in (("2bit", "size_ratio_2bit"), ("base3", "size_ratio_base3")):
            for variant in (fmt, f"{fmt}+bf16", f"{fmt}+int8"):
                if variant in size_ratios:
                    t[f"{key} ({variant})"] = {
                        "target": f">= {TARGETS[key]}",
                        "measured": size_ratios[variant],
                        "met": size_ratios[variant] >= TARGETS[key],
                    }
        for row in rows:
            ratio = row.get("time_ratio_vs_fp32")
            key = f"time_ratio_{row['policy']}"
            if ratio is not None and key in TARGETS:
                t[f"{key} ({row['variant']})"] = {
                    "target": f"<= {TARGETS[key]}",
                    "measured": ratio,
                    "met": ratio <= TARGETS[key],
                }
    if config_name == "TerDiT-4.2B" and device == "cpu":
        for row in rows:
            if row["format"] != "fp":
                gb = row["peak_step_mb"] * 2**20 / 1e9  # decimal GB, the stricter reading of the target
                t[f"peak_gb_4.2B_cpu ({row['variant']})"] = {
                    "target": f"<= {TARGETS['peak_gb_4.2B_cpu']} GB (1e9 bytes)",
                    "measured": gb,
                    "met": gb <= TARGETS["peak_gb_4.2B_cpu"],
                }
    return t


def format_table(result: dict) -> str:
    """A human-readable report of `run_bench`'s result."""
    mb = 2**20
    lines = [
        f"{result['config']} ({result['params'] / 1e6:.1f}M params), device {result['device']}, "
        f"dtype {result['dtype']}, "
        f"batch {result['batch']} with CFG = {result['forward_rows']} forward rows, "
        f"step time: {result['timing']}, median of {result['repeats']}, {result['threads']} threads, "
        f"load average {result['loadavg_1min'][0]:.1f} -> {result['loadavg_1min'][1]:.1f}",
        f"checkpoint size: fp32 {result['fp32_size_bytes'] / mb:.1f} MiB"
        + ("" if result["fp32_size_measured"] else " (computed: params x 4 bytes, not written)"),
    ]
    for k, s in result["packed_size_bytes"].items():
        what = {
            "bf16": "float tensors in bf16",
            "int8": "large float matrices in int8 rows (lossy), other floats in bf16",
        }.get(k.rpartition("+")[2], "float tensors in fp32")
        lines.append(f"  {k:<12} {s / mb:9.1f} MiB  ratio {result['size_ratio_fp32_over_packed'][k]:6.2f}x  ({what})")
    lines.append(
        f"{'variant':<14}{'size MiB':>10}{'step s':>10}{'load MiB':>10}{'peak MiB':>10}{'t/t_fp32':>10}{'mem/fp32':>10}"
    )
    for r in result["variants"]:
        tr = r.get("time_ratio_vs_fp32")
        pr = r.get("peak_ratio_vs_fp32")
        lines.append(
            f"{r['variant']:<14}{r['size_bytes'] / mb:>10.1f}{r['median_step_s']:>10.3f}"
            f"{r['rss_after_load_mb'] or 0:>10.0f}{r['peak_step_mb']:>10.0f}"
            f"{'' if tr is None else f'{tr:.3f}':>10}{'' if pr is None else f'{pr:.3f}':>10}"
        )
    if result["variants"]:
        lines.append(
            f"load = RSS after loading; peak = {result['variants'][0]['peak_kind']}; "
            "t/t_fp32 = median of per-round ratios"
        )
    for name, t in result["targets"].items():
        lines.append(
            f"target {name}: {t['target']}, measured {t['measured']:.3f} -> {'MET' if t['met'] else 'NOT met'}"
        )
    return "\n".join(lines)
