"""`terdit info PATH`: what a model is, what it weighs in each storage format, and what it needs to run.

PATH is a config name (`terdit configs`), a run folder, a deploy or pretrained directory, or a pipeline
folder. Nothing is loaded but the config and the safetensors header: the model is built on the meta device.

Memory is estimated, not measured (see `estimate_memory` for the formula): weights at their storage size plus
the peak activations of one sampling forward, which keeps one block's tensors alive at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from terdit.errors import TerditError
from terdit.models.configs import ALIASES, CONFIGS, TerDiTConfig, get_config

FLOAT_BYTES = {"fp32": 4, "bf16": 2}
PACKED_BITS_ENTROPY = math.log2(3)  # 1.585: the information in one ternary weight
SD_VAE_DOWNSAMPLE = 8  # latent (4-channel) models are trained on SD-VAE latents: 8x fewer pixels per side
SAFETENSORS_DTYPES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "U8": "uint8", "I8": "int8",
                      "I64": "int64", "I32": "int32", "BOOL": "bool"}


# -- what PATH is ------------------------------------------------------------------------------------------
def resolve(path_or_name: str) -> dict[str, Any]:
    """{"kind", "config", "weights" (file or None), "deploy" (section or None), "downsample"} for PATH."""
    from terdit.models.kinds import Kind, kind_of, model_dir

    if path_or_name in CONFIGS or path_or_name in ALIASES:
        cfg = get_config(path_or_name)
        return {"kind": "config", "path": None, "config": cfg, "weights": None, "deploy": None,
                "downsample": _default_downsample(cfg)}
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise TerditError(f"{path_or_name}: neither a config name ({', '.join(CONFIGS)}) nor an existing path")
    downsample = _pipeline_downsample(path) if kind_of(path) is Kind.PIPELINE else None
    path, kind = model_dir(path)
    if kind == "run":
        from terdit.models.runs import latest_checkpoint, load_config, load_train_args

        cfg = load_config(path)
        weights = latest_checkpoint(path) / "ema.safetensors"
        if downsample is None and cfg.in_channels == 4 and load_train_args(path).get("vae"):
            downsample = SD_VAE_DOWNSAMPLE
        return {"kind": "run", "path": str(path), "config": cfg, "weights": weights, "deploy": None,
                "downsample": downsample or _default_downsample(cfg)}
    if kind == "deploy":
        from terdit.deploy.format import read_config

        cfg, deploy = read_config(path)
        return {"kind": "deploy", "path": str(path), "config": cfg, "weights": path / "model.safetensors",
                "deploy": deploy.to_dict(), "downsample": downsample or _default_downsample(cfg)}
    if kind == "pretrained":
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TerditError(f"{path / 'config.json'}: not readable JSON ({e})") from e
        cfg = TerDiTConfig.from_model_config(raw)  # diffusers' config.json (sample_size, out_channels, _class_name)
        weights = next(iter(sorted(path.glob("diffusion_pytorch_model*.safetensors"))), None)
        return {"kind": "pretrained", "path": str(path), "config": cfg, "weights": weights,
                "deploy": None, "downsample": downsample or _default_downsample(cfg)}
    if kind == "release":
        raise TerditError(f"{path}: a public release directory; convert it first (`terdit convert`) to inspect it")
    raise TerditError(f"{path}: not a run folder, deploy, pretrained or pipeline directory")


def _default_downsample(cfg: TerDiTConfig) -> int:
    """Pixels per latent per side: 8 for 4-channel (SD-VAE latent) models, 1 for pixel-space ones."""
    return SD_VAE_DOWNSAMPLE if cfg.in_channels == 4 else 1


def _pipeline_downsample(path: Path) -> int | None:
    vae_cfg = path / "vae" / "config.json"
    if not vae_cfg.is_file():
        return 1
    try:
        blocks = json.loads(vae_cfg.read_text()).get("block_out_channels") or []
    except (OSError, json.JSONDecodeError):
        return None
    return 2 ** (len(blocks) - 1) if blocks else None


# -- parameters and storage ------------------------------------------------------------------------------------
def layer_shapes(cfg: TerDiTConfig) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Parameter counts and the [out, in] shapes of the ternary layers, from a meta-device model."""
    from terdit.loading.open import META_INIT_THRESHOLD
    from terdit.models.terdit import TerDiT

    # meta-device init imports torch._dynamo (seconds); small models are quicker to build for real
    with torch.device("meta" if cfg.depth * cfg.dim * cfg.dim > META_INIT_THRESHOLD else "cpu"):
        model = TerDiT(cfg)
    counts = model.parameter_counts()
    shapes = [(m.out_features, m.in_features) for m in model.ternary_layers().values()]
    return counts, shapes


def storage_table(counts: dict[str, int], shapes: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Bytes of the model in each storage format. Packed formats keep one float32 alpha per ternary layer and
    every non-ternary tensor in fp32 (`terdit export`'s default); `other_bytes_bf16` gives the bf16 variant."""
    from terdit.quant.packing import FORMATS, packed_shape

    total, n_tern = counts["total"], counts["ternary"]
    rest = total - n_tern
    table: dict[str, dict[str, float]] = {}
    for name, nbytes in FLOAT_BYTES.items():
        table[name] = {"ternary_bytes": n_tern * nbytes, "other_bytes": rest * nbytes, "total_bytes": total * nbytes,
                       "bits_per_ternary_weight": 8.0 * nbytes, "bits_per_parameter": 8.0 * nbytes}
    if n_tern:
        for fmt in FORMATS:
            packed = sum(math.prod(packed_shape(fmt, o, i)) for o, i in shapes)
            alphas = 4 * len(shapes)
            # alphas are parameters too; they are stored as float32 in the "other" part
            other = (rest - len(shapes)) * 4 + alphas
            table[fmt] = {"ternary_bytes": packed, "other_bytes": other, "total_bytes": packed + other,
                          "other_bytes_bf16": (rest - len(shapes)) * 2 + alphas,
                          "bits_per_ternary_weight": 8.0 * packed / n_tern,
                          "bits_per_parameter": 8.0 * (packed + other) / total}
    return table


def file_info(weights: Path | None, deploy: dict[str, Any] | None) -> dict[str, Any] | None:
    """Size on disk and stored dtypes of a safetensors file (header only)."""
    if weights is None:
        return None
    if not weights.is_file():
        raise TerditError(f"{weights}: file not found")
    from safetensors import SafetensorError, safe_open

    dtypes: dict[str, int] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                name = SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                dtypes[name] = dtypes.get(name, 0) + math.prod(sl.get_shape())
    except (SafetensorError, OSError) as e:
        raise TerditError(f"{weights}: not a valid safetensors file ({e})") from e
    if deploy:
        fmt = f"{deploy['format']} packed, other tensors {deploy['dtype']}" if deploy["format"] != "fp" \
            else f"full precision {deploy['dtype']}"
    else:
        floats = {k: v for k, v in dtypes.items() if k.startswith(("fp", "bf"))}
        fmt = max(floats, key=floats.get) if floats else "unknown"
    return {"file": str(weights), "bytes": weights.stat().st_size, "format": fmt, "elements_by_dtype": dtypes}


# -- memory ------------------------------------------------------------------------------------------------------
def estimate_memory(cfg: TerDiTConfig, counts: dict[str, int], shapes: list[tuple[int, int]],
                    table: dict[str, dict[str, float]], resolution: int, batch_size: int, downsample: int,
                    cfg_guidance: bool = True) -> dict[str, Any]:
    """Peak memory of sampling (one forward at a time) at `resolution` pixels, and a rough training figure.

    Sampling, bytes per element e of the compute dtype, rows R = batch (x2 with guidance), tokens N, width d,
    FFN width h, heads H:
        weights      storage size (packed: packed bytes + other tensors in the compute dtype + one unpacked
                     layer of scratch, the "memory" policy; ternary QAT models also materialise one layer's
                     quantized weight per forward, counted the same way)
        activations  e * R * N * (2d + max(4d + H*N, 3h)): the residual stream and the normed block input,
                     plus the larger of attention (q, k, v, output and, with the math SDPA kernel, the H x N x N
                     scores; flash / memory-efficient kernels skip that term, given separately) and the SwiGLU
                     FFN (w1 x, w3 x and their product)
    Training (rough): 20 bytes per parameter (fp32 weights, gradients, AdamW's two moments, EMA) plus the
    activations autograd keeps, about e * B * N * depth * (10d + 4h) without gradient checkpointing.
    Not included: the VAE decoder, the CUDA context and allocator fragmentation.
    """
    if resolution % (downsample * cfg.patch_size):
        raise TerditError(f"--resolution {resolution} is not a multiple of {downsample * cfg.patch_size} "
                          f"(downsampling {downsample} x patch {cfg.patch_size})")
    side = resolution // downsample
    tokens = (side // cfg.patch_size) ** 2
    rows = batch_size * (2 if cfg_guidance else 1)
    d, h, heads = cfg.dim, cfg.ffn_hidden, cfg.n_heads
    largest = max((o * i for o, i in shapes), default=0)

    def acts(e: int, math_sdpa: bool) -> int:
        attn = 4 * d + (heads * tokens if math_sdpa else 0)
        return e * rows * tokens * (2 * d + max(attn, 3 * h))

    total, n_tern = counts["total"], counts["ternary"]
    rest = total - n_tern
    plans: dict[str, dict[str, int]] = {}
    for name, e in FLOAT_BYTES.items():
        weights = total * e + largest * e  # + one layer's quantized weight, materialised per forward
        plans[name] = {"weights": weights, "activations": acts(e, False), "activations_math_sdpa": acts(e, True)}
    for fmt in ("2bit", "base3"):
        if fmt in table:
            e = 2  # packed models compute in bf16 on GPUs
            weights = int(table[fmt]["ternary_bytes"]) + rest * e + largest * e
            plans[f"{fmt} (bf16 compute)"] = {"weights": weights, "activations": acts(e, False),
                                               "activations_math_sdpa": acts(e, True)}
    for plan in plans.values():
        plan["total"] = plan["weights"] + plan["activations"]
    train_acts = 2 * batch_size * tokens * cfg.depth * (10 * d + 4 * h)  # bf16 autocast
    return {
        "resolution": resolution,
        "model_input": f"{side}x{side}x{cfg.in_channels}",
        "downsample": downsample,
        "tokens": tokens,
        "batch_size": batch_size,
        "forward_rows": rows,
        "sampling": plans,
        "training_rough": {"weights_grads_adam_ema": 20 * total, "activations_bf16": train_acts,
                           "total": 20 * total + train_acts},
        "method": "weights at storage size + one block's peak activations; see terdit.loading.info.estimate_memory",
    }


# -- the report -----------------------------------------------------------------------------------------------
def describe(path_or_name: str, resolution: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Everything `terdit info` prints, as a JSON-able dict."""
    if batch_size < 1:
        raise TerditError(f"--batch-size must be >= 1, got {batch_size}")
    src = resolve(path_or_name)
    cfg: TerDiTConfig = src["config"]
    counts, shapes = layer_shapes(cfg)
    table = storage_table(counts, shapes)
    downsample = src["downsample"]
    res = resolution if resolution is not None else cfg.input_size * downsample
    if res < 1:
        raise TerditError(f"--resolution must be >= 1, got {res}")
    disk = file_info(src["weights"], src["deploy"])
    if disk is not None:
        disk["bits_per_parameter"] = 8.0 * disk["bytes"] / counts["total"]
    return {
        "source": {"kind": src["kind"], "path": src["path"], "name": cfg.name},
        "config": cfg.to_dict(),
        "parameters": {**counts, "ternary_layers": len(shapes)},
        "storage": table,
        "entropy_bits_per_ternary_weight": PACKED_BITS_ENTROPY,
        "on_disk": disk,
        "deploy": src["deploy"] and {k: v for k, v in src["deploy"].items() if k != "packed"},
        "memory": estimate_memory(cfg, counts, shapes, table, res, batch_size, downsample),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_report(info: dict[str, Any]) -> str:
    c, p, m = info["config"], info["parameters"], info["memory"]
    src = info["source"]
    lines = [f"{src['name']}  ({src['kind']}{': ' + src['path'] if src['path'] else ''})",
             f"  dim {c['dim']}, depth {c['depth']}, heads {c['n_heads']}, patch {c['patch_size']}, "
             f"input {c['input_size']}x{c['input_size']}x{c['in_channels']}, {c['num_classes']} classes, "
             f"linear {c['linear']}, adaLN RMSNorm {'on' if c['adaln_norm'] else 'off'}"]
    share = 100.0 * p["ternary"] / p["total"] if p["total"] else 0.0
    lines.append(f"parameters: {p['total']:,} = {p['ternary']:,} ternary ({share:.1f}%, {p['ternary_layers']} layers)"
                 f" + {p['full_precision']:,} full precision")
    lines.append(f"{'storage':<10} {'bits/ternary w':>14} {'bits/param':>11} {'size':>12}")
    for name, row in info["storage"].items():
        lines.append(f"  {name:<8} {row['bits_per_ternary_weight']:>14.2f} {row['bits_per_parameter']:>11.2f} "
                     f"{human_bytes(row['total_bytes']):>12}")
    lines.append(f"  (a ternary weight holds log2(3) = {info['entropy_bits_per_ternary_weight']:.3f} bits; packed "
                 "formats keep other tensors in fp32)")
    disk = info["on_disk"]
    if disk:
        lines.append(f"on disk: {human_bytes(disk['bytes'])} ({disk['format']}, {disk['bits_per_parameter']:.2f} "
                     f"bits/param) {disk['file']}")
    lines.append(f"memory to sample at {m['resolution']}x{m['resolution']} px (model input {m['model_input']}, "
                 f"{m['tokens']} tokens), batch {m['batch_size']} with guidance ({m['forward_rows']} rows):")
    for name, plan in m["sampling"].items():
        lines.append(f"  {name:<20} weights {human_bytes(plan['weights']):>10} + activations "
                     f"{human_bytes(plan['activations']):>10} = {human_bytes(plan['total']):>10}"
                     f"   (math SDPA kernel: activations {human_bytes(plan['activations_math_sdpa'])})")
    t = m["training_rough"]
    lines.append(f"  training (rough)     {human_bytes(t['weights_grads_adam_ema'])} weights+grads+AdamW+EMA + "
                 f"{human_bytes(t['activations_bf16'])} bf16 activations = {human_bytes(t['total'])}")
    lines.append("  estimated, not measured: weights at storage size + one block's peak activations "
                 "(VAE and CUDA context excluded; see terdit.loading.info.estimate_memory)")
    return "\n".join(lines)
