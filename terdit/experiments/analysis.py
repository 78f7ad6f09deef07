"""The paper's activation analyses (`terdit analyze`).

Fig. 4: a ternary linear of shape 1024 -> 9216 (the 600M adaLN projection) fed a 512 x 1024 matrix of
ones, with and without an RMSNorm on its output, against a full-precision linear from the same seed.
Fig. 9: the distribution of the adaLN "scale" output (scale_mlp) of one block at the first sampling step,
for trained models with and without the RMSNorm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
        raise TerditError(f"--block {block} is outside [0, {cfg.depth})")
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="the paper's activation analyses (Fig. 4; Fig. 9 with --runs)")
    p.add_argument("--out", default="analysis", help="folder for PNG plots and JSON numbers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha-init", choices=["randn", "absmean", "ones"], default="randn",
                   help="alpha of the Fig. 4 ternary layer (randn: the public code)")
    p.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUN",
                   help="trained runs for Fig. 9, e.g. with-norm=runs/a without-norm=runs/b")
    p.add_argument("--block", type=int, default=1, help="block for Fig. 9 (0-based; the paper's second = 1)")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    out = Path(args.out)
    acts = fig4_activations(seed=args.seed, alpha_init=args.alpha_init)
    report = {"fig4": {k: _summary(v) for k, v in acts.items()}}
    _boxplot(acts, "Fig. 4: linear 1024->9216 on ones", out / "fig4_activations.png")
    if args.runs:
        groups = {}
        for item in args.runs:
            name, sep, run = item.partition("=")
            if not sep:
                raise TerditError(f"--runs {item!r}: expected NAME=RUN")
            groups[name] = adaln_scale_distribution(run, block=args.block, seed=args.seed)
        report["fig9"] = {k: _summary(v) for k, v in groups.items()}
        _boxplot(groups, f"Fig. 9: adaLN scale_mlp, block {args.block}, first step", out / "fig9_adaln_scale.png")
    atomic_write_text(out / "analysis.json", json.dumps(report, indent=2) + "\n")
    f4 = report["fig4"]
    print(f"Fig. 4 |activation| max: ternary {f4['ternary']['abs_max']:.3g}, ternary+RMSNorm "
          f"{f4['ternary_rmsnorm']['abs_max']:.3g}, full precision {f4['full_precision']['abs_max']:.3g}")
    for name, s in report.get("fig9", {}).items():
        print(f"Fig. 9 {name}: scale_mlp in [{s['min']:.3g}, {s['max']:.3g}], std {s['std']:.3g}")
    print(f"wrote {out}/analysis.json and plots")
    return 0
