"""`terdit reproduce`: the quick budget end to end, the PTQ rows, smoothing, reuse of finished runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from terdit import cli
from terdit.errors import TerditError
from terdit.eval import DigitsExtractor, digits_uint8
from terdit.experiments.reproduce import (
    VARIANTS,
    Settings,
    final_loss,
    ptq_model,
    smooth,
    train_args_for,
)
from terdit.models.runs import load_run_model
from terdit.quant.ptq import BLOCK_LINEARS
from terdit.sampling.generate import sample_latents, to_uint8
from terdit.training.trainer import Trainer

QUICK = ["reproduce", "--quick", "--config", "TerDiT-Micro", "--no-progress"]
METRICS = ("fid", "inception_score", "precision", "recall", "class_acc", "eval_loss")


def _main(argv: list[str]) -> int:
    """The real `terdit` entry point, with this command registered even before cli.py lists it."""
    modules = list(cli.COMMAND_MODULES)
    if "terdit.cli.reproduce" not in modules:
        modules.append("terdit.cli.reproduce")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMAND_MODULES", modules)
        return cli.main(argv)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One quick report (TerDiT-Micro on digits, 30 steps), then the same command again."""
    out = tmp_path_factory.mktemp("reproduce") / "rep"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TERDIT_CACHE", str(tmp_path_factory.getbasetemp() / "terdit-cache"))
        t0 = time.perf_counter()
        assert _main([*QUICK, "--out", str(out)]) == 0
        first_s = time.perf_counter() - t0
        first = json.loads((out / "results.json").read_text())
        files = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
        evals = {p: p.read_text() for p in (out / "evals").glob("*.json")}
        t0 = time.perf_counter()
        assert _main([*QUICK, "--out", str(out)]) == 0
        second_s = time.perf_counter() - t0
    return {"out": out, "first": first, "second": json.loads((out / "results.json").read_text()),
            "first_s": first_s, "second_s": second_s, "files": files, "evals": evals}


def test_every_variant_is_trained_sampled_and_evaluated(report):
    r, out = report["first"], report["out"]
    assert list(r["variants"]) == list(VARIANTS)
    steps = r["settings"]["steps"]
    assert steps == 30 and r["settings"]["eval_steps"] == [15, 30] and r["settings"]["cfg"] == [1.5, 4.0]
    for name, v in r["variants"].items():
        finals = {e["cfg"]: e for e in v["evals"] if e["step"] == steps}
        assert set(finals) == {1.5, 4.0}, name
        for e in finals.values():
            assert all(math.isfinite(e[k]) for k in METRICS), (name, e)
            assert e["num_samples"] == 100 and len(e["per_class_acc"]) == 10
            assert (out / e["grid"]).is_file()
        if v["kind"] == "trained":
            assert sorted({e["step"] for e in v["evals"]}) == [15, 30]
            assert v["loss_steps"] == list(range(1, steps + 1)) and all(math.isfinite(x) for x in v["loss"])
            assert v["train_s"] > 0 and math.isfinite(v["final_loss"])
            assert (out / v["run"] / "checkpoints" / "0000015").is_dir()
    for f in ("report.md", "results.json", "loss_curves.png", "loss_adaln_norm.png", "metrics_vs_step.png",
              "adaln_scale.png"):
        assert (out / f).is_file(), f
    text = (out / "report.md").read_text()
    assert "| Models | FID↓ | IS↑ | Precision↑ | Recall↑ | class acc↑" in text
    for c in r["claims"]:
        assert c["held"] in (True, False)
        verdict = "held" if c["held"] else "did not hold"
        assert f"**({c['id']}) {c['claim']}: {verdict}.**" in text
    assert {c["id"] for c in r["claims"]} == set("abcde")
    assert r["command"].startswith("terdit reproduce --out ") and "--steps 30" in r["command"]
    assert r["machine"]["torch"] == torch.__version__ and r["wall_s"] > 0


def test_claims_follow_from_the_numbers(report):
    r = report["first"]

    def fid(name):
        return next(e["fid"] for e in r["variants"][name]["evals"] if e["step"] == 30 and e["cfg"] == 1.5)

    claims = {c["id"]: c["held"] for c in r["claims"]}
    assert claims["a"] == (fid("terdit") <= 1.25 * fid("full-precision"))
    assert claims["b"] == (fid("terdit") < fid("bitnet"))
    ptq = [n for n in VARIANTS if n.startswith("ptq-")]
    assert claims["c"] == all(fid(n) >= 2 * fid("terdit") for n in ptq)
    v = r["variants"]
    assert claims["d"] == (v["terdit"]["final_loss"] < v["terdit-no-norm"]["final_loss"]
                           and fid("terdit") < fid("terdit-no-norm"))
    assert claims["e"] == (fid("terdit-lr-drop") < fid("terdit"))


def test_variants_are_switches_of_one_recipe(report):
    out = report["out"]
    expect = {"full-precision": ("fp", False), "terdit": ("ternary", True), "terdit-no-norm": ("ternary", False),
              "bitnet": ("bitnet", False), "terdit-lr-drop": ("ternary", True)}
    args = {n: json.loads((out / "runs" / n / "train_args.json").read_text()) for n in expect}
    for n, (linear, norm) in expect.items():
        cfg = json.loads((out / "runs" / n / "config.json").read_text())
        assert (cfg["linear"], cfg["adaln_norm"]) == (linear, norm), n
    shared = ("config", "steps", "batch_size", "lr", "seed", "ema_decay", "data", "grad_clip", "weight_decay")
    for key in shared:
        assert len({json.dumps(a[key]) for a in args.values()}) == 1, key
    assert args["terdit-lr-drop"]["lr_drop_step"] == 22 and args["terdit-lr-drop"]["lr_after_drop"] == 1e-4
    assert all(a["lr_drop_step"] is None for n, a in args.items() if n != "terdit-lr-drop")


def test_lr_drop_run_continues_terdit_exactly(report, tmp_path):
    """The LR-drop run branches from terdit's step-22 checkpoint; the result equals training it from scratch."""
    r, out = report["first"], report["out"]
    v, t = r["variants"]["terdit-lr-drop"], r["variants"]["terdit"]
    assert v["status"] == "branched from terdit at step 22"
    assert v["loss"][:22] == t["loss"][:22] and v["loss"][22:] != t["loss"][22:]
    log = [json.loads(x) for x in (out / "runs" / "terdit-lr-drop" / "log.jsonl").read_text().splitlines()]
    assert {e["lr"] for e in log if e["step"] > 22} == {1e-4} and {e["lr"] for e in log if e["step"] <= 22} == {5e-4}
    s = Settings(out=str(tmp_path), config="TerDiT-Micro", steps=30, batch_size=32, eval_every=15, progress=False)
    args = train_args_for(VARIANTS["terdit-lr-drop"], s)
    Trainer(args).run()
    scratch = [json.loads(x)["loss"] for x in (Path(args.out) / "log.jsonl").read_text().splitlines()]
    assert scratch == v["loss"]


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if n.startswith("layers.") and n.split(".", 2)[-1] in BLOCK_LINEARS}


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("ptq-")])
def test_ptq_rows_use_the_real_quantizer(report, name):
    out = report["out"]
    method, granularity = VARIANTS[name].ptq
    ckpt = out / "runs" / "full-precision" / "checkpoints" / "0000030"
    fp = load_run_model(out / "runs" / "full-precision", checkpoint=ckpt)
    q, reports = ptq_model(out / "runs" / "full-precision", method, granularity, ckpt)
    levels = 3 if method == "ternary" else 4
    qlin, flin = _block_linears(q), _block_linears(fp)
    assert len(qlin) == len(reports) == 8 * fp.config.depth
    for n, lin in qlin.items():
        w, w0 = lin.weight.detach().double(), flin[n].weight.detach().double()
        assert not torch.equal(w, w0)
        rows = [w] if granularity == "tensor" else list(w)
        for row, row0 in zip(rows, [w0] if granularity == "tensor" else list(w0)):
            vals = np.unique(row.numpy())
            assert len(vals) <= levels
            if method == "ternary":  # {-a, 0, a}, signs kept, a = mean |w| over the kept weights (L2-optimal)
                kept = row != 0
                assert torch.equal(torch.sign(row[kept]), torch.sign(row0[kept]))
                a = row0[kept].abs().mean().item()
                assert np.allclose(np.abs(vals[vals != 0]), a, rtol=1e-5)
            else:  # 4 levels spanning [min, max] evenly
                assert vals.min() == pytest.approx(row0.min().item(), abs=1e-6)
                assert vals.max() == pytest.approx(row0.max().item(), abs=1e-6)
    # what the report recorded is this quantizer's output
    e = next(e for e in report["first"]["variants"][name]["evals"] if e["cfg"] == 1.5)
    assert e["ptq"]["max_levels_per_row"] <= levels and e["ptq"]["mean_rel_error"] > 0
    if granularity == "tensor":
        assert e["ptq"]["max_levels_per_tensor"] <= levels
    fp_e = next(e for e in report["first"]["variants"]["full-precision"]["evals"] if e["step"] == 30
                and e["cfg"] == 1.5)
    assert e["eval_loss"] != fp_e["eval_loss"]


def test_reported_metrics_match_an_independent_computation(report):
    """FID and class accuracy of the full-precision row, recomputed outside the report code."""
    out, r = report["out"], report["first"]
    e = next(e for e in r["variants"]["full-precision"]["evals"] if e["step"] == 30 and e["cfg"] == 1.5)
    model = load_run_model(out / "runs" / "full-precision")
    labels = [k % 10 for k in range(100)]
    images = sample_latents(model, labels, cfg_scale=1.5, steps=10, seed=0)
    ex = DigitsExtractor()
    a, b = ex(digits_uint8("all"))["pool"].astype(np.float64), ex(to_uint8(images))["pool"].astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    fid = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert e["fid"] == pytest.approx(fid, rel=1e-4)
    d = load_digits()
    clf = LogisticRegression(max_iter=5000).fit(d.data, d.target)
    pix = ((images.clamp(-1, 1) + 1) / 2 * 16).reshape(100, -1).numpy()
    assert e["class_acc"] == pytest.approx(float((clf.predict(pix) == np.array(labels)).mean()))


def test_rerun_reuses_finished_runs_and_evaluations(report):
    assert all(v.get("status", "reused") == "reused" for v in report["second"]["variants"].values())
    after = {p: p.stat().st_mtime_ns for p in (report["out"] / "runs").rglob("*") if p.is_file()}
    assert after == report["files"]  # nothing retrained or rewritten
    assert {p: p.read_text() for p in (report["out"] / "evals").glob("*.json")} == report["evals"]
    assert report["second_s"] < 0.5 * report["first_s"]
    strip = ("wall_s", "machine", "sys_argv", "variants")
    assert {k: v for k, v in report["second"].items() if k not in strip} == \
        {k: v for k, v in report["first"].items() if k not in strip}


def test_settings_that_differ_from_a_finished_run_are_refused(report, capsys):
    assert _main([*QUICK, "--out", str(report["out"]), "--seed", "1"]) == 2
    assert "was trained with other settings" in capsys.readouterr().err


def test_impossible_metric_is_a_clear_error(tmp_path, capsys):
    assert _main([*QUICK, "--out", str(tmp_path / "r"), "--data", str(tmp_path), "--metrics", "digits"]) == 2
    assert "--metrics digits needs the embedded 8x8 digits" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(TerditError, match="num-samples"):
        from terdit.experiments.reproduce import reproduce

        reproduce(Settings(out=str(tmp_path / "r"), num_samples=5))


def test_smoothing_matches_a_hand_computation():
    # factor 0.5: acc 0.5, 1.25, 2.125 over weights 0.5, 0.75, 0.875
    np.testing.assert_allclose(smooth([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    # the paper's factor: point k is the factor^(k-i)-weighted mean of x_1..x_k
    x = np.random.default_rng(0).normal(size=50)
    w = 0.995 ** np.arange(49, -1, -1)
    assert smooth(x)[-1] == pytest.approx(float((w * x).sum() / w.sum()))
    np.testing.assert_allclose(smooth([2.0] * 5), [2.0] * 5)
    np.testing.assert_array_equal(smooth([3.0, 1.0], 0.0), [3.0, 1.0])
    with pytest.raises(TerditError):
        smooth([1.0], 1.0)


def test_final_loss_is_the_mean_of_the_last_tenth():
    assert final_loss(list(range(1, 21))) == pytest.approx((19 + 20) / 2)
    assert final_loss([5.0]) == 5.0 and math.isnan(final_loss([]))


def test_latent_data_is_measured_by_eval_loss_and_decoded_grids(tmp_path, monkeypatch):
    """Non-digits data (here tiny VAE latents): no digits metrics, an eval loss for every row, decoded grids."""
    from terdit.cli.data import main as data_cli
    from terdit.data.synthetic import make_image_folder, save_tiny_vae

    monkeypatch.setenv("TERDIT_CACHE", str(tmp_path / "cache"))
    vae = save_tiny_vae(tmp_path / "vae", (8, 16))
    images = make_image_folder(tmp_path / "imgs", classes=3, per_class=4, seed=0)
    lat = tmp_path / "lat"
    assert data_cli(["extract-latents", str(images), "--vae", str(vae), "--out", str(lat), "--resolution", "16",
                     "--no-progress", "--num-workers", "0"]) == 0
    out = tmp_path / "rep"
    argv = [*QUICK, "--out", str(out), "--data", str(lat), "--steps", "4", "--eval-every", "2", "--num-samples", "12",
            "--variants", "terdit", "ptq-2bit-channel"]
    assert _main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["metric_mode"] == "loss" and r["real_data"] is None
    assert list(r["variants"]) == ["full-precision", "terdit", "ptq-2bit-channel"]  # PTQ needs the fp run
    for v in r["variants"].values():
        for e in v["evals"]:
            assert math.isfinite(e["eval_loss"]) and "fid" not in e
    grid = out / r["variants"]["terdit"]["evals"][-1]["grid"]
    from PIL import Image

    assert Image.open(grid).mode == "RGB"  # decoded by the VAE to 3-channel images
    claims = {c["id"]: c for c in r["claims"]}
    assert claims["b"]["held"] is None and claims["a"]["held"] is not None
    assert "eval loss" in claims["a"]["criterion"]
    assert "not tested" in (out / "report.md").read_text()
