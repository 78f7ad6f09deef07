"""BitNet b1.58 baseline: BitLinear against a float reference, and the model variant's structure."""

import torch

from terdit.models import TerDiT, get_config
from terdit.quant.bitnet import BitLinear


def test_bitlinear_matches_float_reference_and_passes_gradients():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    with torch.no_grad():
        layer.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    # reference, written out: RMSNorm, per-token absmax int8, absmean ternary weight times gamma
    h = x.detach() / torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight.detach()
    s = 127 / h.abs().amax(-1, keepdim=True)
    hq = torch.clamp(torch.round(h * s), -127, 127) / s
    w = layer.weight.detach()
    gamma = w.abs().mean()
    wq = torch.clamp(torch.round(w / (gamma + 1e-6)), -1, 1) * gamma
    assert torch.allclose(y, hq @ wq.T + layer.bias.detach(), atol=1e-5)
    y.sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.norm_weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_bitnet_variant_drops_block_norms_and_trains():
    cfg = get_config("TerDiT-Micro", linear="bitnet", adaln_norm=False)
    model = TerDiT(cfg)
    keys = model.state_dict().keys()
    assert not any("attention_norm" in k or "ffn_norm" in k or "adaLN_modulation.2" in k for k in keys)
    assert len(model.ternary_layers()) == 2 * 8
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 1])).sample
    assert out.shape == (2, 8, 8, 8)
