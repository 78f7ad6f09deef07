"""Triton packed-ternary kernels (terdit.deploy.triton_kernels) and the CUDA-graph sampler (terdit.sampling.cuda_graph).

Without a GPU the kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set here,
before triton is imported (only on machines without CUDA, so a GPU session's own Triton code is left
alone; there the same tests run natively on CUDA). Kernels are compared with a float64 reference
x @ (alpha * codes).T + b; decoded codes are checked bitwise with one-hot inputs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also in conftest.py: diffusers imports triton early

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install terdit[test]); kernel tests skipped")

from terdit.deploy import PackedLinear, load_deployed  # noqa: E402
from terdit.deploy import kernels as seam  # noqa: E402
from terdit.deploy import triton_kernels as tk  # noqa: E402
from terdit.deploy.backends import auto_register  # noqa: E402
from terdit.deploy.bench import random_deploy_dir  # noqa: E402
from terdit.errors import TerditError  # noqa: E402
from terdit.models import get_config  # noqa: E402
from terdit.quant.packing import pack_rows  # noqa: E402
from terdit.sampling.cuda_graph import predraw_noise, sample_latents_fast  # noqa: E402
from terdit.sampling.generate import sample_latents  # noqa: E402

if tk.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - triton imported natively elsewhere in this session, and no GPU
    pytest.skip("triton kernels were compiled for GPU but CUDA is not available", allow_module_level=True)

FORMATS = ["2bit", "base3"]
# K, N: multiples of the interpreter tile (8 bytes = 32 columns for 2bit, 40 for base3; BN 16/32) and not
SHAPES = [(64, 32), (80, 48), (37, 19)]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |y|: about 2 ulp


def make_layer(fmt: str, n: int, k: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    packed = pack_rows(codes, fmt)[0].to(DEVICE)
    alpha = (torch.rand(1, generator=g) + 0.1).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    return codes.to(DEVICE), packed, alpha, b


def reference(x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ (alpha.double() * codes.double()).T
    return y if bias is None else y + bias.double()


def paths_for(m: int) -> list[str]:
    return ["skinny", "tiled"] if m <= 16 else ["tiled"]


# --- kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k,n", [(64, 32), (37, 19)])
def test_decoded_codes_bitwise(fmt, k, n):
    """One-hot rows of x pick single weights: y[m, n] = codes[n, m] exactly, both kernels."""
    codes, packed, _, _ = make_layer(fmt, n, k, seed=1)
    one = torch.ones(1, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    y = tk.ternary_linear(eye, packed, one, None, fmt, k, path="tiled")
    assert torch.equal(y.T, codes.float())
    rows = [tk.ternary_linear(eye[i : i + 16], packed, one, None, fmt, k, path="skinny") for i in range(0, k, 16)]
    assert torch.equal(torch.cat(rows).T, codes.float())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_float_reference(fmt, m, k, n, dtype):
    codes, packed, alpha, bias = make_layer(fmt, n, k, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    ref = reference(x, codes, alpha, bias)
    for path in paths_for(m):
        y = tk.ternary_linear(x, packed, alpha, bias, fmt, k, path=path)
        assert y.dtype == dtype and y.shape == (m, n)
        err = (y.double() - ref).abs().max().item()
        assert err <= TOL[dtype] * ref.abs().max().item(), (path, err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_dims_strided_input_no_bias(fmt):
    codes, packed, alpha, _ = make_layer(fmt, 24, 40, seed=3)
    base = torch.randn(40, 2, 9, device=DEVICE)
    x = base.permute(1, 2, 0)  # [2, 9, 40], stride along K is 18: not contiguous
    ref = reference(x.reshape(-1, 40), codes, alpha, None).view(2, 9, 24)
    for b, n in ((2, 9), (1, 3)):  # 18 rows: tiled kernel; 3 rows: skinny kernel
        y = tk.ternary_linear(x[:b, :n], packed, alpha, None, fmt, 40)
        assert y.shape == (b, n, 24)
        torch.testing.assert_close(y.double(), ref[:b, :n], rtol=1e-5, atol=1e-5)
    empty = tk.ternary_linear(x[:, :0], packed, alpha, None, fmt, 40)
    assert empty.shape == (2, 0, 24)


def test_bad_inputs_raise():
    _, packed, alpha, bias = make_layer("2bit", 8, 16)
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        tk.ternary_linear(x[:, :12], packed, alpha, bias, "2bit", 12)  # 12 columns need 3 bytes, not 4
    with pytest.raises(ValueError, match="dtype"):
        tk.ternary_linear(x.double(), packed, alpha, bias, "2bit", 16)
    with pytest.raises(ValueError, match="format"):
        tk.ternary_linear(x, packed, alpha, bias, "4bit", 16)
    with pytest.raises(ValueError, match="16 rows"):
        tk.ternary_linear(torch.randn(17, 16, device=DEVICE), packed, alpha, bias, "2bit", 16, path="skinny")


# --- dispatch through PackedLinear -------------------------------------------------------------------


@pytest.fixture
def kernels_on(monkeypatch):
    """The Triton kernels registered for DEVICE; the registry is restored afterwards. Counts kernel calls."""
    monkeypatch.delenv("TERDIT_NO_KERNELS", raising=False)
    saved = dict(seam._REGISTRY)
    calls = []
    real = tk.ternary_linear

    def counting(*args, **kwargs):
        calls.append(args[0].numel() // args[0].shape[-1])  # rows
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "ternary_linear", counting)
    tk.enable_triton_kernels(DEVICE)
    yield calls
    seam._REGISTRY.clear()
    seam._REGISTRY.update(saved)


def packed_linear(fmt: str, k: int, n: int) -> tuple[PackedLinear, torch.Tensor]:
    codes, packed, alpha, bias = make_layer(fmt, n, k, seed=5)
    layer = PackedLinear(k, n, True, fmt, device=DEVICE)
    with torch.no_grad():
        layer.packed.copy_(packed)
        layer.alphas.copy_(alpha)
        layer.bias.copy_(bias)
    return layer, codes


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_linear_uses_kernel(fmt, kernels_on, monkeypatch):
    layer, _ = packed_linear(fmt, 36, 20)
    x = torch.randn(2, 5, 36, device=DEVICE)
    monkeypatch.setenv("TERDIT_NO_KERNELS", "1")
    with torch.no_grad():
        ref = layer(x)  # unpack + F.linear
    assert kernels_on == []
    monkeypatch.delenv("TERDIT_NO_KERNELS")
    with torch.no_grad():
        y = layer(x)
    assert kernels_on == [10]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_kernel_declines_to_fallback(kernels_on):
    layer, codes = packed_linear("2bit", 36, 20)
    x = torch.randn(3, 36, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = layer(x)  # float64 and autograd: the kernel returns None, the layer unpacks
    assert kernels_on == [] and y.grad_fn is not None
    ref = reference(x.detach(), codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y.detach(), ref)


def test_auto_register(monkeypatch):
    saved = dict(seam._REGISTRY)
    try:
        seam._REGISTRY.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert auto_register() == [] and all(k[1] == "cpu" for k in seam._REGISTRY)  # CPU only: no CUDA
        seam._REGISTRY.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setenv("TERDIT_NO_KERNELS", "1")
        assert auto_register() == [] and not seam._REGISTRY
        monkeypatch.delenv("TERDIT_NO_KERNELS")
        assert auto_register() == ["2bit", "base3"]
        assert seam.registered_kernel("2bit", "cuda") is tk.packed_linear_kernel
        assert seam.registered_kernel("base3", "cuda") is tk.packed_linear_kernel
        tk.disable_triton_kernels("cuda")
        assert all(k[1] == "cpu" for k in seam._REGISTRY)  # the CPU integer kernels stay
    finally:
        seam._REGISTRY.clear()
        seam._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    """A random TerDiT-Micro deploy directory (2bit): every tensor random, so outputs are not trivial."""
    return random_deploy_dir(get_config("TerDiT-Micro"), "2bit", tmp_path_factory.mktemp("micro") / "dep", seed=3)


def test_deployed_model_with_kernels(micro_dir, kernels_on, monkeypatch):
    model = load_deployed(micro_dir, device=DEVICE)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(DEVICE)
    t, y = torch.tensor([10, 900], device=DEVICE), torch.tensor([1, cfg.num_classes], device=DEVICE)
    monkeypatch.setenv("TERDIT_NO_KERNELS", "1")
    with torch.no_grad():
        ref = model(x, t, y).sample
    monkeypatch.delenv("TERDIT_NO_KERNELS")
    with torch.no_grad():
        out = model(x, t, y).sample
    assert len(kernels_on) == 2 * 8  # every ternary linear of both blocks: 4 attention, 3 FFN, adaLN
    assert set(kernels_on) == {2, 32}  # adaLN rows (skinny kernel) and token rows (tiled kernel)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# --- sampler ---------------------------------------------------------------------------------------


def test_predrawn_noise_is_reference_order():
    shape = (2, 4, 8, 8)
    x0, zs = predraw_noise(shape, 5, seed=11, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(x0, torch.randn(shape, generator=gen))
    for k in range(5):
        assert torch.equal(zs[k], torch.randn(shape, generator=gen, dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(cfg_scale=4.0, sampler="ddpm", guide_channels=3),
        dict(cfg_scale=1.5, sampler="ddim", eta=0.5),
        dict(cfg_scale=1.0, sampler="ddpm"),
        dict(cfg_scale=2.0, sampler="ddim", eta=0.0),
    ],
    ids=["ddpm-cfg4-gc3", "ddim-eta.5", "ddpm-nocfg", "ddim-eta0"],
)
def test_fast_sampler_equals_reference(micro_dir, kwargs):
    """The pre-drawn-noise, device-indexed loop (eager: the code the CUDA graph captures) is bitwise the
    reference sampler."""
    model = load_deployed(micro_dir)  # CPU, no kernels: the unpack path on both sides
    labels = [3, 7, 0]
    ref = sample_latents(model, labels, steps=6, seed=5, **kwargs)
    fast = sample_latents_fast(model, labels, steps=6, seed=5, mode="auto", **kwargs)  # auto = eager on CPU
    assert torch.equal(fast, ref)


def test_fast_sampler_fixed_variance_and_one_step(tmp_path, micro_dir):
    cfg = get_config("TerDiT-Micro", learn_sigma=False)
    model = load_deployed(random_deploy_dir(cfg, "base3", tmp_path / "dep", seed=1))
    ref = sample_latents(model, [1, 2], cfg_scale=3.0, steps=4, seed=2)
    assert torch.equal(sample_latents_fast(model, [1, 2], cfg_scale=3.0, steps=4, seed=2), ref)
    model = load_deployed(micro_dir)
    ref = sample_latents(model, [1, 2], steps=1, seed=2)
    assert torch.equal(sample_latents_fast(model, [1, 2], steps=1, seed=2), ref)


def test_fast_sampler_modes(micro_dir):
    model = load_deployed(micro_dir)
    if DEVICE == "cpu":
        with pytest.raises(TerditError, match="CUDA"):
            sample_latents_fast(model, [1], steps=2, mode="graph")
    with pytest.raises(TerditError, match="mode"):
        sample_latents_fast(model, [1], steps=2, mode="compile")
    with pytest.raises(TerditError, match="classes"):
        sample_latents_fast(model, [99], steps=2)


def test_fast_sampler_with_kernels(micro_dir, kernels_on):
    """The whole path: packed model, Triton kernels (interpreted on CPU), fast loop; close to the reference."""
    model = load_deployed(micro_dir, device=DEVICE)
    fast = sample_latents_fast(model, [4], steps=2, seed=9)
    assert kernels_on
    seam._REGISTRY.clear()  # reference without kernels
    ref = sample_latents(model, [4], steps=2, seed=9)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_sampler_equals_eager(micro_dir):  # pragma: no cover - GPU only
    model = load_deployed(micro_dir, device="cuda")
    eager = sample_latents_fast(model, [1, 2], steps=5, seed=4, mode="eager")
    graph = sample_latents_fast(model, [1, 2], steps=5, seed=4, mode="graph")
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


# --- the GPU benchmark script ---------------------------------------------------------------------


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_shapes_and_cpu_exit(capsys):
    bench = _load_benchmark()
    assert bench.layer_shapes("TerDiT-600M") == [
        ("wq/wk/wv/wo", 1536, 1536, "tokens"),
        ("w1/w3", 1536, 4096, "tokens"),
        ("w2", 4096, 1536, "tokens"),
        ("adaLN", 1024, 9216, "adaln"),
    ]
    assert bench.layer_shapes("TerDiT-4.2B")[1:] == [
        ("w1/w3", 3072, 8192, "tokens"),
        ("w2", 8192, 3072, "tokens"),
        ("adaLN", 1024, 18432, "adaln"),
    ]
    assert bench._layer_target("adaln", 8, 3.1) == (3.0, True)
    assert bench._layer_target("tokens", 32, 0.8) == (0.9, False)
    assert bench._layer_target("tokens", 8, 1.0) == (None, None)
    if not torch.cuda.is_available():
        assert bench.main([]) == 0
        assert "CUDA is not available" in capsys.readouterr().out
