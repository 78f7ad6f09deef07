"""The paper's activation analyses (`terdit analyze`).

Fig. 4: a ternary linear of shape 1024 -> 9216 (the 600M adaLN projection) fed a 512 x 1024 matrix of
ones, with and without an RMSNorm on its output, against a full-precision linear from the same seed.
Fig. 9: the distribution of the adaLN "scale" output (scale_mlp) of one block at the first sampling step,
for trained models with and without the RMSNorm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from terdit.errors import TerditError
from terdit.io import atomic_write, atomic_write_text
from terdit.quant.ternary import TernaryLinear


def _summary(x: torch.Tensor) -> dict[str, float]:
    """Box-plot numbers of a tensor's values."""
    v = x.detach().float().flatten().numpy()
    q = np.percentile(v, [0, 1, 25, 50, 75, 99, 100])
    return {"min": float(q[0]), "p1": float(q[1]), "q1": float(q[2]), "median": float(q[3]), "q3": float(q[4]),
            "p99": float(q[5]), "max": float(q[6]), "mean": float(v.mean()), "std": float(v.std()),
            "abs_max": float(np.abs(v).max())}


@torch.no_grad()
def fig4_activations(seed: int = 0, in_features: int = 1024, out_features: int = 9216, rows: int = 512,
                     alpha_init: str = "randn") -> dict[str, torch.Tensor]:
    """Outputs of the three layers of Fig. 4 on an all-ones input.

    The float layer is nn.Linear's default init from `seed`; the ternary layer starts from the same
    weights, quantised, with alpha initialised as the public code does (`randn`) unless asked otherwise.
    """
    torch.manual_seed(seed)
    fp = nn.Linear(in_features, out_features, bias=False)
    tern = TernaryLinear(in_features, out_features, bias=False, alpha_init=alpha_init)  # type: ignore[arg-type]
    tern.weight.copy_(fp.weight)
    tern.reset_alpha(torch.Generator().manual_seed(seed))
    if alpha_init == "randn":  # a negative alpha only flips signs; the paper's box plot is of magnitudes alike
        tern.alphas.abs_()
    x = torch.ones(rows, in_features)
    y_t = tern(x)
    rms = y_t / torch.sqrt(y_t.pow(2).mean(-1, keepdim=True) + 1e-5)
    return {"ternary_rmsnorm": rms, "ternary": y_t, "full_precision": fp(x)}


@torch.no_grad()
def adaln_scale_distribution(run: str | Path, block: int = 1, seed: int = 0, num: int = 16,
                             cfg_scale: float = 4.0) -> torch.Tensor:
    """scale_mlp of block `block` (0-based; the paper's "second block" is 1) at the first sampling step."""
    from terdit.diffusion import GaussianDiffusion
    from terdit.models.runs import load_run_model

    model = load_run_model(run)
    cfg = model.config
    if not 0 <= block < cfg.depth:
        raise TerditError(f"block {block} is outside [0, {cfg.depth})")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % cfg.num_classes
    d = GaussianDiffusion.create(250)
    t = d.model_timesteps(torch.full((num,), d.num_timesteps - 1, dtype=torch.long))
    c = model.t_embedder(t) + model.y_embedder(labels)
    out = model.layers[block].adaLN_modulation(c)
    del gen, cfg_scale  # the conditioning at the first step does not depend on the noise
    return out.chunk(6, dim=1)[4]  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _boxplot(groups: dict[str, torch.Tensor], title: str, path: Path) -> None:
    from terdit.extras import require

    matplotlib = require("matplotlib", "the analysis figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    data = [g.detach().float().flatten().numpy() for g in groups.values()]
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 1})
    ax.set_xticks(range(1, len(groups) + 1), list(groups))
    ax.set_title(title)
    ax.set_yscale("symlog")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def analyze(out: str | Path, seed: int = 0, alpha_init: str = "randn", runs: dict[str, str | Path] | None = None,
            block: int = 1) -> dict[str, Any]:
    """Fig. 4 (and Fig. 9 for `runs`, {name: run folder}): plots and analysis.json in `out`; the numbers."""
    out = Path(out)
    acts = fig4_activations(seed=seed, alpha_init=alpha_init)
    report: dict[str, Any] = {"fig4": {k: _summary(v) for k, v in acts.items()}}
    _boxplot(acts, "Fig. 4: linear 1024->9216 on ones", out / "fig4_activations.png")
    if runs:
        groups = {name: adaln_scale_distribution(run, block=block, seed=seed) for name, run in runs.items()}
        report["fig9"] = {k: _summary(v) for k, v in groups.items()}
        _boxplot(groups, f"Fig. 9: adaLN scale_mlp, block {block}, first step", out / "fig9_adaln_scale.png")
    atomic_write_text(out / "analysis.json", json.dumps(report, indent=2) + "\n")
    return report
