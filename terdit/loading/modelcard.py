"""The model card (README.md) that `save_pretrained` / `push_to_hub` write: facts read off the model itself."""

from __future__ import annotations

import math
from typing import Any

PAPER_URL = "https://arxiv.org/abs/2405.14854"
# Stored bits per ternary weight of each deploy format (terdit.quant.packing): 4 trits per byte, 5 per byte.
PACKED_BITS = {"2bit": 2.0, "base3": 8 / 5}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def model_card(model: Any) -> str:
    """Markdown with YAML front matter: architecture, parameter counts, bits per weight, training, usage."""
    cfg = model.config
    counts = model.parameter_counts()
    deploy = model.deploy.to_dict() if getattr(model, "deploy", None) is not None else {}
    train = getattr(model, "training_info", None) or {}
    kind = {"ternary": "TerDiT (ternary block linears)", "bitnet": "BitNet b1.58 block linears",
            "fp": "Large-DiT (full precision)"}[cfg.linear]
    fp_bits = 8 * (next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4))
    if deploy.get("format") in PACKED_BITS:
        tern_bits, stored = PACKED_BITS[deploy["format"]], f"packed `{deploy['format']}`"
    elif cfg.linear != "fp":
        tern_bits, stored = float(fp_bits), "latent full-precision weights (QAT checkpoint)"
    else:
        tern_bits, stored = float(fp_bits), "full precision"
    total_bits = counts["ternary"] * tern_bits + counts["full_precision"] * fp_bits
    avg = total_bits / max(counts["total"], 1)
    latent = cfg.in_channels == 4
    lines = [
        "---", "library_name: terdit", "tags:",
        "- terdit", "- diffusers", "- diffusion-transformer", "- ternary", "- class-conditional",
        "---", "",
        f"# {cfg.name if cfg.name != 'custom' else 'TerDiT model'}", "",
        "A class-conditional diffusion transformer trained or exported with terdit, the toolkit for "
        f"[TerDiT: Ternary Diffusion Models with Transformers]({PAPER_URL}).", "",
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| block linears | {kind} |",
        f"| depth x width | {cfg.depth} x {cfg.dim}, {cfg.n_heads} heads, patch {cfg.patch_size} |",
        f"| input | {cfg.in_channels} x {cfg.sample_size} x {cfg.sample_size} "
        f"({'VAE latents' if latent else 'pixels'}) |",
        f"| output channels | {cfg.out_channels} ({'eps + learned variance' if cfg.learn_sigma else 'eps'}) |",
        f"| classes | {cfg.num_classes} (+ null class for guidance: {cfg.class_dropout_prob > 0}) |",
        f"| parameters | {_millions(counts['total'])} total: {_millions(counts['ternary'])} "
        f"{'ternary' if cfg.linear != 'fp' else 'block-linear'}, {_millions(counts['full_precision'])} "
        "full precision |",
    ]
    if cfg.linear != "fp":
        lines.append(f"| bits per ternary weight | {math.log2(3):.2f} of information; stored: {stored}, "
                     f"{tern_bits:g} bits |")
    lines += [f"| average stored bits per weight | {avg:.2f} |", ""]
    lines += ["## Training", ""]
    if train:
        data = train.get("data") or train.get("dataset") or "not recorded"
        lines += [f"- data: `{data}`", f"- steps: {train.get('steps', 'not recorded')}",
                  f"- batch size: {train.get('batch_size', 'not recorded')}, lr: {train.get('lr', 'not recorded')}"]
        if train.get("vae"):
            lines.append(f"- VAE: `{train['vae']}`")
    elif deploy.get("source"):
        lines.append(f"- exported from: `{deploy['source']}`")
    else:
        lines.append("- not recorded with these weights")
    metrics = getattr(model, "metrics", None)
    lines += ["", "## Metrics", ""]
    lines += [f"- {k}: {v}" for k, v in metrics.items()] if metrics else ["- none recorded with these weights"]
    lines += ["", "## Use", "", "```python", "import torch", "from diffusers import AutoencoderKL",
              "from terdit import TerDiT",
              "from terdit.sampling.pipeline import TerDiTPipeline", "",
              'transformer = TerDiT.from_pretrained("REPO_OR_FOLDER", torch_dtype=torch.float32)']
    if latent and cfg.num_classes == 1000:
        lines += ["", "# diffusers' own DiTPipeline (1000 ImageNet classes; ignores the learned variance)",
                  "from diffusers import DDIMScheduler, DiTPipeline",
                  'vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")',
                  "pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())",
                  "image = pipe(class_labels=[207], generator=torch.manual_seed(0)).images[0]"]
    lines += ["", "# terdit's pipeline: the paper's DDPM with the learned variance, class names, any class count",
              "pipe = TerDiTPipeline(transformer=transformer"
              + (', vae=AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema"))' if latent else ")"),
              "image = pipe(class_labels=[1], generator=torch.manual_seed(0)).images[0]", "```", "",
              "## Citation", "", f"TerDiT: {PAPER_URL}", ""]
    return "\n".join(lines)
