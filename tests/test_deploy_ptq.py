"""Post-training quantization: a faithful RTN quantizer, checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.optimize import minimize_scalar

from terdit.deploy.quantize import quantize_run
from terdit.errors import TerditError
from terdit.io import save_tensors
from terdit.models import TerDiT, get_config
from terdit.models.runs import load_run_model
from terdit.quant.ptq import fake_quantize, quantize_model, quantize_ternary, quantize_uniform


def heavy_tailed(out=24, inp=40, seed=0) -> torch.Tensor:
    """Rows with very different scales, where per-channel scaling should matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((out, inp)) * 0.02
    return w * torch.logspace(-1, 1, out).unsqueeze(1) + 0.001 * torch.randn(out, inp, generator=g)


def test_ternary_scale_is_l2_optimal():
    w = heavy_tailed()
    codes, alpha = quantize_ternary(w, "tensor")
    wd, cd = w.double().numpy(), codes.double().numpy()  # the objective in float64, outside torch
    best = minimize_scalar(
        lambda a: float(((wd - a * cd) ** 2).sum()),
        bounds=(0, 1),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert alpha.item() == pytest.approx(best.x, rel=1e-4)
    codes_c, alpha_c = quantize_ternary(w, "channel")
    cc = codes_c.double().numpy()
    for r in (0, 11, 23):
        best = minimize_scalar(
            lambda a, r=r: float(((wd[r] - a * cc[r]) ** 2).sum()),
            bounds=(0, 10),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert alpha_c[r].item() == pytest.approx(best.x, rel=1e-4)
    # codes follow the absmean threshold: |w| >= gamma / 2 -> +-1 (tensor granularity)
    gamma = w.abs().mean()
    assert torch.equal(codes.abs().bool(), (w.abs() / (gamma + 1e-6)).round().clamp(max=1).bool())


@pytest.mark.parametrize("method", ["ternary", "2bit"])
def test_per_channel_beats_per_tensor_and_values_on_grid(method):
    w = heavy_tailed(seed=1)
    err = {g: float((fake_quantize(w, method, g) - w).norm()) for g in ("tensor", "channel")}
    assert err["channel"] < err["tensor"]  # (2-bit min-max per tensor can exceed ||W||: 0 is off its grid)
    wq = fake_quantize(w, method, "channel")
    levels = 3 if method == "ternary" else 4
    assert all(len(set(row.tolist())) <= levels for row in wq)
    assert len(set(fake_quantize(w, method, "tensor").flatten().tolist())) <= levels


def test_2bit_grid_and_extremes():
    w = heavy_tailed(seed=2)
    q, scale, lo = quantize_uniform(w, 2, "channel")
    wq = fake_quantize(w, "2bit", "channel")
    k = (wq - lo) / scale
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert int(k.round().min()) >= 0 and int(k.round().max()) <= 3
    torch.testing.assert_close(wq.amin(1), w.amin(1))  # min and max are exactly representable
    torch.testing.assert_close(wq.amax(1), w.amax(1))
    # round to nearest: no weight is farther than half a step from its level
    assert bool(((wq - w).abs() <= scale / 2 + 1e-6).all())
    # a constant row does not divide by zero
    assert torch.equal(fake_quantize(torch.full((2, 5), 0.3), "2bit", "channel"), torch.full((2, 5), 0.3))


def fp_model(seed=0) -> TerDiT:
    torch.manual_seed(seed)
    model = TerDiT(get_config("TerDiT-Micro", ternary=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("method,levels", [("ternary", 3), ("2bit", 4)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantize_model_block_linears(method, levels, granularity):
    model = fp_model()
    before = model.x_embedder.weight.clone()
    reports = quantize_model(model, method, granularity)
    assert len(reports) == 8 * model.config.depth
    for block in model.layers:
        for lin in (block.attention.wq, block.attention.wo, block.feed_forward.w2, block.adaLN_modulation[1]):
            w = lin.weight
            if granularity == "tensor":
                assert w.unique().numel() <= levels
            else:
                assert all(row.unique().numel() <= levels for row in w)
    assert torch.equal(model.x_embedder.weight, before)  # full-precision layers untouched
    assert all(0 < r.rel_error < 1 for r in reports)


def test_quantize_run_writes_a_run(tmp_path):
    model = fp_model(seed=1)
    run = tmp_path / "run"
    model.config.save(run / "config.json")
    ckpt = run / "checkpoints" / "0000100"
    ckpt.mkdir(parents=True)
    save_tensors(ckpt / "model.safetensors", fp_model(seed=2).state_dict())
    save_tensors(ckpt / "ema.safetensors", model.state_dict())
    quantize_run(run, tmp_path / "q", "ternary", "channel")
    q = load_run_model(tmp_path / "q")  # the unchanged run loader
    assert q.config.linear == "fp"
    assert all(row.unique().numel() <= 3 for row in q.layers[0].feed_forward.w1.weight)
    expected = fake_quantize(model.layers[0].feed_forward.w1.weight.detach(), "ternary", "channel")
    assert torch.equal(q.layers[0].feed_forward.w1.weight, expected)  # quantized from the EMA weights
    meta = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert meta["method"] == "ternary" and meta["granularity"] == "channel" and len(meta["layers"]) == 16
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(q(x, torch.tensor([1, 2]), torch.tensor([0, 1])).sample).all()


def test_quantize_rejects_ternary_run(tmp_path):
    model = TerDiT(get_config("TerDiT-Micro"))
    run = tmp_path / "run"
    model.config.save(run / "config.json")
    (run / "checkpoints" / "0000001").mkdir(parents=True)
    save_tensors(run / "checkpoints" / "0000001" / "ema.safetensors", model.state_dict())
    with pytest.raises(TerditError, match="ternary"):
        quantize_run(run, tmp_path / "q", "ternary")
    with pytest.raises(TerditError, match="method"):
        fake_quantize(torch.ones(2, 2), "int3")
