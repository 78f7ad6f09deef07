"""ternarize_: the module swap on diffusers' DiT / PixArt and on terdit's full-precision twin."""

import math

import pytest
import torch
from random_models import random_micro, tiny_dit
from torch import nn

from terdit.errors import TerditError
from terdit.quant.module_swap import names_filter, paper_filter, ternarize_
from terdit.quant.ptq import quantize_model
from terdit.quant.ternary import TernaryLinear


def test_dit_swaps_the_block_linears_and_still_runs():
    model = tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
    report = ternarize_(model)
    per_block = ["norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                 "ff.net.2"]
    assert sorted(report.swapped) == sorted(f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block)
    kept = set(report.kept_linears)  # embedders and the output projection stay full precision
    assert {"proj_out_1", "proj_out_2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"} <= kept
    for name, m in model.named_modules():
        assert isinstance(m, TernaryLinear) == (name in report.swapped)
    swapped_weights = sum(model.get_submodule(n).weight.numel() for n in report.swapped)
    assert report.ternary_params == swapped_weights
    assert report.total_params == sum(p.numel() for p in model.parameters())
    expected_bits = (swapped_weights * 2 + (report.total_params - swapped_weights) * 32) / report.total_params
    assert math.isclose(report.bits_per_weight(2.0), expected_bits)
    with torch.no_grad():
        after = model(x, timestep=t, class_labels=y).sample
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # the weights really are ternary now
    # each swapped layer computes alpha * codes exactly as the ternary PTQ of its original weight would
    layer = model.transformer_blocks[0].attn1.to_q
    assert layer.quantized_weight().unique().numel() <= 3


def test_terdit_twin_equals_ternary_ptq_of_the_same_weights():
    """A freshly ternarized model is the per-tensor ternary PTQ (terdit.quant.ptq, a separate code path)."""
    fp = random_micro(ternary=False)
    ptq = random_micro(ternary=False)
    quantize_model(ptq, "ternary", "tensor")
    report = ternarize_(fp)
    assert len(report.swapped) == 2 * 8  # 4 attention + 3 FFN + adaLN per block
    assert all(n.startswith("layers.") for n in report.swapped)
    assert all(not n.startswith("layers.") for n in report.kept_linears)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        torch.testing.assert_close(fp(x, t, y), ptq(x, t, y), rtol=1e-5, atol=1e-6)
    # and its state dict loads into terdit's ternary TerDiT of the same shape
    from terdit.models import TerDiT, get_config

    TerDiT(get_config("TerDiT-Micro", adaln_norm=False)).load_state_dict(fp.state_dict(), strict=True)


def test_pixart_block_linears_only():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                     caption_channels=12, norm_num_groups=1)
    report = ternarize_(model)
    assert report.swapped and all(n.startswith("transformer_blocks.0.") for n in report.swapped)
    assert any(n.startswith("adaln_single") for n in report.kept_linears)
    assert any(n.startswith("caption_projection") for n in report.kept_linears)


def test_filters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TerditError, match="selected no"):
        ternarize_(model)  # no transformer blocks: the paper's filter picks nothing
    report = ternarize_(model, names_filter(["2"]))
    assert report.swapped == ["2"] and isinstance(model[2], TernaryLinear) and type(model[0]) is nn.Linear
    assert not paper_filter(model[2], "layers.0.w")  # already ternary
    assert paper_filter(nn.Linear(2, 2), "layers.3.attention.wq")
    assert not paper_filter(nn.Linear(2, 2), "layers.3.t_embedder.mlp.0")


def test_adaln_norm_makes_a_terdit_with_the_papers_norm():
    from terdit.models import TerDiT, get_config
    from terdit.quant.module_swap import adaln_inflation, add_adaln_norm_

    teacher = random_micro(ternary=False)
    student = random_micro(ternary=False)
    ternarize_(student)
    assert add_adaln_norm_(student) == 2
    TerDiT(get_config("TerDiT-Micro", adaln_norm=True)).load_state_dict(student.state_dict(), strict=True)
    assert 0.1 < adaln_inflation(student, teacher) < 10
    with pytest.raises(TerditError, match="already"):
        add_adaln_norm_(student)
