"""Bad input -> TerditError naming the file or tensor; the deploy CLI; the benchmark smoke run."""

from __future__ import annotations

import argparse
import json
import shutil
import struct

import pytest
import torch

from terdit.cli import deploy as deploy_cli
from terdit.deploy import export_model, load_deployed
from terdit.deploy.bench import format_table, run_bench
from terdit.deploy.format import WEIGHTS_FILE
from terdit.deploy.tensorfile import TensorFile
from terdit.errors import TerditError
from terdit.io import load_tensors, save_tensors
from terdit.models import TerDiT, get_config


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return export_model(model, tmp_path_factory.mktemp("d") / "dep", "2bit")


def edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_tensors(dst / WEIGHTS_FILE)
    edit(tensors)
    save_tensors(dst / WEIGHTS_FILE, tensors)
    return dst


def test_truncated_file(deploy_dir, tmp_path):
    shutil.copytree(deploy_dir, tmp_path / "t")
    f = tmp_path / "t" / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TerditError, match=r"model\.safetensors.*(truncated|past the end)"):
        load_deployed(tmp_path / "t")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello",
        b"\x00" * 64,
        struct.pack("<Q", 10) + b"not json!!" + b"x" * 8,
        struct.pack("<Q", 2) + b"[]",
    ],
)
def test_foreign_file(deploy_dir, tmp_path, content):
    shutil.copytree(deploy_dir, tmp_path / "f")
    (tmp_path / "f" / WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(TerditError, match="model.safetensors"):
        load_deployed(tmp_path / "f")


def test_missing_tensor(deploy_dir, tmp_path):
    d = edited_copy(deploy_dir, tmp_path / "m", lambda t: t.pop("layers.1.attention.wk.alphas"))
    with pytest.raises(TerditError, match=r"layers\.1\.attention\.wk\.alphas.*missing"):
        load_deployed(d)


def test_wrong_shape(deploy_dir, tmp_path):
    def edit(t):
        t["layers.0.feed_forward.w2.weight"] = t["layers.0.feed_forward.w2.weight"][:, :-1].contiguous()

    with pytest.raises(TerditError, match=r"layers\.0\.feed_forward\.w2\.weight.*shape"):
        load_deployed(edited_copy(deploy_dir, tmp_path / "s", edit))
    d = edited_copy(deploy_dir, tmp_path / "s2", lambda t: t.update({"x_embedder.bias": torch.zeros(5)}))
    with pytest.raises(TerditError, match=r"x_embedder\.bias.*shape"):
        load_deployed(d)


def test_codes_of_3(deploy_dir, tmp_path):
    def edit(t):
        t["layers.1.adaLN_modulation.1.weight"][3, 4] = 0xFF

    with pytest.raises(TerditError, match=r"layers\.1\.adaLN_modulation\.1\.weight.*code 3"):
        load_deployed(edited_copy(deploy_dir, tmp_path / "c", edit))


def test_unexpected_tensor_and_float_packed(deploy_dir, tmp_path):
    d = edited_copy(deploy_dir, tmp_path / "u", lambda t: t.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(TerditError, match="unexpected tensors.*extra.weight"):
        load_deployed(d)

    def edit(t):
        t["layers.0.attention.wq.weight"] = t["layers.0.attention.wq.weight"].float()

    with pytest.raises(TerditError, match=r"layers\.0\.attention\.wq\.weight.*uint8"):
        load_deployed(edited_copy(deploy_dir, tmp_path / "fl", edit))


def test_bad_config_and_paths(deploy_dir, tmp_path):
    with pytest.raises(TerditError, match="does not exist"):
        load_deployed(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TerditError, match="neither a deploy directory"):
        load_deployed(tmp_path / "empty")
    shutil.copytree(deploy_dir, tmp_path / "cfg")
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    cfg["deploy"]["format"] = "4bit"
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TerditError, match="format"):
        load_deployed(tmp_path / "cfg")
    with pytest.raises(TerditError, match="policy"):
        load_deployed(deploy_dir, policy="fast")


def test_tensorfile_reads_what_safetensors_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(7, dtype=torch.uint8),
        "c": torch.randn(2).bfloat16(),
        "e": torch.zeros(0, 3),
    }
    save_tensors(tmp_path / "x.safetensors", tensors)
    f = TensorFile(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v)
    with pytest.raises(TerditError, match="'zz' is missing"):
        f.read("zz")


def parse(argv):
    parser = argparse.ArgumentParser()
    deploy_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_export_quantize_convert(deploy_dir, tmp_path, capsys):
    with pytest.raises(TerditError):
        args = parse(["export", str(tmp_path / "norun"), "--out", str(tmp_path / "o")])
        args.func(args)
    with pytest.raises(TerditError, match="not a release"):
        args = parse(["convert", str(deploy_dir), "--out", str(tmp_path / "o")])
        args.func(args)
    with pytest.raises(SystemExit):
        parse(["export", "r", "--out", "o", "--format", "3bit"])
    args = parse(["bench", "--config", "TerDiT-Micro"])
    assert args.format == ["2bit"] and args.policy == ["memory", "speed"] and args.batch_size == 2


def test_bench_smoke(capsys):
    """The benchmark end to end on a tiny config (two worker processes)."""
    result = run_bench("TerDiT-Micro", ["base3"], ["memory"], repeats=1, log=lambda m: None)
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"fp32", "base3/memory"}
    assert result["forward_rows"] == 4
    assert result["size_ratio_fp32_over_packed"]["base3"] > 1
    assert set(result["packed_size_bytes"]) == {"base3", "base3+bf16", "base3+int8"}
    assert rows["base3/memory"]["peak_step_mb"] > 0 and rows["base3/memory"]["time_ratio_vs_fp32"] > 0
    assert "base3/memory" in format_table(result)
