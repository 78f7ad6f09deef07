"""`terdit reproduce`: the quick budget end to end (two seeds), the verdict rule, the PTQ rows, smoothing, reuse
of finished runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from terdit.cli import main
from terdit.errors import TerditError
from terdit.eval import DigitsExtractor, digits_uint8
from terdit.experiments.evaluation import ptq_model
from terdit.experiments.losses import final_loss, smooth
from terdit.experiments.report import render_report
from terdit.experiments.reproduce import reproduce
from terdit.experiments.seeds import HELD, INCONCLUSIVE, NOT_HELD, NOT_TESTED, all_of, compare
from terdit.experiments.variants import VARIANTS, Settings, train_args_for
from terdit.models.runs import load_run_model
from terdit.quant.ptq import BLOCK_LINEARS
from terdit.sampling.generate import sample_latents, to_uint8
from terdit.training.trainer import Trainer

QUICK = ["reproduce", "--quick", "--config", "TerDiT-Micro", "--no-progress"]
METRICS = ("fid", "inception_score", "precision", "recall", "class_acc", "eval_loss")
SEEDS = ("0", "1")  # the quick budget's seeds
DROP = 24  # terdit-lr-drop's step: 80% of the quick budget's 30
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_TESTED)


@pytest.fixture(scope="module")
def report(tmp_path_factory, shared_cache):
    """One quick report (TerDiT-Micro on digits, 30 steps, seeds 0 and 1 in two processes), then the same command
    again."""
    out = tmp_path_factory.mktemp("reproduce") / "rep"
    assert main([*QUICK, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    files = {p: p.stat().st_mtime_ns for p in out.glob("seed*/runs/**/*") if p.is_file()}
    evals = {p: p.read_text() for p in out.glob("seed*/evals/*.json")}
    assert main([*QUICK, "--out", str(out)]) == 0
    return {"out": out, "first": first, "second": json.loads((out / "results.json").read_text()),
            "files": files, "evals": evals}


def _final(r, seed: str, name: str, cfg: float = 1.5):
    return next(e for e in r["per_seed"][seed]["variants"][name]["evals"] if e["step"] == 30 and e["cfg"] == cfg)


def test_every_variant_is_trained_sampled_and_evaluated_for_every_seed(report):
    r, out = report["first"], report["out"]
    assert list(r["variants"]) == list(VARIANTS) and list(r["per_seed"]) == list(SEEDS)
    s = r["settings"]
    assert s["steps"] == 30 and s["eval_steps"] == [15, 30] and s["cfg"] == [1.5, 4.0] and s["seeds"] == [0, 1]
    for seed in SEEDS:
        assert (out / f"seed{seed}" / "results.json").is_file()
        for name, v in r["per_seed"][seed]["variants"].items():
            finals = {e["cfg"]: e for e in v["evals"] if e["step"] == 30}
            assert set(finals) == {1.5, 4.0}, name
            assert finals[1.5]["num_samples"] == 100 and finals[4.0]["num_samples"] == 50  # claims vs curves
            for e in finals.values():
                assert all(math.isfinite(e[k]) for k in METRICS), (name, e)
                assert len(e["per_class_acc"]) == 10 and (out / f"seed{seed}" / e["grid"]).is_file()
            lo, hi = finals[1.5]["fid_ci"]
            assert lo <= hi and math.isfinite(lo) and math.isfinite(hi)
            assert finals[1.5]["class_acc_ci"][0] <= finals[1.5]["class_acc"] <= finals[1.5]["class_acc_ci"][1]
            if v["kind"] == "trained":
                assert sorted({e["step"] for e in v["evals"]}) == [15, 30]
                assert all(e["num_samples"] == 50 for e in v["evals"] if e["step"] == 15)
                assert v["loss_steps"] == list(range(1, 31)) and all(math.isfinite(x) for x in v["loss"])
                assert v["train_s"] > 0 and math.isfinite(v["final_loss"])
                assert (out / f"seed{seed}" / v["run"] / "checkpoints" / "0000015").is_dir()
        assert _final(r, seed, "terdit-distilled")["distill_steps"] == 10
    for f in ("report.md", "results.json", "loss_curves.png", "metrics_vs_step.png",
              "adaln_scale.png", "samples_side_by_side.png", *(f"claim_{c}.png" for c in "abcdefg")):
        assert (out / f).is_file(), f
    text = (out / "report.md").read_text()
    assert "| Models | FID↓ | FID 95% CI ± | IS↑ | Precision↑ | Recall↑ | class acc↑" in text
    assert "## Criteria, fixed before the numbers" in text and "## Appendix: every seed" in text
    assert text.index("## Criteria") < text.index("## Last checkpoint")
    for c in r["claims"]:
        assert c["verdict"] in VERDICTS
        assert f"**({c['id']}) {c['claim']}: {c['verdict']}.**" in text
    assert [c["id"] for c in r["claims"]] == list("abcdefg")
    assert r["command"].startswith("terdit reproduce --out ") and "--steps 30" in r["command"]
    assert "--seeds 0 1" in r["command"]
    assert r["machine"]["torch"] == torch.__version__ and r["wall_s"] > 0 and set(r["seed_wall_s"]) == set(SEEDS)
    assert f"took {report['second']['wall_s']:.0f} s of wall time" in text  # report.md is the second run's
    train = sum(v.get("train_s") or 0 for sr in r["per_seed"].values() for v in sr["variants"].values())
    assert r["cost"]["train_s"] == pytest.approx(train) and r["cost"]["eval_s"] > 0
    assert report["second"]["cost"] == r["cost"]  # reused runs and evaluations keep their cost
    ledger = json.loads((report["out"] / "invocations.json").read_text())  # both commands, the study's wall time
    assert [e["wall_s"] for e in ledger] == [round(r["wall_s"], 1), round(report["second"]["wall_s"], 1)]
    assert report["second"]["invocations"] == ledger and r["invocations"] == ledger[:1]
    assert f"commands run on this folder (invocations.json) took {sum(e['wall_s'] for e in ledger) / 3600:.2f} h" \
        in text


def test_seeds_differ_and_are_summarized_as_mean_and_sd(report):
    r = report["first"]
    fids = [_final(r, seed, "terdit")["fid"] for seed in SEEDS]
    assert fids[0] != fids[1]  # other weights and other noise
    for name, v in r["variants"].items():
        e = next(e for e in v["evals"] if e["step"] == 30 and e["cfg"] == 1.5)
        for m in METRICS:
            vals = [_final(r, seed, name)[m] for seed in SEEDS]
            assert e[m]["mean"] == pytest.approx(sum(vals) / 2)
            assert e[m]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))  # sample sd of two values
        assert e["seeds"] == 2
    conv = r["convergence"]
    assert set(conv) == {n for n, v in VARIANTS.items() if v.trained}
    for name, c in conv.items():
        curve = {st: [next(e["fid_curve"] for e in r["per_seed"][seed]["variants"][name]["evals"]
                           if e["step"] == st and e["cfg"] == 1.5) for seed in SEEDS] for st in (15, 30)}
        change = np.mean(curve[30]) - np.mean(curve[15])
        assert c["change"] == pytest.approx(change)
        assert c["flattened"] == (abs(change) <= np.std(curve[30], ddof=1))


def _outcome(a: list[float], b: list[float], factor: float) -> str:
    """The verdict rule, restated: the difference of means against the sd of one seed's difference."""
    d = np.mean(a) - factor * np.mean(b)
    noise = math.sqrt(np.var(a, ddof=1) + factor ** 2 * np.var(b, ddof=1))
    return HELD if d < -noise else NOT_HELD if d > noise else INCONCLUSIVE


def test_claims_follow_from_the_per_seed_numbers(report):
    r = report["first"]

    def vals(name, key="fid"):
        if key == "final_loss":
            return [r["per_seed"][seed]["variants"][name]["final_loss"] for seed in SEEDS]
        return [_final(r, seed, name)[key] for seed in SEEDS]

    expected = {
        "a": [_outcome(vals("terdit"), vals("full-precision"), 1.25)],
        "b": [_outcome(vals("terdit"), vals("bitnet"), 1.0)],
        "c": [_outcome(vals("terdit"), vals(n), 0.5) for n in VARIANTS if n.startswith("ptq-")],
        "d": [_outcome(vals("terdit", "final_loss"), vals("terdit-no-norm", "final_loss"), 1.0),
              _outcome(vals("terdit"), vals("terdit-no-norm"), 1.0)],
        "e": [_outcome(vals("terdit-lr-drop"), vals("terdit"), 1.0)],
        "f": [_outcome(vals("terdit-a8"), vals("terdit"), 1.25)],
        "g": [_outcome(vals("terdit-distilled"), vals("terdit"), 1.25)],
    }
    for c in r["claims"]:
        assert [x["outcome"] for x in c["comparisons"]] == expected[c["id"]], c["id"]
        outs = expected[c["id"]]
        want = NOT_HELD if NOT_HELD in outs else HELD if all(o == HELD for o in outs) else INCONCLUSIVE
        assert c["verdict"] == want, c["id"]


def test_verdicts_are_inconclusive_within_the_seed_spread():
    """Synthetic per-seed numbers: a difference inside the spread between seeds decides nothing, whatever its sign."""
    a, b = [10.0, 12.0, 14.0], [11.0, 13.0, 15.0]  # A lower by 1, sd 2 each: noise 2.83
    assert compare(a, b)["outcome"] == INCONCLUSIVE
    assert compare(b, a)["outcome"] == INCONCLUSIVE
    assert compare(a, b)["seeds_holding"] == 3  # every seed agrees, yet the spread is larger than the difference
    r = compare([10.0, 10.5, 11.0], [20.0, 20.4, 21.0])  # far apart, tight seeds
    assert r["outcome"] == HELD and r["difference"] == pytest.approx(10.5 - 20.4667, abs=1e-3)
    assert compare([20.0, 20.4, 21.0], [10.0, 10.5, 11.0])["outcome"] == NOT_HELD
    # the factor scales B and its spread: 13 vs 1.25 x 10.5 = 13.125 is within noise; vs 1.25 x 20 it holds
    assert compare([12.0, 13.0, 14.0], [10.0, 10.5, 11.0], 1.25)["outcome"] == INCONCLUSIVE
    assert compare([12.0, 13.0, 14.0], [19.0, 20.0, 21.0], 1.25)["outcome"] == HELD
    assert compare([30.0, 31.0, 32.0], [10.0, 10.5, 11.0], 1.25)["outcome"] == NOT_HELD
    # one noisy seed is enough to make a mean difference inconclusive
    assert compare([10.0, 10.0, 40.0], [20.0, 20.0, 20.0])["outcome"] == INCONCLUSIVE
    assert compare([1.0, None, float("nan")], [])["outcome"] == NOT_TESTED
    assert compare([1.0], [2.0])["outcome"] == HELD  # one seed: no spread to measure, the plain comparison
    assert compare([2.0], [2.0])["outcome"] == INCONCLUSIVE


def test_a_claim_of_several_comparisons():
    assert all_of([HELD, HELD]) == HELD
    assert all_of([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([INCONCLUSIVE, NOT_HELD]) == NOT_HELD
    assert all_of([HELD, NOT_TESTED]) == NOT_TESTED and all_of([]) == NOT_TESTED


def test_variants_are_switches_of_one_recipe(report):
    out = report["out"]
    expect = {"full-precision": ("fp", False, None), "terdit": ("ternary", True, None),
              "terdit-no-norm": ("ternary", False, None), "bitnet": ("bitnet", False, None),
              "terdit-lr-drop": ("ternary", True, None), "terdit-a8": ("ternary", True, 8)}
    args = {(seed, n): json.loads((out / f"seed{seed}" / "runs" / n / "train_args.json").read_text())
            for n in expect for seed in SEEDS}
    for (seed, n), a in args.items():
        cfg = json.loads((out / f"seed{seed}" / "runs" / n / "config.json").read_text())
        assert (cfg["linear"], cfg["adaln_norm"], a.get("act_bits")) == expect[n], n
        assert a["seed"] == int(seed)
    shared = ("config", "steps", "batch_size", "lr", "ema_decay", "data", "grad_clip", "weight_decay")
    for key in shared:
        assert len({json.dumps(a[key]) for a in args.values()}) == 1, key
    for seed in SEEDS:
        drop = args[seed, "terdit-lr-drop"]
        assert drop["lr_drop_step"] == DROP and drop["lr_after_drop"] == 1e-4
    assert all(a["lr_drop_step"] is None for (_, n), a in args.items() if n != "terdit-lr-drop")


def test_lr_drop_run_continues_terdit_exactly(report, tmp_path):
    """The LR-drop run branches from terdit's checkpoint at 80% of the steps; the result equals training it from
    scratch."""
    r, out = report["first"], report["out"]
    v, t = r["per_seed"]["0"]["variants"]["terdit-lr-drop"], r["per_seed"]["0"]["variants"]["terdit"]
    assert v["status"] == f"branched from terdit at step {DROP}"
    assert v["loss"][:DROP] == t["loss"][:DROP] and v["loss"][DROP:] != t["loss"][DROP:]
    log = [json.loads(x) for x in (out / "seed0" / "runs" / "terdit-lr-drop" / "log.jsonl").read_text().splitlines()]
    assert {e["lr"] for e in log if e["step"] > DROP} == {1e-4}
    assert {e["lr"] for e in log if e["step"] <= DROP} == {5e-4}
    s = Settings(out=str(tmp_path), config="TerDiT-Micro", steps=30, batch_size=32, eval_every=15, progress=False,
                 seeds=[0], ema_horizon=3)
    args = train_args_for(VARIANTS["terdit-lr-drop"], s)
    Trainer(args).run()
    scratch = [json.loads(x)["loss"] for x in (Path(args.out) / "log.jsonl").read_text().splitlines()]
    assert scratch == v["loss"]


def test_a_longer_budget_continues_the_runs_exactly(tmp_path):
    """Raising --steps resumes each run (the EMA horizon does not scale with the budget, so it is the same run):
    terdit, resumed, still leaves the checkpoint the new LR drop branches from, and ends equal to a run trained
    to the longer budget from scratch (losses and EMA weights); a distilled run whose teacher (the full-precision
    run) trained further is refused rather than reused."""
    from safetensors.torch import load_file

    from terdit.experiments.runner import train_variants

    def study(out: Path, steps: int) -> Settings:
        return Settings(out=str(out), config="TerDiT-Micro", steps=steps, batch_size=8, eval_every=10,
                        ema_horizon=3, distill_steps=2, progress=False, seeds=[0])

    train_variants(["terdit", "terdit-distilled"], study(tmp_path / "a", 20))
    longer = study(tmp_path / "a", 30)
    _, runs, status = train_variants(["terdit", "terdit-lr-drop"], longer)
    assert status == {"terdit": "resumed", "terdit-lr-drop": f"branched from terdit at step {DROP}"}
    assert (runs["terdit"] / "checkpoints" / f"{DROP:07d}").is_dir()
    _, scratch, _ = train_variants(["terdit"], study(tmp_path / "b", 30))

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]

    assert losses(runs["terdit"]) == losses(scratch["terdit"]) and len(losses(scratch["terdit"])) == 30
    ema = [load_file(r["terdit"] / "checkpoints" / "0000030" / "ema.safetensors") for r in (runs, scratch)]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    train_variants(["full-precision"], longer)  # the teacher trains on to 30 steps
    with pytest.raises(TerditError, match="distilled from an earlier full-precision checkpoint"):
        train_variants(["terdit-distilled"], longer)


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if n.startswith("layers.") and n.split(".", 2)[-1] in BLOCK_LINEARS}


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("ptq-")])
def test_ptq_rows_use_the_real_quantizer(report, name):
    out = report["out"]
    method, granularity = VARIANTS[name].ptq
    run = out / "seed0" / "runs" / "full-precision"
    ckpt = run / "checkpoints" / "0000030"
    fp = load_run_model(run, checkpoint=ckpt)
    q, reports = ptq_model(run, method, granularity, ckpt)
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
    e = _final(report["first"], "0", name)
    assert e["ptq"]["max_levels_per_row"] <= levels and e["ptq"]["mean_rel_error"] > 0
    if granularity == "tensor":
        assert e["ptq"]["max_levels_per_tensor"] <= levels
    fp_e = _final(report["first"], "0", "full-precision")
    assert e["eval_loss"] != fp_e["eval_loss"]


def test_reported_metrics_match_an_independent_computation(report):
    """FID and class accuracy of seed 1's full-precision row, recomputed outside the report code (seed k samples
    with noise seed 1000 k)."""
    out, r = report["out"], report["first"]
    e = _final(r, "1", "full-precision")
    model = load_run_model(out / "seed1" / "runs" / "full-precision")
    labels = [k % 10 for k in range(100)]
    images = sample_latents(model, labels, cfg_scale=1.5, steps=10, seed=1000)
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
    for seed_results in report["second"]["per_seed"].values():
        assert all(v.get("status", "reused") == "reused" for v in seed_results["variants"].values())
    after = {p: p.stat().st_mtime_ns for p in report["out"].glob("seed*/runs/**/*") if p.is_file()}
    assert after == report["files"]  # nothing retrained or rewritten
    assert {p: p.read_text() for p in report["out"].glob("seed*/evals/*.json")} == report["evals"]
    strip = ("wall_s", "seed_wall_s", "machine", "sys_argv", "per_seed", "variants", "cost", "invocations")
    assert {k: v for k, v in report["second"].items() if k not in strip} == \
        {k: v for k, v in report["first"].items() if k not in strip}


def test_settings_that_differ_from_a_finished_run_are_refused(report, capsys):
    assert main([*QUICK, "--out", str(report["out"]), "--batch-size", "16"]) == 2
    assert "was trained with other settings" in capsys.readouterr().err


def test_impossible_metric_is_a_clear_error(tmp_path, capsys):
    assert main([*QUICK, "--out", str(tmp_path / "r"), "--data", str(tmp_path), "--metrics", "digits"]) == 2
    assert "--metrics digits needs the embedded 8x8 digits" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(TerditError, match="num-samples"):
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
            "--variants", "terdit", "ptq-2bit-channel", "--seeds", "0"]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["metric_mode"] == "loss" and r["real_data"] is None
    assert list(r["variants"]) == ["full-precision", "terdit", "ptq-2bit-channel"]  # PTQ needs the fp run
    for v in r["per_seed"]["0"]["variants"].values():
        for e in v["evals"]:
            assert math.isfinite(e["eval_loss"]) and "fid" not in e
    grid = out / "seed0" / r["per_seed"]["0"]["variants"]["terdit"]["evals"][-1]["grid"]
    from PIL import Image

    assert Image.open(grid).mode == "RGB"  # decoded by the VAE to 3-channel images
    claims = {c["id"]: c for c in r["claims"]}
    assert claims["b"]["verdict"] == NOT_TESTED and claims["a"]["verdict"] in (HELD, NOT_HELD, INCONCLUSIVE)
    assert "eval loss" in claims["a"]["criterion"]
    assert "not tested" in (out / "report.md").read_text()


def test_report_template_gives_back_the_committed_report():
    """report.md.tmpl renders the committed docs/reproduce/results.json as the committed report.md (all but the
    note appended to it by hand)."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "reproduce"
    text = render_report(json.loads((docs / "results.json").read_text()))
    assert text.startswith("# TerDiT at small scale") and (docs / "report.md").read_text().startswith(text)
