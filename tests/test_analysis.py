"""`terdit analyze`: the Fig. 4 experiment reproduces the paper's qualitative result."""

import json

import torch
from random_models import train_micro_run

from terdit.cli import main
from terdit.experiments.analysis import adaln_scale_distribution, fig4_activations
from terdit.quant import ternarize


def test_fig4_ternary_without_norm_is_large_and_rmsnorm_restores_the_range():
    acts = fig4_activations(seed=0, in_features=256, out_features=512, rows=8)
    fp, tern, normed = acts["full_precision"], acts["ternary"], acts["ternary_rmsnorm"]
    assert tern.abs().max() > 10 * fp.abs().max()
    assert normed.abs().max() < 3 * fp.abs().max() + 1
    # independent check of the ternary output: ones @ (alpha * codes)^T is alpha * row sums of the codes
    torch.manual_seed(0)
    w = torch.nn.Linear(256, 512, bias=False).weight.detach()
    codes = ternarize(w)[0]
    alpha = abs(float(torch.randn(1, generator=torch.Generator().manual_seed(0))))
    assert torch.allclose(tern[0], alpha * codes.sum(1), rtol=1e-5, atol=1e-4)


def test_analyze_cli_writes_json_and_plots(tmp_path):
    runs = {}
    for name, norm in (("with", True), ("without", False)):
        runs[name] = train_micro_run(tmp_path / name, adaln_norm=norm)
    out = tmp_path / "analysis"
    assert main(["analyze", "--out", str(out), "--runs", f"with-norm={runs['with']}",
                 f"without-norm={runs['without']}"]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["fig4"]["ternary"]["abs_max"] > report["fig4"]["full_precision"]["abs_max"]
    assert set(report["fig9"]) == {"with-norm", "without-norm"}
    assert (out / "fig4_activations.png").stat().st_size > 0 and (out / "fig9_adaln_scale.png").is_file()
    scale = adaln_scale_distribution(runs["with"], block=1)
    assert scale.shape == (16, 32)
