"""The QAT ternary layer against hand-written float references."""

import pytest
import torch
import torch.nn.functional as F

from terdit.quant import TernaryLinear, initial_alpha, ternarize


def test_ternarize_matches_formula_and_rounds_half_to_even():
    w = torch.tensor([[0.0, 0.5, -0.5, 1.5, -3.0, 0.2]])
    gamma = w.abs().mean()  # 0.95
    codes, g = ternarize(w)
    assert torch.allclose(g, gamma.reshape(1))
    expected = [max(-1, min(1, round(float(v) / (float(gamma) + 1e-6)))) for v in w[0]]
    assert codes[0].tolist() == expected
    # exactly half a step rounds to even: gamma = 1 here, so +-0.5 -> 0 and +-1.5 -> +-2 -> +-1
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 1.0, 1.0]])
    assert ternarize(w, eps=0.0)[0].tolist() == [[0, 0, 1, -1, 1, 1]]


def test_per_row_gamma():
    w = torch.tensor([[1.0, 0.1, -1.0], [10.0, 1.0, -10.0]])
    codes, gamma = ternarize(w, "row")
    assert gamma.shape == (2, 1)
    assert torch.allclose(gamma[:, 0], w.abs().mean(1))
    assert codes.tolist() == [[1, 0, -1], [1, 0, -1]]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_forward_weight_takes_exactly_three_values(granularity):
    torch.manual_seed(0)
    layer = TernaryLinear(32, 24, bias=True, granularity=granularity)
    with torch.no_grad():
        layer.alphas.fill_(0.37)
    w = layer.quantized_weight()
    a = layer.alphas.item()
    assert set(w.unique().tolist()) == {-a, 0.0, a}
    x = torch.randn(5, 32)
    ref = x @ (0.37 * ternarize(layer.weight.detach(), granularity)[0]).T + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_straight_through_gradients():
    torch.manual_seed(1)
    layer = TernaryLinear(16, 8, bias=False)
    with torch.no_grad():
        layer.alphas.fill_(0.5)
    x = torch.randn(4, 16)
    g = torch.randn(4, 8)
    (layer(x) * g).sum().backward()
    codes = ternarize(layer.weight.detach())[0]
    grad_w_eff = g.T @ x  # dL/dW~ for y = x W~^T
    assert torch.allclose(layer.weight.grad, 0.5 * grad_w_eff, atol=1e-5)  # STE: alpha * dL/dW~
    assert torch.allclose(layer.alphas.grad, (grad_w_eff * codes).sum().reshape(1), atol=1e-4)


def test_zero_initialised_layer_still_learns():
    """adaLN-Zero layers start at W = 0; alpha must not be 0 or nothing ever moves."""
    layer = TernaryLinear(8, 6)
    torch.nn.init.zeros_(layer.weight)
    layer.reset_alpha()
    assert float(layer.alphas) > 0
    F.mse_loss(layer(torch.randn(3, 8)), torch.randn(3, 6)).backward()
    assert layer.weight.grad.abs().sum() > 0


def test_alpha_inits():
    w = torch.randn(10, 20)
    assert initial_alpha(w, "absmean") == pytest.approx(float(w.abs().mean()))
    assert initial_alpha(torch.zeros(10, 16), "absmean") == pytest.approx(0.25)
    assert initial_alpha(w, "ones") == 1.0
    g = torch.Generator().manual_seed(3)
    expected = float(torch.randn(1, generator=torch.Generator().manual_seed(3)))
    assert initial_alpha(w, "randn", g) == pytest.approx(expected)
    with pytest.raises(ValueError):
        initial_alpha(w, "nope")
