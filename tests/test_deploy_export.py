"""Export a QAT model / run, load it packed, and check it computes exactly what the QAT model computes."""

from __future__ import annotations

import json

import pytest
import torch
from random_models import random_micro as random_qat_model

from terdit.deploy import PackedLinear, export_model, export_run, load_deployed, set_policy
from terdit.deploy.format import WEIGHTS_FILE, read_config
from terdit.deploy.loader import packed_bytes
from terdit.deploy.tensorfile import TensorFile
from terdit.errors import TerditError
from terdit.io import save_tensors
from terdit.models import TerDiT, get_config
from terdit.quant.packing import unpack_codes


def inputs(cfg, n: int = 3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.tensor([0, 420, 999][:n]), torch.tensor([1, 9, cfg.num_classes][:n])


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_deployed_equals_qat_model(tmp_path, fmt, policy):
    model = random_qat_model(qk_norm=True)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, y).sample
    export_model(model, tmp_path / "dep", fmt)
    dep = load_deployed(tmp_path / "dep", policy=policy)
    # the weights it uses are exactly alpha * ternarize(W) of the QAT layers
    for name, qat in model.ternary_layers().items():
        packed = dep.get_submodule(name)
        assert isinstance(packed, PackedLinear)
        w = packed.weight_for(torch.float32)
        assert torch.equal(w, qat.quantized_weight().detach())
        # the speed cache is dense, as an nn.Linear weight is, even where base3 rows carry padding codes
        assert w.is_contiguous() or policy == "memory"
    with torch.no_grad():
        out = dep(x, t, y).sample
    assert torch.equal(out, ref)


def test_deploy_dir_contents(tmp_path):
    model = random_qat_model(seed=1)
    export_model(model, tmp_path / "dep", "base3", dtype="bf16")
    config, info = read_config(tmp_path / "dep")
    assert config == model.config and info.format == "base3" and info.dtype == "bf16"
    assert set(info.packed) == set(model.ternary_layers())
    f = TensorFile(tmp_path / "dep" / WEIGHTS_FILE)
    w1 = model.layers[0].feed_forward.w1
    assert f.dtype("layers.0.feed_forward.w1.weight") == torch.uint8
    assert f.dtype("layers.0.feed_forward.w1.alphas") == torch.float32
    assert f.dtype("x_embedder.weight") == torch.bfloat16
    assert info.packed["layers.0.feed_forward.w1"] == {"shape": [96, 32], "pad": 3}
    codes = unpack_codes(f.read("layers.0.feed_forward.w1.weight"), "base3", (96, 32))
    expected = (w1.weight / (w1.weight.abs().mean() + 1e-6)).round().clamp(-1, 1)  # absmean rule, by hand
    assert torch.equal(codes.float(), expected)
    raw = json.loads((tmp_path / "dep" / "config.json").read_text())
    assert raw["deploy"]["format"] == "base3" and raw["dim"] == 32


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_low_precision_compute(tmp_path):
    model = random_qat_model(seed=2)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, y).sample
    export_model(model, tmp_path / "dep", "2bit")
    for dtype in (torch.float16, torch.bfloat16):
        dep = load_deployed(tmp_path / "dep", dtype=dtype)
        wq = model.layers[1].attention.wo.quantized_weight().detach().to(dtype)
        assert torch.equal(dep.layers[1].attention.wo.weight_for(dtype), wq)
        # oneDNN's bf16 path needs AMX/AVX512-BF16 support the CI VM may not expose; the native path is fine
        with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
            out = dep(x.to(dtype), t, y).sample
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


def test_memory_policy_shares_one_scratch_and_never_unpacks_all(tmp_path):
    model = random_qat_model(seed=3)
    export_model(model, tmp_path / "dep", "2bit")
    dep = load_deployed(tmp_path / "dep", policy="memory")
    x, t, y = inputs(model.config)
    ptrs = set()
    with torch.no_grad():
        for m in dep.modules():
            if isinstance(m, PackedLinear):
                ptrs.add(m.weight_for(torch.float32).data_ptr())
        dep(x, t, y)
    assert len(ptrs) == 1  # every layer unpacks into the same buffer
    assert all(m._cached is None for m in dep.modules() if isinstance(m, PackedLinear))
    # resident tensors: packed bytes + float rest, far below the QAT model's float weights
    qat_ternary_bytes = sum(m.weight.numel() * 4 for m in model.ternary_layers().values())
    assert packed_bytes(dep) * 16 == qat_ternary_bytes
    assert not any(p.is_meta for p in dep.parameters())
    set_policy(dep, "speed")
    with torch.no_grad():
        out = dep(x, t, y).sample
    assert all(m._cached is not None for m in dep.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        assert torch.equal(out, model(x, t, y).sample)


def test_grad_safe_memory_policy(tmp_path):
    """With autograd on, the shared scratch must not be overwritten under a saved tensor."""
    model = random_qat_model(seed=4)
    export_model(model, tmp_path / "dep", "2bit")
    dep = load_deployed(tmp_path / "dep")
    x, t, y = inputs(model.config)
    x.requires_grad_(True)
    dep(x, t, y).sample.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    model(x2, t, y).sample.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def write_run(run, model: TerDiT, step: int = 20) -> None:
    model.config.save(run / "config.json")
    ckpt = run / "checkpoints" / f"{step:07d}"
    ckpt.mkdir(parents=True)
    save_tensors(ckpt / "model.safetensors", model.state_dict())
    ema = random_qat_model(seed=99)  # a different EMA, to check which one is exported
    save_tensors(ckpt / "ema.safetensors", ema.state_dict())


def test_export_run_uses_ema_by_default(tmp_path):
    model = random_qat_model(seed=5)
    write_run(tmp_path / "run", model)
    x, t, y = inputs(model.config)
    export_run(tmp_path / "run", tmp_path / "ema", "2bit")
    export_run(tmp_path / "run", tmp_path / "raw", "base3", ema=False)
    with torch.no_grad():
        assert torch.equal(load_deployed(tmp_path / "ema")(x, t, y).sample, random_qat_model(seed=99)(x, t, y).sample)
        raw, want = load_deployed(tmp_path / "raw")(x, t, y).sample, model(x, t, y).sample
    # the memory policy sums base3's hidden blocks of w2 separately (blocks of 5 codes): float reassociation only,
    # 1e-6 here, where the other checkpoint's weights (the EMA) differ by ~0.1
    torch.testing.assert_close(raw, want, rtol=0, atol=1e-6)
    assert (load_deployed(tmp_path / "ema")(x, t, y).sample - want).abs().max() > 1e-2
    assert read_config(tmp_path / "ema")[1].source["checkpoint"] == "0000020"


def test_export_rejects_full_precision_run(tmp_path):
    fp = TerDiT(get_config("TerDiT-Micro", ternary=False))
    write_run(tmp_path / "run", fp)
    with pytest.raises(TerditError):
        export_run(tmp_path / "run", tmp_path / "out", "2bit")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TerditError, match="not a terdit run|does not exist"):
        export_run(tmp_path / "nope", tmp_path / "out", "2bit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    model = random_qat_model(seed=6)
    export_model(model, tmp_path / "dep", "base3")
    x, t, y = inputs(model.config)
    ref = load_deployed(tmp_path / "dep")(x, t, y).sample
    for policy in ("memory", "speed"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            dep = load_deployed(tmp_path / "dep", device="cuda", dtype=dtype, policy=policy)
            with torch.no_grad():
                out = dep(x.cuda().to(dtype), t.cuda(), y.cuda()).sample
            tol = 1e-4 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_memory_policy_row_blocks(tmp_path, fmt):
    """Layers above the scratch limit are unpacked and multiplied in blocks of output rows."""
    model = random_qat_model(seed=7)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, y).sample
    export_model(model, tmp_path / "dep", fmt)
    dep = load_deployed(tmp_path / "dep")
    layers = [m for m in dep.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.scratch_limit = 7 * m.packed.shape[1] * (4 if fmt == "2bit" else 5) * 4  # 7 rows (uneven blocks)
    assert all(m._row_block(torch.float32) == 7 for m in layers)
    # packing is a module swap: the blocks are the model's own classes, only their linears are packed
    attention = dep.layers[0].attention
    assert type(attention).__name__ == "Attention" and isinstance(attention.wq, PackedLinear)
    layers[0].scratch.clear()
    with torch.no_grad():
        out = dep(x, t, y).sample
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    k = 4 if fmt == "2bit" else 5
    largest_block = max(7 * m.packed.shape[1] * k for m in layers)
    assert max(b.numel() for b in layers[0].scratch._bufs.values()) <= largest_block  # never a whole layer


def test_memory_policy_trims_the_heap_after_blocks(tmp_path, monkeypatch):
    """On glibc, the memory policy hands freed activations back after a block when enough is free (only it:
    int8-packed's re-faulted pages cost more than the memory they saved, see loader.TRIM_POLICIES)."""
    from terdit.deploy import loader

    if loader._malloc_trim() is None:
        pytest.skip("needs glibc (malloc_trim)")
    model = random_qat_model(seed=8)
    export_model(model, tmp_path / "dep", "2bit")
    calls = []
    monkeypatch.setattr(loader, "release_free_heap", lambda: calls.append(1))
    x, t, y = inputs(model.config)
    dep = load_deployed(tmp_path / "dep")
    calls.clear()  # the one trim at the end of loading
    monkeypatch.setattr(loader, "TRIM_FREE_BYTES", -1)  # "more than -1 bytes free": always
    with torch.no_grad():
        dep(x, t, y)
    assert len(calls) == model.config.depth
    monkeypatch.setattr(loader, "TRIM_FREE_BYTES", 2**62)
    with torch.no_grad():
        dep(x, t, y)
    assert len(calls) == model.config.depth  # not above the threshold: no trim
    monkeypatch.setattr(loader, "TRIM_FREE_BYTES", -1)
    for policy in ("speed", "int8-packed"):  # never trim: nothing unpacked per call / into the reused scratch
        set_policy(dep, policy)
        with torch.no_grad():
            dep(x, t, y)
        assert len(calls) == model.config.depth, policy


def test_loading_runs_no_random_init_on_the_meta_device(tmp_path):
    """Building the model on the meta device must not run normal_ there: torch's meta kernel for it is a
    Python reference that costs seconds and memory. (torch._dynamo itself is imported by diffusers now.)"""
    import subprocess
    import sys

    export_model(random_qat_model(seed=9), tmp_path / "dep", "base3")
    code = (
        "import torch; calls = []; real = torch.Tensor.normal_\n"
        "def spy(self, *a, **k):\n    calls.append(self.device.type); return real(self, *a, **k)\n"
        "torch.Tensor.normal_ = spy\n"
        "from terdit.deploy import load_deployed\n"
        f"load_deployed({str(tmp_path / 'dep')!r}); print('meta' in calls)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
