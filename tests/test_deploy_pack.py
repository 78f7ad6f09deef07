"""Packing as a module swap (`terdit.deploy.pack_`): any module tree, in place, no packed subclass of blocks."""

from __future__ import annotations

import pytest
import torch
from random_models import random_micro
from torch import nn

from terdit.deploy import DeployInfo, PackedLinear, load_deployed, pack_, write_deploy_dir
from terdit.deploy.format import WEIGHTS_FILE, read_config
from terdit.errors import TerditError
from terdit.io import load_tensors
from terdit.quant.module_swap import ternarize_
from terdit.quant.ptq import quantize_ternary
from terdit.quant.ternary import TernaryLinear


class Net(nn.Module):
    """A small module tree that is not TerDiT: nested containers, a non-linear in between, a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Sequential(nn.Linear(40, 16, bias=False)))
        self.head = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
@pytest.mark.parametrize("policy", ["memory", "speed", "int8", "int8-packed"])
def test_pack_any_module_tree_in_place(fmt, policy, monkeypatch):
    monkeypatch.setenv("TERDIT_CPU_INT8", "0")  # the exact float path: equal to the QAT forward
    torch.manual_seed(0)
    net = Net()
    ternarize_(net, filter_fn=lambda m, fqn: fqn.startswith("body."))
    x = torch.randn(5, 3, 24)
    with torch.no_grad():
        ref = net(x)
    keys = set(net.state_dict())
    body = net.body
    swapped = pack_(net, fmt, policy=policy)
    assert swapped == ["body.0", "body.2.0"]
    assert net.body is body and type(net.head) is nn.Linear  # in place; what the filter left stays as it was
    layers = [net.body[0], net.body[2][0]]
    assert all(isinstance(m, PackedLinear) and m.fmt == fmt and m.policy == policy for m in layers)
    assert layers[0].scratch is layers[1].scratch  # one unpack scratch for the whole tree
    assert layers[1].bias is None
    # the other modules keep their state-dict keys; a packed layer stores packed rows instead of a weight
    assert {k for k in keys if not k.startswith("body.")} <= set(net.state_dict())
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert pack_(net, fmt, policy=policy) == []  # packed layers are not packed again


def test_pack_plain_linears_with_a_filter_is_ternary_ptq():
    torch.manual_seed(1)
    net = Net()
    w = net.head.weight.detach().clone()
    x = torch.randn(4, 24)
    assert pack_(net, "2bit", filter_fn=lambda m, fqn: fqn == "head") == ["head"]
    codes, alpha = quantize_ternary(w, "tensor")
    assert torch.equal(net.head.codes(), codes.to(torch.int8))
    assert torch.equal(net.head.alphas, alpha.float().reshape(1))
    with torch.no_grad():
        h = net.norm(net.body(x))
        torch.testing.assert_close(net.head(h), h @ (alpha * codes).T + net.head.bias, rtol=1e-6, atol=1e-6)


def test_pack_on_the_meta_device_makes_empty_layers():
    with torch.device("meta"):
        net = Net()
    pack_(net, "base3", filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert all(m.packed.device.type == "meta" for m in net.modules() if isinstance(m, PackedLinear))


def test_pack_rejects_bad_arguments():
    net = Net()
    with pytest.raises(TerditError, match="format"):
        pack_(net, "4bit")
    with pytest.raises(TerditError, match="policy"):
        pack_(net, "2bit", policy="fastest")
    assert pack_(net, "2bit") == []  # no TernaryLinear: nothing selected by default


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_packed_terdit_in_memory_equals_the_loaded_deploy_dir(fmt, tmp_path):
    """pack_ on a QAT TerDiT gives the model load_deployed builds; it writes the same deploy directory."""
    model = random_micro(seed=2)
    export_dir = tmp_path / "export"
    write_deploy_dir(model, export_dir, fmt)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.tensor([3, 800]), torch.tensor([1, 2])
    dep = load_deployed(export_dir)
    assert sorted(pack_(model, fmt)) == sorted(n for n, m in dep.named_modules() if isinstance(m, PackedLinear))
    assert not any(isinstance(m, TernaryLinear) for m in model.modules())
    # no packed subclass of the model's blocks: the only module class of terdit.deploy is PackedLinear
    for m in (*model.modules(), *dep.modules()):
        assert type(m) is PackedLinear or not type(m).__module__.startswith("terdit.deploy")
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, dep(x, t, y).sample)
    assert isinstance(dep.deploy, DeployInfo) and dep.deploy.format == fmt
    # a packed model in memory writes the same tensors as its QAT original (bit-exact codes)
    write_deploy_dir(model, tmp_path / "again", fmt)
    assert read_config(tmp_path / "again") == read_config(export_dir)
    again, first = load_tensors(tmp_path / "again" / WEIGHTS_FILE), load_tensors(export_dir / WEIGHTS_FILE)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_write_deploy_dir_keeps_the_loaded_facts(tmp_path):
    model = random_micro(seed=3)
    write_deploy_dir(model, tmp_path / "a", "base3", "bf16", source={"kind": "test"},
                     label_permutation="lexicographic", int8=True)
    dep = load_deployed(tmp_path / "a")
    out = tmp_path / "b"
    out.mkdir()
    (out / "README.md").write_text("kept")
    write_deploy_dir(dep, out, replace=False)  # save_pretrained's way: into the folder, next to other files
    assert (out / "README.md").read_text() == "kept"
    _, info = read_config(out)
    _, first = read_config(tmp_path / "a")
    assert info == first and info.label_permutation == "lexicographic" and info.source == {"kind": "test"}
    with pytest.raises(TerditError, match="format"):
        write_deploy_dir(random_micro(seed=3), tmp_path / "c")
