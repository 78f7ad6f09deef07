"""TerDiT architecture: sizes, key names, RoPE, patching and the adaLN RMSNorm switch."""

import pytest
import torch
import torch.nn.functional as F

from terdit.errors import TerditError
from terdit.models import TerDiT, get_config
from terdit.quant import TernaryLinear, ternarize


def _ternary_param_closed_form(dim: int, depth: int, hidden: int, cond: int) -> int:
    return depth * (4 * dim * dim + 3 * dim * hidden + 6 * dim * cond)


@pytest.mark.parametrize(
    "name,total,dim,depth,hidden",
    [("TerDiT-600M", 609.9e6, 1536, 16, 4096), ("TerDiT-4.2B", 4.238e9, 3072, 32, 8192)],
)
def test_paper_sizes_on_meta_device(name, total, dim, depth, hidden):
    cfg = get_config(name)
    assert cfg.ffn_hidden == hidden and cfg.cond_dim == 1024
    with torch.device("meta"):
        model = TerDiT(cfg)
    counts = model.parameter_counts()
    assert counts["total"] == pytest.approx(total, rel=5e-4)
    assert counts["ternary"] == _ternary_param_closed_form(dim, depth, hidden, 1024)
    assert all(p.is_meta for p in model.parameters())


def test_seven_b_ffn_and_alias():
    assert get_config("TerDiT-7B").ffn_hidden == 11008
    assert get_config("TerDiT-3B").dim == 3072


def test_unknown_config_is_a_user_error():
    with pytest.raises(TerditError, match="unknown config"):
        get_config("TerDiT-1T")


def test_public_key_names_and_shapes():
    cfg = get_config("TerDiT-Micro", qk_norm=True)
    sd = TerDiT(cfg).state_dict()
    d, h, c = cfg.dim, cfg.ffn_hidden, cfg.cond_dim
    expected = {
        "x_embedder.weight": (d, 4 * cfg.in_channels),
        "t_embedder.mlp.0.weight": (c, 256),
        "t_embedder.mlp.2.weight": (c, c),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, c),
        "layers.0.attention.wq.weight": (d, d),
        "layers.0.attention.wq.alphas": (1,),
        "layers.0.attention.q_norm.weight": (d,),
        "layers.1.feed_forward.w1.weight": (h, d),
        "layers.1.feed_forward.w2.weight": (d, h),
        "layers.0.attention_norm.weight": (d,),
        "layers.0.ffn_norm.weight": (d,),
        "layers.0.adaLN_modulation.1.weight": (6 * d, c),
        "layers.0.adaLN_modulation.1.bias": (6 * d,),
        "layers.0.adaLN_modulation.1.alphas": (1,),
        "layers.0.adaLN_modulation.2.weight": (6 * d,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, c),
        "final_layer.linear.weight": (4 * cfg.out_channels, d),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_exactly_the_paper_layers_are_ternary():
    model = TerDiT(get_config("TerDiT-Micro"))
    names = set(model.ternary_layers())
    per_block = {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1"}
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in per_block}
    assert not isinstance(model.final_layer.adaLN_modulation[1], TernaryLinear)
    fp = TerDiT(get_config("TerDiT-Micro", ternary=False))
    assert not fp.ternary_layers()


def test_rmsnorm_switch_changes_only_the_adaln_path():
    torch.manual_seed(0)
    with_norm = TerDiT(get_config("TerDiT-Micro"))
    torch.manual_seed(0)
    without = TerDiT(get_config("TerDiT-Micro", adaln_norm=False))
    a, b = with_norm.state_dict(), without.state_dict()
    assert set(a) - set(b) == {f"layers.{i}.adaLN_modulation.2.weight" for i in range(2)}
    assert not set(b) - set(a)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    # with identical weights the adaLN output with the norm is the RMS-normalised output without it
    for blk_a, blk_b in zip(with_norm.layers, without.layers):
        torch.nn.init.normal_(blk_b.adaLN_modulation[1].weight)
        blk_a.adaLN_modulation[1].load_state_dict(blk_b.adaLN_modulation[1].state_dict())
    c = torch.randn(3, with_norm.config.cond_dim)
    raw = without.layers[0].adaLN_modulation(c)
    ref = raw / torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(with_norm.layers[0].adaLN_modulation(c), ref, atol=1e-5)


def test_rope_matches_complex_rotation_of_adjacent_pairs():
    model = TerDiT(get_config("TerDiT-Micro"))
    rope = model.layers[0].attention.rope
    x = torch.randn(2, 7, 3, 16)
    freqs = 1.0 / 10000 ** (torch.arange(0, 16, 2).double() / 16)
    angles = torch.outer(torch.arange(7).double(), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # (N, 8)
    xc = torch.view_as_complex(x.double().reshape(2, 7, 3, 8, 2))
    ref = torch.view_as_real(xc * rot[None, :, None, :]).reshape(2, 7, 3, 16)
    assert torch.allclose(rope(x).double(), ref, atol=1e-5)
    # inside torch.compile RoPE is real arithmetic (Inductor has no complex kernels): the same rotation
    compiled = torch.compile(rope, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x).double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled(x.bfloat16()), rope(x.bfloat16()), rtol=2**-8, atol=1e-6)  # 1 ulp


def test_rope_rotation_of_the_models_own_tokens_is_cached_when_built():
    """Built (even on the meta device, as the deploy loader builds), a model holds the rotation for its own
    number of tokens on CPU, so torch.compile never sees the cache filled between two blocks."""
    cfg = get_config("TerDiT-Micro")
    with torch.device("meta"):
        model = TerDiT(cfg)
    n = (cfg.input_size // cfg.patch_size) ** 2
    rope = model.layers[0].attention.rope
    assert all(block.attention.rope is rope for block in model.layers)
    assert list(rope._cache) == [(n, torch.device("cpu"))]
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    angles = torch.outer(torch.arange(n).double(), freqs)
    ref = torch.stack((angles.cos(), angles.sin()), -1)
    torch.testing.assert_close(rope._cache[(n, torch.device("cpu"))].double(), ref, rtol=0, atol=1e-6)


def test_patchify_order_and_roundtrip():
    model = TerDiT(get_config("TerDiT-Micro", learn_sigma=False))
    x = torch.randn(2, 4, 8, 8)
    tok = model.patchify(x)
    # token (row r, col q) holds x[:, :, 2r:2r+2, 2q:2q+2] flattened in (C, p, p) order, raster order
    assert torch.equal(tok[:, 1 * 4 + 2], x[:, :, 2:4, 4:6].reshape(2, -1))
    # unpatchify expects each token ordered (p, p, C)
    tok_ppc = x.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)
    assert torch.equal(model.unpatchify(tok_ppc, 8, 8), x)


def test_ternary_model_equals_fp_model_with_dequantized_weights():
    """Independent path: a float model holding alpha * codes must compute the same function."""
    torch.manual_seed(0)
    tern = TerDiT(get_config("TerDiT-Micro"))
    for p in tern.parameters():  # leave the zero init so every path is exercised
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=0.5, std=0.1)
    fp = TerDiT(get_config("TerDiT-Micro", ternary=False, adaln_norm=True))
    state = {k: v for k, v in tern.state_dict().items() if not k.endswith("alphas")}
    for name, layer in tern.ternary_layers().items():
        state[f"{name}.weight"] = layer.alphas.detach() * ternarize(layer.weight.detach())[0]
    fp.load_state_dict(state)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    tern.eval(), fp.eval()
    assert torch.allclose(tern(x, t, y).sample, fp(x, t, y).sample, atol=1e-5)


def test_forward_shapes_label_dropout_and_zero_init():
    model = TerDiT(get_config("TerDiT-Micro"))
    x = torch.randn(4, 4, 8, 8)
    out = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))).sample
    assert out.shape == (4, 8, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the output layer starts at zero
    emb = model.y_embedder
    dropped = emb(torch.tensor([3, 4]), force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(dropped[0], emb.embedding_table.weight[10])
    assert torch.equal(dropped[1], emb.embedding_table.weight[4])


def test_gradients_reach_alpha_and_latent_weights():
    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    x = torch.randn(4, 4, 8, 8)
    for _ in range(3):  # adaLN-Zero: step 1 moves the output layer, step 2 the adaLN, step 3 the rest
        out = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))).sample
        loss = F.mse_loss(out, torch.randn(4, 8, 8, 8))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    for name, layer in model.ternary_layers().items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        assert layer.alphas.grad is not None, name


def test_full_precision_twin_is_large_dit():
    assert get_config("TerDiT-600M", ternary=False).adaln_norm is False
    assert get_config("TerDiT-600M", ternary=False, adaln_norm=True).adaln_norm is True
    assert get_config("TerDiT-600M").adaln_norm is True
    assert get_config("TerDiT-600M", adaln_norm=False).linear == "ternary"


@pytest.mark.parametrize("rows", [1, 7, 16, 10**6])
def test_ffn_in_chunks_of_tokens_is_the_whole_batch_ffn(rows):
    """set_ffn_chunk_rows: each block's FFN on `rows` tokens at a time (an uneven last chunk for 7) computes
    the forward of the unchunked model, which the deploy loader's chunking relies on."""
    from random_models import random_micro

    model = random_micro(seed=2)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.tensor([3, 400, 999]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        whole = model(x, t, y).sample
        h = torch.randn(3, 11, cfg.dim, generator=g)
        block = model.layers[0]
        ffn_whole = block.feed_forward(h)
        model.set_ffn_chunk_rows(rows)
        assert all(b.ffn_chunk_rows == rows for b in model.layers)
        torch.testing.assert_close(model(x, t, y).sample, whole, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(block.ffn(h), ffn_whole, rtol=1e-5, atol=1e-5 * float(ffn_whole.abs().max()))
        model.set_ffn_chunk_rows(None)
        assert torch.equal(model(x, t, y).sample, whole)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk rows"):
            model.set_ffn_chunk_rows(bad)
