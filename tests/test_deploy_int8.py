"""Int8 rows for the large full-precision matrices of a deploy directory (`terdit export --int8`)."""

from __future__ import annotations

import pytest
import torch
from random_models import random_micro

import terdit.quant.int8 as int8_mod
from terdit.deploy import export_model, load_deployed
from terdit.deploy.format import WEIGHTS_FILE, read_config
from terdit.deploy.tensorfile import TensorFile
from terdit.errors import TerditError
from terdit.io import load_tensors, save_tensors
from terdit.quant.int8 import SCALE_SUFFIX, dequantize_rows, quantize_rows


def test_quantize_rows_error_bound_and_exact_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 300, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scale
    w[5] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    # scale is max|row| / 127, so the largest weight of each row maps to +-127 exactly
    torch.testing.assert_close(scale, w.abs().amax(1) / 127, rtol=0, atol=0)
    assert int(q.abs().amax(1)[0]) == 127 and not bool(q[5].any())
    err = (dequantize_rows(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())  # at most half a step per weight
    # values already on the grid come back exactly
    grid = torch.arange(-127, 128, dtype=torch.float32)[None].repeat(3, 1) * torch.tensor([[0.5], [2.0], [0.125]])
    torch.testing.assert_close(dequantize_rows(*quantize_rows(grid)), grid, rtol=0, atol=0)


@pytest.fixture
def int8_everywhere(monkeypatch):
    """Micro's matrices are small: make every 2-D float tensor eligible."""
    monkeypatch.setattr(int8_mod, "MIN_NUMEL", 1)


def test_export_int8_loads_dequantized_weights(tmp_path, int8_everywhere):
    model = random_micro(seed=3)
    export_model(model, tmp_path / "dep", "2bit", dtype="fp32", int8=True)
    _, info = read_config(tmp_path / "dep")
    floats = {k: v for k, v in model.state_dict().items() if v.dim() == 2 and "layers." not in k}
    assert set(info.int8_rows) == set(floats)
    stored = TensorFile(tmp_path / "dep" / WEIGHTS_FILE)
    dep = load_deployed(tmp_path / "dep")
    for key, w in floats.items():
        assert stored.dtype(key) == torch.int8 and stored.shape(key + SCALE_SUFFIX) == (w.shape[0],)
        got = dep.state_dict()[key]
        q, scale = quantize_rows(w)  # computed here, independently of the file
        torch.testing.assert_close(got, q.float() * scale[:, None], rtol=0, atol=0)
        assert float((got - w).abs().max()) <= float(scale.max()) / 2 * (1 + 1e-5)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, out = model(x, t, y).sample, dep(x, t, y).sample
    assert not torch.equal(out, ref)  # lossy ...
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)  # ... but close


def test_int8_smaller_file(tmp_path, int8_everywhere):
    model = random_micro(seed=4)
    export_model(model, tmp_path / "a", "base3", dtype="bf16")
    export_model(model, tmp_path / "b", "base3", dtype="bf16", int8=True)
    a, b = ((tmp_path / d / WEIGHTS_FILE).stat().st_size for d in "ab")
    assert b < a


def test_int8_bad_files(tmp_path, int8_everywhere):
    export_model(random_micro(seed=5), tmp_path / "dep", "2bit", int8=True)
    key = "final_layer.adaLN_modulation.1.weight"
    tensors = load_tensors(tmp_path / "dep" / WEIGHTS_FILE)
    for change, message in (
        (lambda t: t.pop(key + SCALE_SUFFIX), "_scale' is missing"),
        (lambda t: t.__setitem__(key, t[key].float()), "int8_rows but has dtype"),
        (lambda t: t.__setitem__(key + SCALE_SUFFIX, -t[key + SCALE_SUFFIX]), "finite and >= 0"),
        (lambda t: t.__setitem__(key + SCALE_SUFFIX, t[key + SCALE_SUFFIX][:-1]), "has shape"),
    ):
        bad = dict(tensors)
        change(bad)
        save_tensors(tmp_path / "dep" / WEIGHTS_FILE, bad)
        with pytest.raises(TerditError, match=message):
            load_deployed(tmp_path / "dep")
