"""TernaryLinear's fused training path (issue 16) against the straight-through definition, computed
independently in float64 from the eager quantizer's codes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from terdit.quant import TernaryLinear, ternarize, ternary_weight
from terdit.quant import ternary as T

EPS = 1e-6


def _definition_codes(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return (w / (gamma + EPS)).round().clamp(-1, 1)


# -- the codes without a division ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_codes_given_gamma_is_the_definition_bit_for_bit(dtype, granularity):
    torch.manual_seed(0)
    w = (torch.randn(64, 96) * 0.02).to(dtype)
    gamma = T.absmean(w, granularity)
    # values at and around the threshold d / 2 (and d * 1.5, where round would give 2), for every row
    d = gamma + EPS
    h = (d * 0.5).expand(64, 1).to(dtype)
    inf = torch.full_like(h, math.inf)
    edge = torch.cat([h, -h, torch.nextafter(h, inf), torch.nextafter(h, -inf), -torch.nextafter(h, inf),
                      -torch.nextafter(h, -inf), (d * 1.5).expand(64, 1).to(dtype), torch.zeros_like(h)], dim=1)
    w = torch.cat([w[:, : 96 - edge.shape[1]], edge], dim=1)
    got = T.codes_given_gamma(w, gamma)
    want = _definition_codes(w, gamma)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)  # == treats -0.0 and 0.0 alike, the only difference allowed
    assert set(got.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_codes_given_gamma_on_a_grid_of_ratios():
    """Every float32 w / d near +-0.5 for many d: the rounded quotient and the compare agree."""
    d = torch.rand(200, 1, dtype=torch.float64).mul(3).add(1e-3).float()
    steps = torch.arange(-64, 65, dtype=torch.float32)
    base = d * 0.5
    w = base + steps * torch.finfo(torch.float32).eps * base  # ~ulps around d / 2
    w = torch.cat([w, -w], dim=1)
    gamma = d - EPS
    assert torch.equal(T.codes_given_gamma(w, gamma), _definition_codes(w, gamma))


@pytest.fixture(autouse=True)
def fused_at_every_size(monkeypatch, request):
    """The layers here are small; the fused path is tested on them with the size threshold lifted."""
    if "threshold" not in request.node.name:
        monkeypatch.setattr(T, "FUSED_MIN_WEIGHT", 0)


def test_the_size_threshold_keeps_small_layers_eager():
    """Below FUSED_MIN_WEIGHT weights a training forward takes the eager quantizer (no codes buffer); at it, the
    fused path (the buffer holds the codes); both give the reference's output."""
    for in_f, out_f, fused in ((64, 32, False), (512, T.FUSED_MIN_WEIGHT // 512, True)):
        layer = TernaryLinear(in_f, out_f, bias=False)
        x = torch.randn(3, in_f, requires_grad=True)
        y = layer(x)
        assert (layer._codes_buffer.tensor is not None) == fused, (in_f, out_f)
        assert torch.allclose(y, F.linear(x, layer.quantized_weight()), atol=1e-5)


# -- forward and gradients against float64 -------------------------------------------------------------------
def _layer(in_f, out_f, bias, granularity, dtype=torch.float32, seed=0, alpha=0.37):
    """A layer whose weights sit at least 1e-4 (relative) away from the rounding threshold, so a last-bit
    difference in gamma's summation order cannot flip a code between the fused path and the reference."""
    for s in range(seed, seed + 50):
        torch.manual_seed(s)
        layer = TernaryLinear(in_f, out_f, bias=bias, granularity=granularity, dtype=dtype)
        with torch.no_grad():
            layer.alphas.fill_(alpha)
            if bias:
                layer.bias.normal_()
        w = layer.weight.detach().double()
        h = (T.absmean(w, granularity) + EPS) / 2
        if ((w.abs() - h).abs() / h).min() > 1e-4:
            return layer
    raise AssertionError("no weight draw away from the threshold")


def _reference(layer: TernaryLinear, x: torch.Tensor, g: torch.Tensor):
    """y and (dx, dW, dalpha, dbias) of y = x (alpha C)^T + b in float64, C the eager quantizer's codes:
    dW = alpha g^T x (straight through), dalpha = sum(g^T x * C)."""
    codes = ternarize(layer.weight.detach(), layer.granularity)[0].double()
    a = layer.alphas.detach().double()
    x64, g64 = x.detach().double().reshape(-1, x.shape[-1]), g.double().reshape(-1, g.shape[-1])
    y = x64 @ (a * codes).T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    gw_eff = g64.T @ x64
    grads = (g64 @ (a * codes), a * gw_eff, (gw_eff * codes).sum().reshape(1),
             None if layer.bias is None else g64.sum(0))
    return y.reshape(*x.shape[:-1], -1), grads


def _run(layer: TernaryLinear, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    grads = (x.grad, layer.weight.grad, layer.alphas.grad, None if layer.bias is None else layer.bias.grad)
    layer.zero_grad(set_to_none=True)
    return y, grads


CASES = [  # (batch shape, in, out): both sides of scale_output, 2-d and 3-d inputs
    ((5,), 32, 24),  # output side (rows < 0.6 in)
    ((3, 1), 128, 40),  # output side, 3-d
    ((200,), 64, 16),  # weight side
    ((4, 16), 48, 80),  # weight side, 3-d
    ((8,), 512, 96),  # few rows, wide input (output side, alpha scales the output)
    ((6,), 64, 192),  # adaLN-like: few rows, out = 3 in (output side, alpha scales the input)
    ((2, 3), 96, 96),  # square, 3-d (output side, input scaled)
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,in_f,out_f", CASES)
def test_forward_and_gradients_match_float64_reference(shape, in_f, out_f, bias, granularity, dtype, tol):
    layer = _layer(in_f, out_f, bias, granularity, dtype)
    torch.manual_seed(1)
    x = torch.randn(*shape, in_f, dtype=dtype)
    g = torch.randn(*shape, out_f, dtype=dtype)
    y, grads = _run(layer, x, g)
    y_ref, grads_ref = _reference(layer, x, g)
    scale = lambda t: max(1.0, float(t.abs().max()))  # noqa: E731 - relative to the largest entry
    assert y.dtype == dtype and y.shape == (*shape, out_f)
    assert (y.double() - y_ref).abs().max() <= tol * scale(y_ref)
    for name, got, want in zip(("x", "weight", "alpha", "bias"), grads, grads_ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == dtype, name
        assert (got.double().reshape(want.shape) - want).abs().max() <= tol * scale(want), name


@pytest.mark.parametrize("shape,in_f,out_f,granularity", [
    ((200,), 64, 16, "tensor"), ((4, 16), 48, 80, "row"),  # weight side: the terdit::ternary_* ops
    ((8,), 512, 96, "tensor"),  # output side: traced into the graph
])
def test_compiled_layer_matches_float64_reference(shape, in_f, out_f, granularity):
    """The layer traced by torch.compile (as in `terdit train --compile`'s blocks): the same forward and
    gradients as the float64 reference; on the weight side its codes and weight gradients run as the two custom
    ops, each the separately compiled function, at every call (not traced into the graph)."""
    layer = _layer(in_f, out_f, True, granularity)
    torch.manual_seed(1)
    x = torch.randn(*shape, in_f)
    g = torch.randn(*shape, out_f)
    y_ref, grads_ref = _reference(layer, x, g)
    torch._dynamo.reset()
    layer.compile()
    _run(layer, x, g)  # compiles
    with torch.profiler.profile() as prof:
        y, grads = _run(layer, x, g)
    if not T.qat_compile_enabled():
        pytest.skip("torch.compile is not available here")
    ops = sorted(e.key for e in prof.key_averages() if e.key.startswith("terdit::"))
    weight_side = not T.scale_output(x.numel() // in_f, in_f)
    assert ops == (["terdit::ternary_scaled_codes", "terdit::ternary_weight_grads"] if weight_side else []), ops
    scale = lambda t: max(1.0, float(t.abs().max()))  # noqa: E731
    assert (y.double() - y_ref).abs().max() <= 2e-5 * scale(y_ref)
    for name, got, want in zip(("x", "weight", "alpha", "bias"), grads, grads_ref):
        assert (got.double().reshape(want.shape) - want).abs().max() <= 2e-5 * scale(want), name


def test_both_sides_of_scale_output_are_exercised():
    assert T.scale_output(5, 32) and T.scale_output(8, 512)
    assert not T.scale_output(200, 64) and not T.scale_output(64, 48)


def test_without_autograd_the_layer_is_bit_identical_to_quantized_weight():
    """Sampling, export and packing read the eager quantizer: unchanged, bit for bit."""
    layer = _layer(64, 32, True, "tensor")
    x = torch.randn(7, 64)
    with torch.no_grad():
        want = F.linear(x, layer.quantized_weight(), layer.bias)
        assert torch.equal(layer(x), want)
    with torch.inference_mode():
        assert torch.equal(layer(x), want)
    frozen = copy.deepcopy(layer).requires_grad_(False)
    assert torch.equal(frozen(x), want)


def test_training_forward_equals_the_eager_composite():
    """The fused path against the pre-issue-16 forward (F.linear of ternary_weight), on both sides."""
    for rows, in_f in ((4, 64), (300, 64)):
        layer = _layer(in_f, 40, True, "tensor")
        x = torch.randn(rows, in_f)
        old = F.linear(x, ternary_weight(layer.weight, layer.alphas), layer.bias)
        assert torch.allclose(layer(x), old, atol=1e-5, rtol=1e-5)


def test_eager_fallback_computes_the_same(monkeypatch):
    layer = _layer(96, 48, True, "row")
    torch.manual_seed(2)
    for rows in (4, 256):
        x, g = torch.randn(rows, 96), torch.randn(rows, 48)
        y_c, grads_c = _run(layer, x, g)
        monkeypatch.setenv("TERDIT_QAT_COMPILE", "0")
        assert not T.qat_compile_enabled()
        y_e, grads_e = _run(layer, x, g)
        monkeypatch.delenv("TERDIT_QAT_COMPILE")
        assert torch.allclose(y_c, y_e, atol=1e-5)
        for a, b in zip(grads_c, grads_e):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_a_failed_compile_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setattr(T, "_COMPILED", {})
    monkeypatch.setattr(T, "_compile_failed", False)

    def broken(fn):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    layer = _layer(32, 16, False, "tensor")
    x, g = torch.randn(3, 32), torch.randn(3, 16)
    with pytest.warns(UserWarning, match="running eagerly"):
        y, grads = _run(layer, x, g)
    assert not T.qat_compile_enabled()
    y_ref, grads_ref = _reference(layer, x, g)
    assert torch.allclose(y.double(), y_ref, atol=1e-5)
    assert torch.allclose(grads[1].double(), grads_ref[1], atol=1e-5)


@pytest.mark.parametrize("rows,in_f,out_f", [(4, 64, 32), (4, 32, 64), (256, 64, 32)])  # output side (alpha on
def test_autocast_bf16_matches_the_eager_composite(rows, in_f, out_f):  # the output, the input), weight side
    layer = _layer(in_f, out_f, True, "tensor")
    x, g = torch.randn(rows, in_f), torch.randn(rows, out_f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = _run(layer, x, g)
        xr = x.clone().requires_grad_(True)
        yr = F.linear(xr, ternary_weight(layer.weight, layer.alphas), layer.bias)
        (yr * g).sum().backward()
    assert y.dtype == yr.dtype == torch.bfloat16
    assert torch.allclose(y.float(), yr.float(), atol=0.05, rtol=0.02)
    for got, want in zip(grads, (xr.grad, layer.weight.grad, layer.alphas.grad, layer.bias.grad)):
        assert got.dtype == want.dtype
        assert torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.03)


def test_act_bits_goes_through_the_fused_path():
    layer = _layer(64, 32, False, "tensor")
    layer.act_bits = 8
    x, g = torch.randn(5, 64), torch.randn(5, 32)
    y, grads = _run(layer, x, g)
    xq = T.quantize_activations(x)
    y_ref, grads_ref = _reference(layer, xq, g)
    assert torch.allclose(y.double(), y_ref, atol=1e-5)
    assert torch.allclose(grads[0].double(), grads_ref[0], atol=1e-5)  # STE through the activation quantizer
    assert torch.allclose(grads[1].double(), grads_ref[1], atol=1e-5)


# -- the codes buffer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [4, 256])
def test_codes_buffer_is_reused_across_steps_and_follows_the_weight(rows):
    layer = _layer(64, 32, True, "tensor")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    x, g = torch.randn(rows, 64), torch.randn(rows, 32)
    ptrs = set()
    for _ in range(3):
        y, grads = _run(layer, x, g)
        y_ref, grads_ref = _reference(layer, x, g)  # the current weight's codes, not a stale copy
        assert torch.allclose(y.double(), y_ref, atol=1e-5)
        assert torch.allclose(grads[1].double(), grads_ref[1], atol=1e-5)
        ptrs.add(layer._codes_buffer.tensor.data_ptr())
        for p, gr in zip((layer.weight, layer.alphas, layer.bias), grads[1:]):
            p.grad = gr
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(ptrs) == 1


@pytest.mark.parametrize("rows", [4, 256])
def test_codes_buffer_is_not_overwritten_while_a_graph_holds_it(rows):
    """Two forwards with different weights before either backward: each graph keeps its own codes."""
    layer = _layer(64, 32, False, "tensor")
    x, g = torch.randn(rows, 64), torch.randn(rows, 32)
    first = copy.deepcopy(layer)
    x1 = x.clone().requires_grad_(True)
    y1 = layer(x1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * 0.02)  # other codes
    second = copy.deepcopy(layer)
    x2 = x.clone().requires_grad_(True)
    y2 = layer(x2)
    (y2 * g).sum().backward()
    y2_ref, ref2 = _reference(second, x, g)
    assert torch.allclose(y2.double(), y2_ref, atol=1e-5)
    assert torch.allclose(x2.grad.double(), ref2[0], atol=1e-5)
    y1_ref, ref1 = _reference(first, x, g)
    assert torch.allclose(y1.double(), y1_ref, atol=1e-5)
    if T.scale_output(rows, 64):  # the output side saved only the codes, not the weight: its backward runs
        (y1 * g).sum().backward()
        assert torch.allclose(x1.grad.double(), ref1[0], atol=1e-5)  # dL/dx = alpha g C: the first codes
    else:  # the weight side saved the weight, which changed: autograd refuses, as it did before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y1 * g).sum().backward()


def test_state_dict_and_deepcopy_leave_the_buffer_out():
    layer = _layer(64, 32, True, "tensor")
    _run(layer, torch.randn(4, 64), torch.randn(4, 32))
    assert layer._codes_buffer.tensor is not None
    assert sorted(layer.state_dict()) == ["alphas", "bias", "weight"]
    twin = copy.deepcopy(layer)
    assert twin._codes_buffer.tensor is None and layer._codes_buffer.tensor is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    from terdit.models import TerDiT, get_config

    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    for p in model.parameters():  # away from the zero init, so every layer carries gradient
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=0.5, std=0.1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        model(x, t, y, force_drop_ids=torch.zeros(3)).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_whole_model_gradients_match_the_eager_composite(monkeypatch):
    """TerDiT-Micro, one loss: every parameter's gradient as with the pre-issue-16 layer forward."""
    from terdit.models import TerDiT, get_config

    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=0.5, std=0.1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, t, y, force_drop_ids=torch.zeros(3)).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = grads()

    def eager_forward(self, inp):
        return F.linear(inp, ternary_weight(self.weight, self.alphas, self.granularity), self.bias)

    monkeypatch.setattr(TernaryLinear, "forward", eager_forward)
    eager = grads()
    for n in fused:
        assert torch.allclose(fused[n], eager[n], atol=1e-5, rtol=1e-4), n
