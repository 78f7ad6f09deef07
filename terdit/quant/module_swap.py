"""`ternarize_`: turn the linear layers of any PyTorch module tree into TerDiT's QAT ternary linears, in place.

Quantization as a module swap, in the style of torchao's `quantize_(model, config, filter_fn)`: a filter
`filter_fn(module, fqn) -> bool` picks the nn.Linear layers to swap; each becomes a `TernaryLinear` holding the
same latent weight and bias, with alpha set from that weight. Works on terdit's full-precision twin
(Large-DiT), diffusers' DiTTransformer2DModel and PixArtTransformer2DModel, or any module tree.

alpha starts at the L2-optimal scale for the ternary codes, <W, C> / <C, C> (mean |W| over the weights that
survive rounding, the same value `terdit.quant.ptq` uses), so a freshly ternarized model *is* the ternary
PTQ of the original and distillation starts from there. (gamma = mean |W| would shrink every surviving weight.)

The default filter is the paper's choice: the linears inside the transformer blocks (attention, MLP, the
blocks' adaLN) become ternary; embedders (patch, timestep, class, caption), anything outside the blocks
and the output projection stay in full precision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from terdit.errors import TerditError
from terdit.quant.ptq import quantize_ternary
from terdit.quant.ternary import Granularity, TernaryLinear

FilterFn = Callable[[nn.Module, str], bool]

# A module path that goes through a numbered block of a ModuleList of transformer blocks.
_BLOCK = re.compile(r"(^|\.)(layers|blocks|transformer_blocks|single_transformer_blocks|joint_blocks)\.\d+\.")
TERNARY_BITS = math.log2(3)  # information per ternary weight; the packed formats store 2 (2bit) or 1.6 (base3)


def paper_filter(module: nn.Module, fqn: str) -> bool:
    """TerDiT's choice: plain nn.Linear inside a transformer block, not part of an embedder."""
    if type(module) is not nn.Linear:
        return False
    return bool(_BLOCK.search(fqn)) and not any("emb" in part for part in fqn.split("."))


def names_filter(names: set[str] | list[str]) -> FilterFn:
    """A filter that swaps exactly the layers named (e.g. the list a report or a saved student stored)."""
    wanted = set(names)
    return lambda module, fqn: fqn in wanted and isinstance(module, nn.Linear)


@dataclass
class TernarizeReport:
    """What `ternarize_` did: which layers became ternary, and what that means for storage."""

    swapped: list[str] = field(default_factory=list)
    kept_linears: list[str] = field(default_factory=list)  # nn.Linear layers the filter left full precision
    ternary_params: int = 0  # weights of the swapped layers
    other_params: int = 0  # every other parameter (biases, alphas, embedders, norms, kept linears)
    other_bits: int = 32  # bits of one kept parameter (the model's floating dtype)

    @property
    def total_params(self) -> int:
        return self.ternary_params + self.other_params

    @property
    def ternary_fraction(self) -> float:
        return self.ternary_params / max(1, self.total_params)

    def bits_per_weight(self, ternary_bits: float = TERNARY_BITS) -> float:
        """Average bits per parameter with ternary weights at `ternary_bits` (2 for 2bit, 1.6 for base3)."""
        bits = self.ternary_params * ternary_bits + self.other_params * self.other_bits
        return bits / max(1, self.total_params)

    def to_dict(self) -> dict:
        return {
            "swapped": len(self.swapped), "kept_linears": len(self.kept_linears),
            "ternary_params": self.ternary_params, "other_params": self.other_params,
            "ternary_fraction": self.ternary_fraction,
            "bits_per_weight": {"ideal": self.bits_per_weight(), "2bit": self.bits_per_weight(2.0),
                                "base3": self.bits_per_weight(1.6)},
        }

    def __str__(self) -> str:
        return (f"ternarized {len(self.swapped)} linear layers ({self.ternary_params:,} weights, "
                f"{100 * self.ternary_fraction:.1f}% of {self.total_params:,} parameters); kept "
                f"{len(self.kept_linears)} linears in full precision; "
                f"{self.bits_per_weight(2.0):.2f} bits/parameter packed 2bit "
                f"(fp{self.other_bits} elsewhere)")


@torch.no_grad()
def ternary_from_linear(linear: nn.Linear, granularity: Granularity = "tensor") -> TernaryLinear:
    """A TernaryLinear with `linear`'s weight and bias (copied) and alpha = the L2-optimal scale of its codes."""
    w = linear.weight
    layer = TernaryLinear(linear.in_features, linear.out_features, linear.bias is not None,
                          alpha_init="absmean", granularity=granularity, device=w.device, dtype=w.dtype)
    layer.weight.copy_(w)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    if granularity != "tensor":
        raise TerditError("ternarize_: only per-tensor alpha is supported (TerDiT's scalar alpha)")
    alpha = quantize_ternary(w, "tensor")[1]
    # an all-zero weight (adaLN-Zero at init) has no codes: fall back to the scale of a default init
    layer.alphas.fill_(float(alpha) if float(alpha) > 0 else 1.0 / math.sqrt(linear.in_features))
    layer.weight.requires_grad_(w.requires_grad)
    return layer


def ternarize_(model: nn.Module, filter_fn: FilterFn | None = None, granularity: Granularity = "tensor",
               ) -> TernarizeReport:
    """Swap the linears `filter_fn(module, fqn)` selects (default: `paper_filter`) for TernaryLinear, in place.

    Returns a report; raises TerditError when the filter selects nothing (a wrong filter would otherwise
    leave a full-precision model that only looks quantized).
    """
    filter_fn = filter_fn or paper_filter
    report = TernarizeReport()
    targets = []
    for fqn, module in model.named_modules():
        if isinstance(module, TernaryLinear) or not isinstance(module, nn.Linear):
            continue
        if filter_fn(module, fqn):
            targets.append((fqn, module))
        else:
            report.kept_linears.append(fqn)
    if not targets:
        raise TerditError(f"ternarize_: the filter selected no nn.Linear layer in {type(model).__name__}")
    for fqn, linear in targets:
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ternary_from_linear(linear, granularity))
        report.swapped.append(fqn)
    swapped_weights = {f"{n}.weight" for n in report.swapped}
    for name, p in model.named_parameters():
        if name in swapped_weights:
            report.ternary_params += p.numel()
        else:
            report.other_params += p.numel()
            if p.is_floating_point():
                report.other_bits = p.element_size() * 8
    return report


def ternary_layer_names(model: nn.Module) -> list[str]:
    """The TernaryLinear layers of a model, by module name."""
    return [n for n, m in model.named_modules() if isinstance(m, TernaryLinear)]


def _conditions(model: nn.Module) -> torch.Tensor:
    """terdit's conditioning vectors c = t_emb + y_emb over timesteps 0, 10, ..., 990 and every class row."""
    table = model.y_embedder.embedding_table.weight
    t = torch.arange(0, 1000, 10, device=table.device).repeat_interleave(table.shape[0])
    y = torch.arange(table.shape[0], device=table.device).repeat(100)
    return model.t_embedder(t) + table[y]


@torch.no_grad()
def add_adaln_norm_(model: nn.Module, eps: float = 1e-5) -> int:
    """TerDiT's RMSNorm after each block's adaLN linear, added to a terdit model that lacks it; returns how many.

    The paper adds it because ternary adaLN weights inflate the modulation (and so the activations). Its
    weight starts at the per-channel least-squares scale that maps the normalised modulation back to the
    model's current one over a grid of timesteps and classes, so the model's function barely changes.
    Only terdit's block layout (`layers[i].adaLN_modulation` = SiLU, Linear) is supported.
    """
    from terdit.models.terdit import RMSNorm

    blocks = [b for b in getattr(model, "layers", []) if isinstance(getattr(b, "adaLN_modulation", None),
                                                                       nn.Sequential)]
    if not blocks or not hasattr(model, "t_embedder") or not hasattr(model, "y_embedder"):
        raise TerditError(f"{type(model).__name__}: no terdit adaLN blocks to add an RMSNorm to")
    if any(len(b.adaLN_modulation) > 2 for b in blocks):
        raise TerditError("the model already has an RMSNorm after adaLN")
    c = _conditions(model)
    for block in blocks:
        x = block.adaLN_modulation(c).float()
        norm = RMSNorm(x.shape[1], eps).to(c.device)
        n = norm(x)  # weight ones: x / rms(x)
        scale = (x * n).mean(0) / n.pow(2).mean(0).clamp_min(1e-12)
        norm.weight.copy_(scale)  # the least-squares w in w * n ~ x
        block.adaLN_modulation.append(norm)
    return len(blocks)


@torch.no_grad()
def adaln_inflation(student: nn.Module, teacher: nn.Module) -> float:
    """Mean over blocks of rms(student adaLN output) / rms(teacher's), over a grid of timesteps and classes:
    how much ternarizing the adaLN linears inflates the modulation (the paper's reason for its RMSNorm)."""
    cs, ct = _conditions(student), _conditions(teacher)
    ratios = []
    for net_s, net_t in zip(student.layers, teacher.layers, strict=True):
        ratios.append(float(net_s.adaLN_modulation(cs).pow(2).mean().sqrt() /
                            net_t.adaLN_modulation(ct).pow(2).mean().sqrt()))
    return sum(ratios) / len(ratios)
