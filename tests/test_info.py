"""`terdit info`: parameter counts, bits per weight, size on disk and the memory estimate."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from random_models import train_micro_run

from terdit.cli import info as info_cli
from terdit.deploy import export_model
from terdit.errors import TerditError
from terdit.loading import info
from terdit.models import TerDiT, get_config


def run_info(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    info_cli.register(parser.add_subparsers())
    args = parser.parse_args(["info", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def closed_form_ternary(dim: int, depth: int, hidden: int, cond: int) -> int:
    return depth * (4 * dim * dim + 3 * dim * hidden + 6 * dim * cond)


def test_config_name_counts_and_bits(capsys):
    report = json.loads(run_info(capsys, "TerDiT-Micro", "--json"))
    cfg = get_config("TerDiT-Micro")
    model = TerDiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    p = report["parameters"]
    assert p["total"] == total
    assert p["ternary"] == closed_form_ternary(cfg.dim, cfg.depth, cfg.ffn_hidden, cfg.cond_dim)
    assert p["full_precision"] == total - p["ternary"] and p["ternary_layers"] == 8 * cfg.depth
    s = report["storage"]
    assert s["fp32"]["total_bytes"] == 4 * total and s["bf16"]["total_bytes"] == 2 * total
    # 2bit: 4 codes per byte along output rows (all Micro out dims are multiples of 4) -> exactly 2 bits
    assert s["2bit"]["bits_per_ternary_weight"] == 2.0
    assert s["2bit"]["total_bytes"] == p["ternary"] // 4 + 4 * p["full_precision"]
    # base3: 5 codes per byte along input rows; Micro's in dims are 32 (-> 7 bytes) and 96 (-> 20 bytes)
    shapes = [(m.out_features, m.in_features) for m in model.ternary_layers().values()]
    base3 = sum(o * math.ceil(i / 5) for o, i in shapes)
    assert s["base3"]["ternary_bytes"] == base3
    assert report["on_disk"] is None and report["source"]["kind"] == "config"
    assert report["entropy_bits_per_ternary_weight"] == pytest.approx(1.58496, abs=1e-5)


def test_paper_size_is_described_without_allocating(capsys):
    text = run_info(capsys, "TerDiT-600M", "--resolution", "512")
    assert "609,885,856" in text and "64x64x4" in text and "1024 tokens" in text


def test_memory_estimate_matches_the_documented_formula():
    cfg = get_config("TerDiT-Micro")
    report = info.describe("TerDiT-Micro", resolution=128, batch_size=3)
    m = report["memory"]
    side = 128 // 8
    tokens = (side // 2) ** 2
    rows = 6  # 3 images, doubled by guidance
    d, h, heads = cfg.dim, cfg.ffn_hidden, cfg.n_heads
    total = report["parameters"]["total"]
    largest = max(o * i for o, i in [(d, d), (h, d), (d, h), (6 * d, cfg.cond_dim)])
    assert m["tokens"] == tokens and m["model_input"] == f"{side}x{side}x4" and m["forward_rows"] == rows
    fp32 = m["sampling"]["fp32"]
    assert fp32["weights"] == 4 * (total + largest)
    assert fp32["activations"] == 4 * rows * tokens * (2 * d + max(4 * d, 3 * h))
    assert fp32["activations_math_sdpa"] == 4 * rows * tokens * (2 * d + max(4 * d + heads * tokens, 3 * h))
    assert m["sampling"]["bf16"]["activations"] * 2 == fp32["activations"]
    assert info.describe("TerDiT-Micro")["memory"]["resolution"] == 64  # native: 8x8 latents x 8
    with pytest.raises(TerditError, match="not a multiple"):
        info.describe("TerDiT-Micro", resolution=100)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_micro_run(tmp_path_factory.mktemp("info") / "run", steps=1)


def test_run_folder(run_dir, capsys):
    report = json.loads(run_info(capsys, str(run_dir), "--json"))
    ema = run_dir / "checkpoints" / "0000001" / "ema.safetensors"
    disk = report["on_disk"]
    assert report["source"]["kind"] == "run" and report["config"]["in_channels"] == 1
    assert disk["bytes"] == ema.stat().st_size and disk["format"] == "fp32"
    assert disk["elements_by_dtype"]["fp32"] == report["parameters"]["total"]
    assert report["memory"]["resolution"] == 8  # digits: pixel space
    assert "on disk" in run_info(capsys, str(run_dir))


@pytest.mark.parametrize("fmt,bits", [("2bit", 2.0), ("base3", 1.6)])
def test_deploy_and_pretrained_directories(tmp_path, capsys, fmt, bits):
    model = TerDiT(get_config("TerDiT-Micro", dim=40, n_heads=2, multiple_of=40))  # in dims divisible by 5
    export_model(model, tmp_path / "d", fmt)
    report = json.loads(run_info(capsys, str(tmp_path / "d"), "--json"))
    assert report["source"]["kind"] == "deploy" and report["deploy"]["format"] == fmt
    assert report["on_disk"]["bytes"] == (tmp_path / "d" / "model.safetensors").stat().st_size
    assert report["on_disk"]["format"].startswith(f"{fmt} packed")
    assert report["on_disk"]["elements_by_dtype"]["uint8"] == report["storage"][fmt]["ternary_bytes"]
    assert report["storage"][fmt]["bits_per_ternary_weight"] == pytest.approx(bits)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "p")
    report = info.describe(str(tmp_path / "p"))
    assert report["source"]["kind"] == "pretrained" and report["on_disk"]["format"] == "bf16"


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(TerditError, match="neither a config name"):
        info.describe(str(tmp_path / "missing"))
    with pytest.raises(TerditError, match="not a run folder"):
        info.describe(str(tmp_path))


def test_terdit_info_through_the_cli(capsys, tmp_path):
    from terdit import cli

    assert cli.main(["info", "TerDiT-Micro", "--batch-size", "2"]) == 0
    assert "batch 2 with guidance (4 rows)" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "nope")]) == 2
    assert "terdit info: error:" in capsys.readouterr().err
