"""The CPU integer path of ternary layers (terdit.deploy.cpu_int8): int8 activations x int8 codes.

References are independent float64 computations of the same quantized arithmetic; the fallbacks are
compared bit for bit with the exact float path ("memory" policy). TERDIT_CPU_INT8=1 forces the path on
CPUs without int8 dot products too (torch._int_mm is exact there, only slower), so these run everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_models import random_micro
from safetensors.torch import load_file
from torch import nn

from terdit.deploy import PackedLinear, compile_int8_, cpu_int8, export_model, load_deployed, set_policy
from terdit.deploy import kernels as seam
from terdit.deploy.packed_linear import warm_cache
from terdit.models.configs import get_config
from terdit.models.terdit import FeedForward
from terdit.quant.bitnet import quantize_activations
from terdit.quant.packing import pack_rows

FORMATS = ["2bit", "base3"]
POLICIES = list(cpu_int8.INT8_POLICIES)


@pytest.fixture(autouse=True)
def int8_on(monkeypatch):
    monkeypatch.setenv("TERDIT_CPU_INT8", "1")
    monkeypatch.setenv("TERDIT_CPU_COMPILE", "0")  # eager: the same functions, without compile time
    monkeypatch.delenv("TERDIT_NO_KERNELS", raising=False)


def make_layer(fmt: str, n: int, k: int, policy: str, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    layer = PackedLinear(k, n, bias, fmt, policy)
    with torch.no_grad():
        layer.packed.copy_(pack_rows(codes, fmt)[0])
        layer.alphas.fill_(float(torch.rand(1, generator=g)) + 0.1)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer, codes


def quantized_reference(x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, bias) -> torch.Tensor:
    """Per-token absmax int8 activations (BitNet's definition, in fp32, written out here) times alpha * codes,
    the product and scaling in float64."""
    x32 = x.float().reshape(-1, x.shape[-1])
    scale = 127 / x32.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (x32 * scale).round().clamp(-127, 127)
    y = (q.double() @ codes.double().T) * alpha.double() / scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], codes.shape[0])


def test_quantize_tokens_matches_unfused_definition():
    x = torch.randn(3, 7, 40) * torch.rand(3, 7, 1) * 5
    x[0, 0] = 0  # an all-zero token: scale from the eps floor, codes 0
    qt = cpu_int8.quantize_tokens(x)
    assert qt.q.dtype == torch.int8 and qt.q.shape == (21, 40) and qt.lead == (3, 7) and qt.scale.shape == (21, 1)
    assert int(qt.q.abs().max()) == 127 and not qt.q[0].any()
    # BitNet's fake quantization (float ops, one per step) gives exactly the value the integers stand for
    assert torch.equal(cpu_int8.dequantize_tokens(qt), quantize_activations(x))
    bf = x.bfloat16()
    assert torch.equal(cpu_int8.dequantize_tokens(cpu_int8.quantize_tokens(bf)), quantize_activations(bf.float()))


def guided_step(cfg):
    """One guided forward (guidance 2, two labels, two timesteps) on fixed inputs, under inference mode: the same
    call for every model it is given, so policies compare on equal inputs."""
    from terdit.diffusion.guidance import guided_model_fn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y, t = torch.tensor([1, 4]), torch.tensor([10, 700])

    def run(m):
        with torch.inference_mode():
            return guided_model_fn(m, y, 2.0, null_class=cfg.num_classes)(x, t)

    return run


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (5, 64, 48), (18, 130, 33)])
def test_int8_layer_matches_quantized_float_reference(fmt, policy, m, k, n):
    layer, codes = make_layer(fmt, n, k, policy, seed=m + k)
    x = torch.randn(m, k)
    with torch.no_grad():
        y = layer(x)
    ref = quantized_reference(x, codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_layer_in_half_precision_rounds_only_its_output(policy, dtype, native_bf16, monkeypatch):
    """In bf16 / fp16 the matmul may write its output in that dtype (no fp32 buffer; oneDNN only for bf16 on
    AVX-512 CPUs, `NATIVE_BF16_OUT`, forced on and off here): the exact integer product, scaled, then rounded
    at most three times (matmul output, token scale, bias), each within half an ulp."""
    monkeypatch.setattr(cpu_int8, "NATIVE_BF16_OUT", native_bf16)
    assert cpu_int8.onednn_out_dtype(dtype) == (dtype if native_bf16 and dtype == torch.bfloat16 else torch.float32)
    layer, codes = make_layer("2bit", 96, 200, policy, seed=3)
    layer.to(dtype)
    x = (torch.randn(33, 200) * 3).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    ref = quantized_reference(x, codes, layer.alphas.double(), layer.bias.double())
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # relative spacing of the dtype's values
    torch.testing.assert_close(y.double(), ref, rtol=1.5 * ulp, atol=1.5 * ulp * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [3, 80])
def test_int8_packed_multiplies_in_blocks_of_output_rows(fmt, rows, monkeypatch):
    """"int8-packed" unpacks and multiplies blocks of output rows (few input rows: FEW_ROWS_BLOCK_BYTES; many:
    the scratch limit), here 5 and 7 rows of 33 (uneven last block): the same values as the reference, and the
    shared scratch never holds a whole layer."""
    monkeypatch.setattr(cpu_int8, "FEW_ROWS", 16)
    layer, codes = make_layer(fmt, 33, 130, "int8-packed", seed=rows)
    row_bytes = layer.packed.shape[1] * (4 if fmt == "2bit" else 5)
    monkeypatch.setattr(cpu_int8, "FEW_ROWS_BLOCK_BYTES", 5 * row_bytes)
    layer.scratch_limit = 7 * row_bytes
    x = torch.randn(rows, 130)
    with torch.no_grad():
        y = layer(x)
    ref = quantized_reference(x, codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))
    block = 5 if rows <= 16 else 7
    assert layer.scratch._bufs[(torch.device("cpu"), torch.int8)].numel() == block * row_bytes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [3, 80])
def test_packed_int8_mm_op_is_the_exact_integer_product(fmt, rows, monkeypatch):
    """The op a compiled block calls for an "int8-packed" layer (terdit::packed_int8_mm, the layer named by its
    handle): the exact int32 product of int8 tokens and the codes, in blocks of output rows as the eager path
    (5 and 7 rows of 33 here); torch.library.opcheck checks its schema and fake (meta) function."""
    monkeypatch.setattr(cpu_int8, "FEW_ROWS", 16)
    layer, codes = make_layer(fmt, 33, 130, "int8-packed", seed=rows)
    row_bytes = layer.packed.shape[1] * (4 if fmt == "2bit" else 5)
    monkeypatch.setattr(cpu_int8, "FEW_ROWS_BLOCK_BYTES", 5 * row_bytes)
    layer.scratch_limit = 7 * row_bytes
    q = torch.randint(-127, 128, (rows, 130), dtype=torch.int8, generator=torch.Generator().manual_seed(rows))
    handle = cpu_int8.packed_handle(layer)
    acc = torch.ops.terdit.packed_int8_mm(q, handle)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), q.long() @ codes.long().T)
    torch.library.opcheck(torch.ops.terdit.packed_int8_mm, (q, handle))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("policy", POLICIES)
def test_integer_accumulation_is_exact(fmt, policy, monkeypatch):
    # alpha 1 and one scale per token of exactly 1 (each token's absmax is 127): the output is the integer
    # dot product itself. With K = 4099 and |q| = 127 the sums reach ~5e5.
    k, n = 4099, 23
    layer, codes = make_layer(fmt, n, k, policy, bias=False)
    layer.alphas.data.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (6, k), generator=g)
    q[:, 0] = 127
    q[3] = torch.where(codes[0] >= 0, 127, -127)  # a token that hits the largest possible sum
    with torch.no_grad():
        y = layer(q.float())
    exact = q.long() @ codes.long().T
    assert torch.equal(y, exact.float()) and int(exact[3, 0]) == 127 * int(codes[0].abs().sum()) > 2**18


def test_block_paths_match_reference():
    """The model's own FeedForward over packed layers (module swap): w1 and w3 quantize x, w2 the SwiGLU
    product (fp32 here), each per token, as the reference does."""
    torch.manual_seed(0)
    dim, hidden = 48, 96
    layers = {}
    codes = {}
    for name, (i, o) in {"w1": (dim, hidden), "w2": (hidden, dim), "w3": (dim, hidden)}.items():
        layers[name], codes[name] = make_layer("2bit", o, i, "int8", seed=len(layers), bias=False)
    ff = FeedForward.__new__(FeedForward)
    torch.nn.Module.__init__(ff)
    ff.w1, ff.w2, ff.w3 = layers["w1"], layers["w2"], layers["w3"]
    block = ff
    x = torch.randn(2, 5, dim)
    with torch.no_grad():
        y = block(x)

    def ref(name, v):
        return quantized_reference(v, codes[name], layers[name].alphas, None)

    h = F.silu(ref("w1", x)) * ref("w3", x)
    torch.testing.assert_close(y.double(), ref("w2", h), rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_layers_on_one_input_quantize_it_once(mode, monkeypatch):
    """Sibling layers called on the same tensor (attention's wq, wk, wv) share its int8 tokens; another tensor,
    or (outside inference mode) an in-place change of the same one, is quantized again."""
    from terdit.deploy.packed_linear import Scratch

    scratch = Scratch()
    layers = []
    for seed in range(3):
        layer, _ = make_layer("2bit", 24, 40, "int8", seed=seed, bias=False)
        layer.scratch = scratch
        layers.append(layer)
    calls = []
    real = cpu_int8.quant_fn
    monkeypatch.setattr(cpu_int8, "quant_fn", lambda *a: calls.append(1) or real(*a))
    ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with ctx:
        x = torch.randn(2, 5, 40)
        ys = [w(x) for w in layers]
        assert len(calls) == 1
        for w, y in zip(layers, ys):  # each equals the layer on its own (fresh tokens)
            scratch.tokens.clear()
            assert torch.equal(w(x), y)
        calls.clear()
        layers[0](x.clone())
        assert len(calls) == 1
        if mode == "no_grad":
            x2 = torch.randn(2, 5, 40)
            layers[0](x2)
            x2.mul_(2)
            layers[1](x2)
            assert len(calls) == 3


@pytest.mark.parametrize("why", ["no-int8-cpu", "no-kernels", "float64", "autograd"])
@pytest.mark.parametrize("policy", POLICIES)
def test_fallbacks_take_the_exact_path(why, policy, monkeypatch):
    layer, codes = make_layer("base3", 20, 36, policy)
    exact, _ = make_layer("base3", 20, 36, "memory")
    x = torch.randn(3, 36, dtype=torch.float64 if why == "float64" else torch.float32)
    if why == "no-int8-cpu":
        monkeypatch.setenv("TERDIT_CPU_INT8", "0")
    if why == "no-kernels":
        monkeypatch.setenv("TERDIT_NO_KERNELS", "1")
    if why == "autograd":
        x.requires_grad_(True)
    assert not layer.int8_path(x)
    y = layer(x)
    assert torch.equal(y, exact(x))
    assert (y.grad_fn is not None) == (why == "autograd")
    float_ref = x.detach().double() @ (layer.alphas.double() * codes.double()).T + layer.bias.double()
    torch.testing.assert_close(y.detach().double(), float_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_policy_releases_packed_bytes_and_rebuilds_them(fmt):
    """"int8" keeps one byte per weight: once prepacked, the packed bytes are freed, and everything that reads
    them (state_dict, codes, a call the integer path declines, another policy, loading) gets the same bytes back."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: the int8 codes stay in the plain layout and the packed bytes are kept")
    layer, codes = make_layer(fmt, 33, 130, "int8")
    original = layer.packed.clone()
    x = torch.randn(4, 130)
    with torch.no_grad():
        y = layer(x)
    assert layer.packed_released and layer.packed.untyped_storage().nbytes() == 1
    assert layer.packed.shape == original.shape
    ref = quantized_reference(x, codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))
    # read without keeping: the layer stays released
    assert torch.equal(layer.state_dict()["packed"], original) and torch.equal(layer.codes(), codes)
    assert layer.packed_released
    # a call the integer path declines (float64) runs the exact float path on the rebuilt bytes
    float_ref = x.double() @ (layer.alphas.double() * codes.double()).T + layer.bias.double()
    torch.testing.assert_close(layer(x.double()), float_ref, rtol=1e-12, atol=1e-12)
    assert not layer.packed_released and torch.equal(layer.packed, original)
    # released again after a new prepack; loading another layer's tensors replaces codes and caches
    layer.set_policy("int8")
    with torch.no_grad():
        layer(x)
    assert layer.packed_released
    other, other_codes = make_layer(fmt, 33, 130, "memory", seed=7)
    layer.load_state_dict(other.state_dict())
    assert not layer.packed_released and torch.equal(layer.packed, other.packed)
    with torch.no_grad():
        y2 = layer(x)
    ref2 = quantized_reference(x, other_codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y2.double(), ref2, rtol=2e-6, atol=2e-6 * float(ref2.abs().max()))
    # another policy, and a cast (module._apply), start from the real bytes
    assert layer.packed_released
    layer.set_policy("memory")
    assert not layer.packed_released and torch.equal(layer.packed, other.packed)
    layer.set_policy("int8")
    with torch.no_grad():
        layer(x)
    layer.to(torch.float64)
    assert not layer.packed_released and torch.equal(layer.packed, other.packed)


@pytest.mark.parametrize("readback", ["fails", "differs"])
def test_int8_policy_keeps_packed_bytes_where_onednn_cannot_give_them_back(readback, monkeypatch):
    """The bytes are released only after reading the codes back from oneDNN's layout gave exactly them."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    real = PackedLinear._prepacked_codes

    def broken(self):
        codes = real(self)
        return None if readback == "fails" else codes.flip(0)

    monkeypatch.setattr(PackedLinear, "_prepacked_codes", broken)
    layer, codes = make_layer("2bit", 33, 130, "int8")
    original = layer.packed.clone()
    x = torch.randn(4, 130)
    with torch.no_grad():
        y = layer(x)
    assert not layer.packed_released and torch.equal(layer.packed, original)
    assert torch.equal(layer.state_dict()["packed"], original) and torch.equal(layer.codes(), codes)
    ref = quantized_reference(x, codes, layer.alphas, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


def test_cpu_flags_decide(monkeypatch):
    monkeypatch.delenv("TERDIT_CPU_INT8")
    monkeypatch.setattr(cpu_int8, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not cpu_int8.has_int8_dot()
    monkeypatch.setattr(cpu_int8, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    assert cpu_int8.has_int8_dot() == torch.backends.mkldnn.is_available()


def test_registry_policy_lookup():
    x = torch.zeros(1, 4)
    for policy in POLICIES:
        assert seam.find_kernel("2bit", x, policy) is cpu_int8.int8_kernel
    assert seam.find_kernel("2bit", x, "memory") is None and seam.find_kernel("2bit", x) is None

    def any_policy(layer, x):
        return None

    seam.register_kernel("2bit", "cpu", any_policy)
    try:
        assert seam.find_kernel("2bit", x, "memory") is any_policy
        assert seam.find_kernel("2bit", x, "int8") is cpu_int8.int8_kernel  # the policy's own kernel wins
    finally:
        seam.unregister_kernel("2bit", "cpu")


def test_int8_policy_leaves_per_sample_layers_packed():
    """layer_policy: "int8" maps the layers under a model's `_per_sample_modules` to "int8-packed" (matching whole
    name parts only), every other policy and every model without the attribute keep the policy as given."""
    from terdit.deploy.packed_linear import layer_policy

    tree = nn.Sequential(nn.Linear(8, 8))
    assert layer_policy(tree, "0", "int8") == "int8"  # no attribute: any module tree, all resident
    tree._per_sample_modules = ["cond"]
    assert layer_policy(tree, "blocks.0.cond.1", "int8") == "int8-packed"
    assert layer_policy(tree, "blocks.0.condition.1", "int8") == "int8"
    assert layer_policy(tree, "blocks.0.cond.1", "memory") == "memory"
    model = random_micro(seed=1)
    assert model._per_sample_modules == ["adaLN_modulation"]
    adaln = PackedLinear(8, 8, False, "2bit", "memory")
    model.layers[0].adaLN_modulation[1] = adaln  # set_policy applies it as pack_ does
    set_policy(model, "int8")
    assert adaln.policy == "int8-packed"
    set_policy(model, "speed")
    assert adaln.policy == "speed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_deployed_model_int8_policies(fmt, tmp_path, monkeypatch):
    """A whole model: the int8 policies stay close to the exact path, and equal it where int8 is off."""
    model = random_micro(seed=3)
    export_model(model, tmp_path / "dep", fmt)
    run = guided_step(get_config("TerDiT-Micro"))

    exact = run(load_deployed(tmp_path / "dep", policy="memory"))
    for policy in POLICIES:
        dep = load_deployed(tmp_path / "dep", policy=policy)
        for name, m in dep.named_modules():
            if isinstance(m, PackedLinear):  # "int8" leaves the adaLN layers (one row per image) packed
                per_sample = policy == "int8" and "adaLN_modulation" in name.split(".")
                assert m.policy == ("int8-packed" if per_sample else policy), (policy, name)
                assert m.packed_released == (m.policy == "int8" and torch.backends.mkldnn.is_available()), name
        if policy == "int8":  # the export of a released model is that of the original, tensor for tensor
            export_model(dep, tmp_path / "again", fmt)
            before, after = (load_file(tmp_path / d / "model.safetensors") for d in ("dep", "again"))
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
        out = run(dep)
        err = float((out - exact).norm() / exact.norm())
        assert 1e-7 < err < 0.03, (policy, err)  # activations are rounded to 8 bits: close, not equal
        # int8 off: the float path. base3 rows are summed in another order on some CPUs (AMD EPYC: 2e-7),
        # far below the 8-bit activation error above, so "equal" means float reassociation at most
        monkeypatch.setenv("TERDIT_CPU_INT8", "0")
        torch.testing.assert_close(run(dep), exact, rtol=0, atol=1e-6)
        monkeypatch.setenv("TERDIT_CPU_INT8", "1")
        set_policy(dep, "memory")
        torch.testing.assert_close(run(dep), exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", ["codes", "prepacked", "prepacked-bf16-out"])
def test_compiled_matches_eager(weights, monkeypatch):
    """torch.compile of the integer path's units (quantize; multiply and scale) gives the eager values (one tiny
    SwiGLU, compiled once), with int8 codes (torch._int_mm) and with oneDNN-prepacked weights behind the
    terdit::qlinear_u8 op, writing fp32 or (as on AVX-512 CPUs) bf16."""
    monkeypatch.setattr(cpu_int8, "NATIVE_BF16_OUT", weights == "prepacked-bf16-out")
    torch.manual_seed(1)
    x = torch.randn(6, 32).bfloat16()
    codes = [torch.randint(-1, 2, s, dtype=torch.int8) for s in ((64, 32), (64, 32), (32, 64))]
    alphas = [torch.rand(1) + 0.1 for _ in codes]
    if weights != "codes":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN")
        keep = [cpu_int8.prepack(c) for c in codes]
        codes = [handle for _, handle in keep]

    def swiglu(call):
        (c1, c3, c2), (a1, a3, a2) = codes, alphas
        unsigned = c1.dtype == torch.int64
        q, scale = call(cpu_int8.quant_fn, x, unsigned)
        h = F.silu(call(cpu_int8.mm_fn, q, scale, c1, a1, None, x.dtype))
        h = h * call(cpu_int8.mm_fn, q, scale, c3, a3, None, x.dtype)
        q2, scale2 = call(cpu_int8.quant_fn, h, unsigned)
        return call(cpu_int8.mm_fn, q2, scale2, c2, a2, None, x.dtype)

    eager = swiglu(lambda fn, *args: fn(*args))
    monkeypatch.setenv("TERDIT_CPU_COMPILE", "1")
    if not cpu_int8.compile_enabled():
        pytest.skip("torch.compile failed earlier in this process")
    with torch.inference_mode():
        compiled = swiglu(cpu_int8.run)
    if not cpu_int8.compile_enabled():
        pytest.skip("torch.compile is not available here (the eager path ran)")
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2 * float(eager.abs().max()))


def test_act_bits_qat_layer_and_train_args():
    """--act-bits 8: a TernaryLinear rounds its input exactly as the integer path, with straight-through grads."""
    from terdit.errors import TerditError
    from terdit.quant.ternary import TernaryLinear, set_act_bits
    from terdit.training.trainer import TrainArgs

    torch.manual_seed(0)
    layer = TernaryLinear(40, 24, bias=True)
    assert set_act_bits(torch.nn.Sequential(layer), 8) == 1 and "act_bits=8" in repr(layer)
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        w = layer.quantized_weight()
        ref = quantized_reference(x, (w / layer.alphas).round().to(torch.int8), layer.alphas, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand_as(x))  # straight through the rounding
    with pytest.raises(ValueError):
        set_act_bits(layer, 4)
    with pytest.raises(TerditError, match="act_bits"):
        TrainArgs(act_bits=4).validate()


def test_act_bits_model_is_what_the_integer_path_computes(tmp_path):
    """A model with 8-bit activation QAT, exported: the int8 policy reproduces it (to float rounding, and
    the odd activation that rounds the other way), far closer than the exact path does."""
    from terdit.diffusion.guidance import guided_model_fn
    from terdit.quant.ternary import set_act_bits

    model = random_micro(seed=4)
    export_model(model, tmp_path / "dep", "2bit")
    set_act_bits(model, 8)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.tensor([5, 300, 900]), torch.tensor([0, 2, 7])
    def run(m):
        with torch.inference_mode():
            return guided_model_fn(m, y, 3.0, null_class=cfg.num_classes)(x, t)

    qat = run(model)
    int8 = run(load_deployed(tmp_path / "dep", policy="int8"))
    exact = run(load_deployed(tmp_path / "dep", policy="memory"))

    def rel(a):
        return float((a - qat).norm() / qat.norm())

    assert rel(int8) < 1e-3 and rel(exact) > 10 * rel(int8), (rel(int8), rel(exact))


@pytest.mark.parametrize("policy", cpu_int8.INT8_POLICIES)
def test_compiled_blocks_match_the_per_layer_path(tmp_path, monkeypatch, policy):
    """compile_int8_ (what load_deployed does for the int8 policies): each transformer block compiled around
    its packed layers, "int8" ones multiplying with their prepacked weight and "int8-packed" ones (adaLN's in
    an "int8" model) through the opaque unpack-and-multiply op, so Inductor fuses norms, modulation, RoPE and
    the quantization of one input: computes what the per-layer units compute, with one graph for all blocks."""
    model = random_micro(seed=5)
    export_model(model, tmp_path / "dep", "2bit")
    run = guided_step(model.config)

    def compiled(m):
        return [n for n, mod in m.named_modules() if getattr(mod._compiled_call_impl, "terdit_int8", False)]

    eager = load_deployed(tmp_path / "dep", policy=policy)  # TERDIT_CPU_COMPILE=0: per-layer, eager
    assert compiled(eager) == []
    per_layer = run(eager)
    monkeypatch.setenv("TERDIT_CPU_COMPILE", "1")
    if not cpu_int8.compile_enabled():
        pytest.skip("torch.compile failed earlier in this process")
    dep = load_deployed(tmp_path / "dep", policy=policy)
    assert sorted(compiled(dep)) == [f"layers.{i}" for i in range(model.config.depth)]
    packed = {n: m for n, m in dep.named_modules() if isinstance(m, PackedLinear)}
    in_blocks = {n for n in packed if n.startswith("layers.")}
    assert {n for n, m in packed.items() if m.traced_int8} == in_blocks
    assert {n for n, m in packed.items() if m.packed_handle is not None} == {
        n for n in in_blocks if policy == "int8-packed" or "adaLN_modulation" in n}
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # the two policies' graphs look alike: count this model's own
    counters.clear()
    out = run(dep)
    if not cpu_int8.compile_enabled():
        pytest.skip("torch.compile is not available here (the eager path ran)")
    torch.testing.assert_close(out, per_layer, rtol=1e-4, atol=1e-4 * float(per_layer.abs().max()))
    torch.testing.assert_close(run(dep), out, rtol=0, atol=0)
    # one graph that every block shares (RoPE's rotation was cached when the model was built): no graph break
    # (adaLN's packed layer is inside), no recompile per block, nothing compiled again on the second step
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    dep.set_ffn_chunk_rows(5)  # the compiled FFN on 2-D chunks of tokens (an uneven last one): the same step
    torch.testing.assert_close(run(dep), out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))
    set_policy(dep, "memory")  # leaving int8 drops the compiled parents
    assert compiled(dep) == [] and not any(m.traced_int8 or m.packed_handle is not None for m in packed.values())
    set_policy(dep, policy)
    dep.layers[1].attention.wo.set_policy("memory")  # a block with a layer of another policy stays per layer
    mixed = run(dep)
    warm_cache(dep, torch.float32)
    assert compile_int8_(dep) == model.config.depth - 1 and "layers.1" not in compiled(dep)
    torch.testing.assert_close(run(dep), mixed, rtol=1e-4, atol=1e-4 * float(mixed.abs().max()))


def test_compile_units_are_the_repeated_blocks_else_the_linear_parents():
    """What compile_int8_ and the benchmark's compiled full-precision baseline compile: TerDiT's blocks (its
    `_repeated_blocks`, diffusers' regional compilation), or for a model without them each module holding a
    layer among its children."""
    from random_models import tiny_dit

    from terdit.deploy.bench_worker import compile_like_int8_
    from terdit.models.compiling import compile_units, repeated_blocks

    def linear(m):
        return isinstance(m, nn.Linear)

    model = random_micro(seed=1, linear="fp", qk_norm=True)
    assert repeated_blocks(model) == compile_units(model, linear) == list(model.layers)
    dit = tiny_dit()  # diffusers' DiT declares no _repeated_blocks: its transformer_blocks (what train --compile uses)
    assert repeated_blocks(dit) == compile_units(dit, linear) == list(dit.transformer_blocks)
    plain = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), nn.ReLU())
    assert repeated_blocks(plain) == []
    assert compile_units(plain, linear) == [plain, plain[1]]
    assert compile_units(plain, lambda m: False) == []
    # the full-precision baseline compiled so (RoPE in real arithmetic, norms fused): the eager step's values
    run = guided_step(model.config)
    eager = run(model)
    assert compile_like_int8_(model) == model.config.depth
    torch.testing.assert_close(run(model), eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@pytest.mark.parametrize("policy", cpu_int8.INT8_POLICIES)
def test_compile_failure_runs_the_int8_model_eagerly(tmp_path, monkeypatch, failing_compile, policy):
    """A compiled block whose compile fails (a backend error, as with no C++ compiler): one warning, the
    process's integer path goes eager, and the step equals the eager per-layer one."""
    model = random_micro(seed=5)
    export_model(model, tmp_path / "dep", "2bit")
    run = guided_step(model.config)
    per_layer = run(load_deployed(tmp_path / "dep", policy=policy))  # TERDIT_CPU_COMPILE=0, before any compile
    monkeypatch.setenv("TERDIT_CPU_COMPILE", "1")
    dep = load_deployed(tmp_path / "dep", policy=policy)
    assert any(getattr(m._compiled_call_impl, "terdit_int8", False) for m in dep.modules())
    with pytest.warns(UserWarning, match="torch.compile failed") as record:
        out = run(dep)
    assert sum("torch.compile failed" in str(w.message) for w in record) == 1
    assert not cpu_int8.compile_enabled()
    assert not any(m._compiled_call_impl is not None or getattr(m, "traced_int8", False)
                   or getattr(m, "packed_handle", None) is not None for m in dep.modules())
    assert torch.equal(out, per_layer)


@pytest.mark.parametrize("policy", POLICIES)
def test_int8_ffn_in_chunks_of_tokens_gives_the_whole_batch_step(policy, monkeypatch, tmp_path):
    """On CPU load_deployed runs FFNs on chunks of tokens where each weight unpacks at most once per FFN call
    (chunk_ffn_: resident weights, and "int8-packed" whose codes stay in the scratch); activations are
    quantized per token, so chunks give the whole-batch step's values: compared with chunking off, and with
    5-token chunks (an uneven last one). "memory" unpacks per call and runs whole."""
    from terdit.deploy.bench import random_deploy_dir
    from terdit.deploy.packed_linear import FFN_CHUNK_BYTES, ffn_chunk_rows

    assert ffn_chunk_rows(get_config("TerDiT-600M").ffn_hidden) * 4 * 4096 == FFN_CHUNK_BYTES  # 512 tokens
    assert ffn_chunk_rows(10**9) == 1
    model = random_micro(seed=6)
    export_model(model, tmp_path / "dep", "2bit")
    run = guided_step(model.config)
    dep = load_deployed(tmp_path / "dep", policy=policy)
    assert {b.ffn_chunk_rows for b in dep.layers} == {ffn_chunk_rows(model.config.ffn_hidden)}
    dep.set_ffn_chunk_rows(None)
    whole = run(dep)
    dep.set_ffn_chunk_rows(5)
    torch.testing.assert_close(run(dep), whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))
    rows = ffn_chunk_rows(model.config.ffn_hidden)
    for other, chunked in (("memory", False), ("speed", True), ("int8", True), ("int8-packed", True)):
        set_policy(dep, other)
        assert {b.ffn_chunk_rows for b in dep.layers} == {rows if chunked else None}, other
    assert load_deployed(tmp_path / "dep", policy="memory").layers[0].ffn_chunk_rows is None
    monkeypatch.setenv("TERDIT_CPU_INT8", "0")  # no integer path: both int8 policies unpack floats per call
    for other, chunked in (("int8", False), ("int8-packed", False), ("speed", True)):
        set_policy(dep, other)
        assert {b.ffn_chunk_rows for b in dep.layers} == {rows if chunked else None}, other
    monkeypatch.setenv("TERDIT_CPU_INT8", "1")
    fp_dir = random_deploy_dir(get_config("TerDiT-Micro", ternary=False), "fp", tmp_path / "fp")
    assert load_deployed(fp_dir).layers[0].ffn_chunk_rows == rows  # the full-precision baseline: chunked too


def test_int8_packed_ffn_on_chunks_unpacks_each_layer_once_per_call(monkeypatch, tmp_path):
    """"int8-packed" FFNs on chunks of tokens keep their codes side by side in the int8 scratch: each layer
    unpacks once per FFN call (not per chunk), every other layer's unpack overwrites them (the next block
    unpacks again), and the step equals the per-layer float reference of the same quantized computation
    (layers run by hand on the whole batch, codes unpacked by the packing module)."""
    from terdit.quant.packing import unpack_rows

    model = random_micro(seed=7)
    export_model(model, tmp_path / "dep", "2bit")
    dep = load_deployed(tmp_path / "dep", policy="int8-packed")
    ffns = [[m for m in b.feed_forward.modules() if isinstance(m, PackedLinear)] for b in dep.layers]
    sizes = [m.unpacked_numel for m in ffns[0]]  # every block's FFN has the same shapes
    assert [[m.hold_offset for m in f] for f in ffns] == [[sum(sizes[:i]) for i in range(len(sizes))]] * len(ffns)
    calls, real = [], cpu_int8.unpack_codes_into

    def counted(packed, *args, **kwargs):
        calls.append(packed.data_ptr())
        return real(packed, *args, **kwargs)

    monkeypatch.setattr(cpu_int8, "unpack_codes_into", counted)
    block = dep.layers[0]
    h = torch.randn(2, 9, model.config.dim)
    block.ffn_chunk_rows = 4  # 18 tokens: chunks of 4, 4, 4, 4, 2
    out = block.ffn(h)
    assert sorted(calls) == sorted(m.packed.data_ptr() for m in ffns[0])  # once per layer, five chunks
    calls.clear()
    block.ffn(h)
    assert calls == []  # still in the scratch
    dep.layers[0].attention.wq(h)  # another layer's unpack overwrites the start of the buffer
    block.ffn(h)
    assert ffns[0][0].packed.data_ptr() in calls

    def reference(x: torch.Tensor, m: PackedLinear) -> torch.Tensor:  # per token, codes from the packing module
        codes = unpack_rows(m.packed, m.fmt, m.in_features, torch.float64)
        return quantized_reference(x.reshape(-1, x.shape[-1]).double(), codes, m.alphas.double(), m.bias)

    w1, w2, w3 = (block.feed_forward.w1, block.feed_forward.w2, block.feed_forward.w3)
    hidden = F.silu(reference(h, w1)) * reference(h, w3)
    expected = reference(hidden.float(), w2).view_as(out)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_scratch_holds_contents_until_overwritten():
    """Scratch.held refills only when its owner's contents may be gone: a plain get of the buffer, another
    owner written over the same bytes, or a new stamp (the owner's data changed)."""
    from terdit.deploy.packed_linear import Scratch

    scratch, a, b = Scratch(), nn.Linear(1, 1), nn.Linear(1, 1)
    fills = []

    def hold(owner, stamp, offset, value):
        def fill(out):
            fills.append(value)
            out.fill_(value)
        return scratch.held(owner, stamp, offset, 4, torch.int8, torch.device("cpu"), fill)

    assert hold(a, 0, 0, 1).tolist() == [1] * 4 and hold(b, 0, 4, 2).tolist() == [2] * 4  # b grows the buffer
    assert hold(a, 0, 0, 9).tolist() == [1] * 4 and fills == [1, 2]  # both kept, side by side
    hold(b, 0, 2, 3)  # b somewhere else, over half of a: a is refilled, b at 4 is gone too
    assert hold(a, 0, 0, 4).tolist() == [4] * 4 and fills == [1, 2, 3, 4]
    assert hold(a, 1, 0, 5).tolist() == [5] * 4  # a new stamp
    scratch.get(1, torch.int32, torch.device("cpu"))  # another buffer: a kept
    assert hold(a, 1, 0, 6).tolist() == [5] * 4
    scratch.get(1, torch.int8, torch.device("cpu"))
    assert hold(a, 1, 0, 7).tolist() == [7] * 4 and fills == [1, 2, 3, 4, 5, 7]


def test_large_int8_packed_ffn_runs_whole(monkeypatch, tmp_path):
    """An "int8-packed" FFN whose codes do not fit side by side in HELD_FFN_BYTES (4.2B's) runs whole: on
    chunks each layer would unpack once per chunk."""
    from terdit.deploy import packed_linear

    model = random_micro(seed=8)
    export_model(model, tmp_path / "dep", "2bit")
    ffn_bytes = sum(m.unpacked_numel for m in load_deployed(tmp_path / "dep", policy="int8-packed")
                    .layers[0].feed_forward.modules() if isinstance(m, PackedLinear))
    monkeypatch.setattr(packed_linear, "HELD_FFN_BYTES", ffn_bytes)
    dep = load_deployed(tmp_path / "dep", policy="int8-packed")
    assert dep.layers[0].ffn_chunk_rows is not None
    monkeypatch.setattr(packed_linear, "HELD_FFN_BYTES", ffn_bytes - 1)
    set_policy(dep, "int8-packed")
    assert {b.ffn_chunk_rows for b in dep.layers} == {None}
    assert all(m.hold_offset is None for m in dep.modules() if isinstance(m, PackedLinear))


def test_cpu_int8_benchmark_judges_speed_and_memory_apart():
    """benchmarks/cpu_int8.py: each target's speed and memory verdicts are separate, memory against the
    smaller FP bf16 peak (eager or compiled) both as whole processes and above the runtime, and a run without
    peak processes says "not measured" instead of "NOT met". Ratios checked against hand-computed ones."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_int8.py"
    spec = importlib.util.spec_from_file_location("cpu_int8_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def speed(median: float) -> dict:
        return {"median": median, "min": median, "max": median}

    row = {"threads": 2, "batch": 1,
           "speedup_vs_fp-bf16": {"int8": speed(1.6), "int8-packed": speed(1.1)},
           "speedup_vs_fp-bf16-compiled": {"int8": speed(1.45), "int8-packed": speed(0.9)}}
    mem = [("fp-bf16", 1600.0), ("fp-bf16-compiled", 1650.0), ("int8", 1000.0), ("int8-packed", 700.0)]
    out = {"config": "TerDiT-600M", "times": [row],
           "memory": [{"variant": v, "batch": 1, "peak_mb": p, "rss_runtime_mb": 400.0} for v, p in mem]}
    t = bench.targets(out)
    int8, packed = t["int8 threads=2 batch=1"], t["int8-packed threads=2 batch=1"]
    assert int8["speedup"] == 1.45 and int8["speed_met"]  # the faster FP bf16 (compiled) is the baseline
    assert int8["peak_ratio"] == pytest.approx(1000 / 1600) and int8["peak_met"] is False
    assert int8["peak_ratio_above_runtime"] == pytest.approx(600 / 1200) and int8["peak_met_above_runtime"]
    assert int8["met"] is False
    assert packed["speedup"] == 0.9 and not packed["speed_met"]
    assert packed["peak_ratio_above_runtime"] == pytest.approx(300 / 1200) and packed["peak_met_above_runtime"]
    line = bench.verdict("int8 threads=2 batch=1", int8)
    assert "x1.45" in line and "(>= 1.4) MET" in line
    assert "x0.625 whole process NOT met" in line and "x0.500 above the runtime MET" in line

    no_peaks = bench.targets({**out, "memory": []})["int8 threads=2 batch=1"]
    assert no_peaks["speed_met"] and no_peaks["peak_met"] is None and no_peaks["met"] is False
    line = bench.verdict("int8 threads=2 batch=1", no_peaks)
    assert line.endswith("not measured") and "NOT met" not in line
    assert bench.targets({**out, "config": "TerDiT-Digits"}) == {}  # the targets are set for 600M only
