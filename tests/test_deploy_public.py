"""Public release checkpoints (TerDiT packed, Large-DiT full precision), written by the test in the
released file layout with random weights and small dims."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from terdit.deploy import convert_release, export_model, lexicographic_permutation, load_deployed, map_labels
from terdit.deploy import public as public_mod
from terdit.deploy.format import WEIGHTS_FILE, read_config
from terdit.deploy.public import read_model_args, release_config
from terdit.deploy.tensorfile import TensorFile
from terdit.errors import TerditError
from terdit.models import TerDiT, get_config

TERNARY = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.1",
)


@pytest.fixture(autouse=True)
def tiny_public_name(monkeypatch):
    monkeypatch.setitem(public_mod.PUBLIC_MODELS, "DiT_Llama_tiny_patch2", "TerDiT-Micro")


def quarter_pack(q: torch.Tensor) -> torch.Tensor:
    """The released 2-bit layout, written from its description: 4 row quarters, quarter 0 in the high bits."""
    r = q.shape[0] // 4
    q = q.to(torch.uint8)
    return (q[:r] << 6) | (q[r : 2 * r] << 4) | (q[2 * r : 3 * r] << 2) | q[3 * r :]


def quarter_unpack(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([(b >> 6) & 3, (b >> 4) & 3, (b >> 2) & 3, b & 3]).long()


def fp_reference(config_overrides: dict) -> TerDiT:
    return TerDiT(get_config("TerDiT-Micro", **config_overrides)).eval()


def write_terdit_release(root, seed=0, qk_norm=True, dtype=torch.float32):
    """model_args.pth + consolidated_ema_ternary.00-of-01.pth, as the TerDiT release ships them.

    Returns the released state dict and a full-precision model holding the same effective weights."""
    g = torch.Generator().manual_seed(seed)
    ref = fp_reference({"linear": "fp", "qk_norm": qk_norm, "adaln_norm": True})
    state = {}
    with torch.no_grad():
        for key, p in ref.state_dict().items():
            layer = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and layer.split(".", 2)[-1] in TERNARY:
                q = torch.randint(0, 3, p.shape, generator=g)
                alpha = torch.rand(1, generator=g) + 0.1
                state[key] = quarter_pack(q)
                state[f"{layer}.alphas"] = alpha.to(dtype)
                p.copy_(alpha.to(dtype).float() * (q - 1))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                state[key] = p.clone().to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        model="DiT_Llama_tiny_patch2",
        image_size=64,
        num_classes=10,
        qk_norm=qk_norm,
        vae="ema",
        lr=1e-4,
        precision="bf16",
        data_path="/data/imagenet/train",
    )
    torch.save(args, root / "model_args.pth")
    torch.save(state, root / "consolidated_ema_ternary.00-of-01.pth")
    return state, ref


def release_order(y: torch.Tensor, n: int = 10) -> torch.Tensor:
    """ImageNet ids -> a released checkpoint's class indices, through the deploy-config path of map_labels."""
    return map_labels({"num_classes": n, "deploy": {"label_permutation": "lexicographic"}}, y)


def inputs(n=3):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([3, 300, 900])[:n], torch.tensor([0, 5, 10])[:n]


def test_release_loads_and_matches_independent_decode(tmp_path):
    state, ref = write_terdit_release(tmp_path / "rel")
    model = load_deployed(tmp_path / "rel")
    assert model.config.qk_norm and model.config.input_size == 8 and model.config.num_classes == 10
    assert model.deploy.label_permutation == "lexicographic"
    x, t, y = inputs()
    with torch.no_grad():  # the model takes ImageNet ids and maps them to its own class order itself
        assert torch.equal(model(x, t, y).sample, ref(x, t, release_order(y)).sample)
    # and the unpacked weight equals alpha * (code - 1) decoded here from the released bytes
    b = state["layers.1.feed_forward.w2.weight"]
    expected = state["layers.1.feed_forward.w2.alphas"] * (quarter_unpack(b) - 1)
    assert torch.equal(model.layers[1].feed_forward.w2.weight_for(torch.float32), expected)


def test_packed_to_model_to_packed_is_bit_exact(tmp_path):
    state, _ = write_terdit_release(tmp_path / "rel", seed=1)
    convert_release(tmp_path / "rel", tmp_path / "dep")
    f = TensorFile(tmp_path / "dep" / WEIGHTS_FILE)
    for key, value in state.items():
        got = f.read(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
    # ... and through a loaded model once more
    export_model(load_deployed(tmp_path / "dep"), tmp_path / "again", "2bit")
    g = TensorFile(tmp_path / "again" / WEIGHTS_FILE)
    assert all(torch.equal(g.read(k), v) for k, v in state.items())
    assert read_config(tmp_path / "again")[1].label_permutation == "lexicographic"


def test_convert_to_base3_computes_the_same(tmp_path):
    _, ref = write_terdit_release(tmp_path / "rel", seed=2, qk_norm=False)
    convert_release(tmp_path / "rel", tmp_path / "b3", fmt="base3")
    model = load_deployed(tmp_path / "b3", policy="speed")
    assert read_config(tmp_path / "b3")[1].format == "base3"
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, ref(x, t, release_order(y)).sample)


def test_bf16_release_keeps_its_dtype(tmp_path):
    write_terdit_release(tmp_path / "rel", seed=3, dtype=torch.bfloat16)
    convert_release(tmp_path / "rel", tmp_path / "dep")
    assert read_config(tmp_path / "dep")[1].dtype == "bf16"
    assert TensorFile(tmp_path / "dep" / WEIGHTS_FILE).dtype("x_embedder.weight") == torch.bfloat16


def test_large_dit_release(tmp_path):
    g = torch.Generator().manual_seed(4)
    ref = fp_reference({"linear": "fp", "adaln_norm": False})
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    root = tmp_path / "large"
    root.mkdir()
    torch.save(
        argparse.Namespace(model="DiT_Llama_tiny_patch2", image_size=64, num_classes=10, qk_norm=False),
        root / "model_args.pth",
    )
    torch.save(ref.state_dict(), root / "consolidated_ema.00-of-01.pth")
    model = load_deployed(root)
    assert not model.config.ternary and not model.config.adaln_norm
    assert model.deploy.label_permutation is None and model.deploy.format == "fp"
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, ref(x, t, y).sample)
    convert_release(root, tmp_path / "dep")
    with torch.no_grad():
        assert torch.equal(load_deployed(tmp_path / "dep")(x, t, y).sample, ref(x, t, y).sample)
    with pytest.raises(TerditError, match="full-precision release"):
        convert_release(root, tmp_path / "x", fmt="2bit")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_model_args_is_refused(tmp_path):
    write_terdit_release(tmp_path / "rel", seed=5)
    marker = tmp_path / "pwned"
    torch.save(_Exploit(marker), tmp_path / "rel" / "model_args.pth")
    with pytest.raises(TerditError, match="model_args.pth: refused to unpickle"):
        load_deployed(tmp_path / "rel")
    assert not marker.exists()


def test_tampered_checkpoint_is_refused(tmp_path):
    write_terdit_release(tmp_path / "rel", seed=6)
    marker = tmp_path / "pwned"
    torch.save(
        {"x_embedder.weight": _Exploit(marker)}, tmp_path / "rel" / "consolidated_ema_ternary.00-of-01.pth"
    )
    with pytest.raises(TerditError, match="refused to unpickle"):
        convert_release(tmp_path / "rel", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_public_names_and_image_size():
    cases = {
        "DiT_Llama_600M_patch2": (1536, 16),
        "DiT_Llama_3B_patch2": (3072, 32),
        "DiT_Llama_7B_patch2": (4096, 32),
    }
    for name, (dim, depth) in cases.items():
        cfg = release_config({"model": name, "image_size": 512}, True, True, "x")
        assert (cfg.dim, cfg.depth, cfg.n_heads, cfg.input_size) == (dim, depth, 32, 64)
    with pytest.raises(TerditError, match="unknown model"):
        release_config({"model": "DiT_XL_2"}, True, True, "x")


def test_model_args_reader(tmp_path):
    write_terdit_release(tmp_path / "rel", seed=7)
    args = read_model_args(tmp_path / "rel")
    assert args["model"] == "DiT_Llama_tiny_patch2" and args["image_size"] == 64


def test_lexicographic_labels():
    perm = lexicographic_permutation(1000)
    assert int(perm[89]) == 878 and int(perm[475]) == 418 and int(perm[0]) == 0 and int(perm[999]) == 999
    assert sorted(perm.tolist()) == list(range(1000))
    # independent definition: position of str(i) in the sorted folder names
    names = sorted(str(i) for i in range(1000))
    assert all(names[perm[i]] == str(i) for i in range(0, 1000, 37))
    labels = torch.tensor([89, 475, 1000])
    assert map_labels(
        {"num_classes": 1000, "deploy": {"label_permutation": "lexicographic"}}, labels
    ).tolist() == [878, 418, 1000]
    assert torch.equal(map_labels(None, labels), labels)
    assert torch.equal(map_labels(TerDiT(get_config("TerDiT-Micro")), torch.tensor([3])), torch.tensor([3]))
    with pytest.raises(TerditError):
        map_labels({"num_classes": 1000, "label_permutation": "lexicographic"}, torch.tensor([1001]))
