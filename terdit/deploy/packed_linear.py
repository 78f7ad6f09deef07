"""Inference linear layer whose ternary weight stays packed in memory.

Two policies trade memory for time:

- "memory": the layer keeps only its packed bytes (2 or 1.6 bits per weight). Each forward unpacks the
  weight into a scratch buffer shared by all layers of the model (`Scratch`), multiplies and moves on,
  so at most one layer's unpacked weight exists at any time; layers above SCRATCH_LIMIT_BYTES are done
  in blocks of output rows, so the scratch never exceeds that. Cost: one gather pass over the weight
  per call (about 7% of the matmul for a 600M FFN layer at 1024 tokens on CPU).
- "speed": the first forward unpacks once into a cached tensor in the compute dtype, and later calls
  are a plain matmul. Resident memory is then that of a full-precision model in the compute dtype.
- "int8" / "int8-packed" (CPU): integer compute with 8-bit activations, codes resident as int8 or kept
  packed (see terdit.deploy.cpu_int8); calls the integer path does not take run like "memory".

Packing is a module swap (`pack_`, in the style of torchao's `quantize_`): each selected linear of any module
tree is replaced in place by a PackedLinear, and nothing else of the model changes (no packed subclass of the
model's blocks). Everything the packed policies need lives in this layer and in the kernels it dispatches to
(terdit.deploy.kernels): the memory policy's bound on unpacked weight bytes (row blocks through the shared
scratch) and the integer path's activation quantization, shared by layers on one input (terdit.deploy.cpu_int8).
Activations are those of the model's own forward; when the blocks were packed subclasses, the memory policy
also ran attention by groups of heads and the FFN by blocks of hidden units: without that, 4.2B at 1024
tokens peaks ~100 MB higher in fp32 (2 of its blocks measured: 636 -> 734 MB) and the same in bf16 (640 -> 636).

Inference only: weights have no gradient. If autograd is recording with an input that needs grad, the
memory policy unpacks into a fresh tensor instead of the shared scratch (autograd would keep a reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import terdit.deploy.cpu_int8 as cpu_int8
from terdit.deploy.backends import auto_register
from terdit.deploy.kernels import find_kernel
from terdit.errors import TerditError
from terdit.models.compiling import compile_units, compile_with_fallback
from terdit.quant.module_swap import FilterFn
from terdit.quant.packing import DIGITS, FORMATS, code_lut, pack_rows, rows_shape, unpack_rows, unpack_rows_into
from terdit.quant.ptq import quantize_ternary
from terdit.quant.ternary import TernaryLinear, ternarize

POLICIES: tuple[str, ...] = ("memory", "speed", *cpu_int8.INT8_POLICIES)
# Memory policy: a layer whose unpacked weight is larger than this is unpacked and multiplied in blocks of
# output rows, so the shared scratch stays small (4.2B: 16 MiB instead of 96 MiB for an FFN weight).
SCRATCH_LIMIT_BYTES = 16 * 2**20
# On CPU a TerDiT block's FFN runs on chunks of tokens whose fp32 hidden activation (rows x ffn_hidden) stays
# under this (`chunk_ffn_`): at 600M, batch 4 with guidance, the step's peak fell by ~45 MiB, FP bf16 and int8.
FFN_CHUNK_BYTES = 8 * 2**20
# "int8-packed" FFNs run on chunks too when their layers' int8 codes fit side by side in this much of the
# scratch (600M: 3 x 6 MiB; 4.2B's 3 x 24 MiB do not): each layer then unpacks once per FFN call, not per chunk.
HELD_FFN_BYTES = 32 * 2**20


class Scratch:
    """What the packed layers of one model share: reusable unpack buffers, one per (device, dtype), grown to
    the largest request, and the integer path's last quantized input (`cpu_int8.SharedTokens`)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # per buffer, whose contents it still holds (`held`): (owner, offset, numel, stamp)
        self._held: dict[tuple[torch.device, torch.dtype], list[tuple[nn.Module, int, int, object]]] = {}
        self.tokens = cpu_int8.SharedTokens()  # the integer path's last quantized input, for sibling layers

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of `numel` elements, to overwrite from its start: it no longer holds anyone's contents."""
        key = (torch.device(device), dtype)
        self._held.pop(key, None)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # free the smaller one before allocating
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def held(self, owner: nn.Module, stamp: object, offset: int, numel: int, dtype: torch.dtype,
             device: torch.device, fill: Callable[[torch.Tensor], object]) -> torch.Tensor:
        """`numel` elements at `offset` of the (device, dtype) buffer, with `owner`'s contents: written by `fill`
        unless still there from owner's last call with the same `stamp` (no `get` of this buffer since, nor
        another owner's contents written over them). Lets an FFN run on chunks of tokens unpack each layer once
        ("int8-packed"); `stamp` says which version of the owner's data they are."""
        key = (torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < offset + numel:  # grow, keeping what it holds
            grown = self._bufs[key] = torch.empty(offset + numel, dtype=dtype, device=device)
            if buf is not None:
                grown[: buf.numel()].copy_(buf)
        view = self._bufs[key][offset : offset + numel]
        entries = self._held.setdefault(key, [])
        if not any(o is owner and e == [offset, numel, stamp] for o, *e in entries):
            entries[:] = [e for e in entries if e[1] + e[2] <= offset or e[1] >= offset + numel]
            fill(view)
            entries.append((owner, offset, numel, stamp))
        return view

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.get(numel, dtype, device)

    def clear(self) -> None:
        self._bufs.clear()
        self._held.clear()
        self.tokens.clear()


class PackedLinear(nn.Module):
    """y = x @ (alpha * codes).T + bias, codes packed in the rows layout of `fmt` (terdit.quant.packing)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        fmt: str,
        policy: str = "memory",
        scratch: Scratch | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.in_features, self.out_features, self.fmt, self.policy = in_features, out_features, fmt, policy
        self.register_buffer(
            "packed",
            torch.empty(rows_shape(fmt, out_features, in_features), dtype=torch.uint8, device=device),
        )
        self.register_buffer("alphas", torch.empty(1, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.scratch = scratch if scratch is not None else Scratch()
        self.scratch_limit = SCRATCH_LIMIT_BYTES
        # "int8-packed" in an FFN run on chunks of tokens: where its codes stay in the int8 scratch (`chunk_ffn_`)
        self.hold_offset: int | None = None
        self._cached: torch.Tensor | None = None
        self._prepacked: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 policy: oneDNN weight, handle
        # set by `compile_int8_`: inside its compiled block the layer's integer path is traced (traced_int8;
        # "int8-packed" multiplies through the op that `packed_handle` names, `cpu_int8.packed_int8_mm`)
        self.traced_int8 = False
        self.packed_handle: torch.Tensor | None = None
        # "int8" policy: `packed` is a placeholder of its shape (1 byte of storage) while the prepacked weight
        # holds the codes (`release_packed`); what reads its bytes calls `restore_packed` first
        self.packed_released = False

    @property
    def unpacked_numel(self) -> int:
        """Elements of the unpacked buffer, including the padding columns of the last byte of each row."""
        return self.packed.shape[0] * self.packed.shape[1] * DIGITS[self.fmt]

    def codes(self) -> torch.Tensor:
        """The int8 ternary codes [out, in] (validating path, for export and tests)."""
        return unpack_rows(self.packed_data(), self.fmt, self.in_features, name="PackedLinear")

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.restore_packed()
        self.policy = policy
        self._cached = None
        self._prepacked = None

    def int8_codes(self) -> torch.Tensor:
        """The codes as a resident contiguous int8 [out, in] tensor ("int8" policy; unpacked on first use)."""
        cached = self._cached
        if cached is None or cached.dtype != torch.int8:
            self.restore_packed()
            buf = torch.empty(self.unpacked_numel, dtype=torch.int8, device=self.packed.device)
            codes = cpu_int8.unpack_codes_into(self.packed, self.fmt, buf)[:, : self.in_features]
            self._cached = cached = codes.contiguous()
        return cached

    def int8_weight(self) -> torch.Tensor:
        """"int8" policy: the codes prepacked for oneDNN's int8 matmul (resident; the int8 codes are then
        dropped, and so are the packed bytes, see `release_packed`), as the handle `cpu_int8` multiplies with;
        the plain int8 codes where oneDNN is missing."""
        if not torch.backends.mkldnn.is_available():
            return self.int8_codes()
        if self._prepacked is None:
            codes = self.int8_codes()
            self._prepacked = cpu_int8.prepack(codes)
            self._cached = None
            self.release_packed(codes)
        return self._prepacked[1]

    def _prepacked_codes(self) -> torch.Tensor | None:
        """The int8 codes [out, in] read back from the prepacked oneDNN weight (a reorder to the plain layout,
        [in, out]), or None where there is none or oneDNN cannot read it back."""
        if self._prepacked is None:
            return None
        try:
            return self._prepacked[0].to_dense().t()
        except RuntimeError:
            return None

    def release_packed(self, codes: torch.Tensor) -> None:
        """Free the packed bytes once the prepacked weight holds the same codes: the "int8" policy's resident
        weight is then 1 byte per weight, not 1.25 (at 600M, 144 MiB of 720). Only where reading the codes
        back from oneDNN's layout gives exactly `codes` (checked here, once), so `restore_packed` can rebuild
        the bytes for export, `state_dict`, another policy, or a call the integer path declines."""
        back = self._prepacked_codes()
        if self.packed.device.type == "cpu" and back is not None and torch.equal(back, codes):
            self.packed = torch.zeros(1, dtype=torch.uint8).expand(self.packed.shape)
            self.packed_released = True

    def restore_packed(self) -> None:
        """Rebuild the packed bytes that `release_packed` freed (a no-op otherwise)."""
        if self.packed_released:
            self.packed = self.packed_data()
            self.packed_released = False

    def packed_data(self) -> torch.Tensor:
        """The packed bytes, rebuilt for the caller only if released: the layer stays at 1 byte per weight."""
        if not self.packed_released:
            return self.packed
        codes = self._prepacked_codes()
        if codes is None:  # release_packed checked that it reads back; losing it since is a bug
            raise TerditError("PackedLinear: packed bytes were released but the prepacked weight is gone")
        return pack_rows(codes.contiguous(), self.fmt)[0]

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_released:
            destination[prefix + "packed"] = self.packed_data()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self.restore_packed()  # real storage to load into; the caches then describe the old weight
        self._cached = self._prepacked = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def int8_path(self, x: torch.Tensor) -> bool:
        """Whether a call with input `x` takes the integer path (int8 policies, see terdit.deploy.cpu_int8)."""
        return find_kernel(self.fmt, x, self.policy) is cpu_int8.int8_kernel and cpu_int8.accepts(self, x)

    def _row_block(self, dtype: torch.dtype, limit: int | None = None) -> int:
        """Output rows unpacked at once into the scratch, as `dtype` (all of them unless over `limit` bytes, by
        default scratch_limit): the memory policy's blocks, and "int8-packed"'s (`cpu_int8.packed_acc`)."""
        row_bytes = self.packed.shape[1] * DIGITS[self.fmt] * dtype.itemsize
        return max(1, min(self.out_features, (self.scratch_limit if limit is None else limit) // row_bytes))

    def _unpack(self, out: torch.Tensor, dtype: torch.dtype, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Unpack output rows r0:r1 into the flat buffer `out`; returns the [rows, in] view."""
        r1 = self.out_features if r1 is None else r1
        self.restore_packed()  # "int8" policy, a call the integer path declined
        return self._unpack_bytes(self.packed[r0:r1], out, dtype)[:, : self.in_features]

    def _unpack_bytes(self, packed: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Unpack a [rows, bytes] block of the packed weight into the flat buffer `out`, as [rows, bytes * k]."""
        lut = code_lut(self.fmt, self.alphas, dtype)
        index = None
        if self.policy == "memory":
            index = self.scratch.get(packed.numel(), torch.int32, self.packed.device)
        out = out[: packed.numel() * DIGITS[self.fmt]]
        unpack_rows_into(packed, lut, out, index)
        return out.view(packed.shape[0], -1)

    def weight_for(self, dtype: torch.dtype, need_fresh: bool = False) -> torch.Tensor:
        """alpha * codes as a [out, in] tensor in `dtype` (possibly a strided view), per the policy."""
        if self.policy == "speed":
            cached = self._cached
            if cached is None or cached.dtype != dtype or cached.device != self.packed.device:
                buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
                # base3 rows end in up to 4 padding codes: a dense copy keeps the GEMM on the same path as fp32
                self._cached = cached = self._unpack(buf, dtype).contiguous()
            return cached
        if need_fresh:
            buf = torch.empty(self.unpacked_numel, dtype=dtype, device=self.packed.device)
        else:
            buf = self.scratch.get(self.unpacked_numel, dtype, self.packed.device)
        return self._unpack(buf, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.traced_int8 and torch.compiler.is_compiling():
            y = cpu_int8.traced_kernel(self, x)
            if y is not None:
                return y
        kernel = find_kernel(self.fmt, x, self.policy)
        if kernel is not None:
            y = kernel(self, x)
            if y is not None:  # None: the kernel declined this call (dtype, autograd, ...)
                return y
        need_fresh = torch.is_grad_enabled() and x.requires_grad
        block = self._row_block(x.dtype)
        if self.policy == "speed" or need_fresh or block >= self.out_features:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight_for(x.dtype, need_fresh), b)
        # memory policy, large layer: unpack and multiply one block of output rows at a time
        x2 = x.reshape(-1, self.in_features)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for r0 in range(0, self.out_features, block):
            r1 = min(self.out_features, r0 + block)
            y[:, r0:r1] = self.rows_linear(x2, r0, r1)
        return y.view(*x.shape[:-1], self.out_features)

    def rows_linear(self, x2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Output columns r0:r1 of the layer for a 2-D input, unpacking only those weight rows (scratch)."""
        rows = r1 - r0
        buf = self.scratch.get(rows * self.packed.shape[1] * DIGITS[self.fmt], x2.dtype, self.packed.device)
        b = None if self.bias is None else self.bias[r0:r1].to(x2.dtype)
        return F.linear(x2, self._unpack(buf, x2.dtype, r0, r1), b)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self.restore_packed()
        self._cached = self._prepacked = None  # moved or cast: the caches are rebuilt on the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"format={self.fmt}, policy={self.policy}"
        )


def default_filter(module: nn.Module, fqn: str) -> bool:
    """What `pack_` packs unless told otherwise: the QAT ternary linears (TernaryLinear)."""
    return isinstance(module, TernaryLinear)


@torch.no_grad()
def ternary_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], float32 alpha [1]) of a linear, as packed inference computes with them.

    TernaryLinear: the codes its forward uses (`ternarize` of the latent weight) and its alpha. PackedLinear:
    its stored codes (packed -> model -> packed is bit-exact). Any other nn.Linear: ternary PTQ of its weight
    (absmean codes, L2-optimal alpha, as `terdit.quant.ptq`).
    """
    if isinstance(layer, PackedLinear):
        return layer.codes(), layer.alphas.detach().float().reshape(1)
    if isinstance(layer, TernaryLinear):
        if layer.alphas.numel() != 1:
            raise TerditError(f"{type(layer).__name__}: only a per-tensor alpha packs (got {layer.alphas.numel()})")
        codes, _ = ternarize(layer.weight.detach(), layer.granularity)
        return codes.to(torch.int8), layer.alphas.detach().float().reshape(1)
    if isinstance(layer, nn.Linear):
        codes, alpha = quantize_ternary(layer.weight.detach(), "tensor")
        return codes.to(torch.int8), alpha.float().reshape(1)
    raise TypeError(f"not a linear layer: {type(layer).__name__}")


@torch.no_grad()
def packed_from(layer: nn.Linear, fmt: str, policy: str = "memory", scratch: Scratch | None = None) -> PackedLinear:
    """A PackedLinear computing what `layer` computes, on its device; on the meta device an empty one (its
    tensors are read from a file afterwards)."""
    w = layer.weight
    bias = getattr(layer, "bias", None)
    dtype = bias.dtype if bias is not None else w.dtype
    packed = PackedLinear(layer.in_features, layer.out_features, bias is not None, fmt, policy, scratch,
                          device=w.device, dtype=dtype)
    if w.device.type == "meta":
        return packed
    codes, alpha = ternary_codes(layer)
    packed.packed.copy_(pack_rows(codes.cpu(), fmt)[0])
    packed.alphas.copy_(alpha)
    if bias is not None:
        packed.bias.copy_(bias.detach())
    return packed


def pack_(
    model: nn.Module, fmt: str, *, policy: str = "memory", filter_fn: FilterFn | None = None
) -> list[str]:
    """Replace, in place, each linear `filter_fn(module, fqn)` selects (default: every TernaryLinear) by a
    PackedLinear of format `fmt` ("2bit" | "base3") and `policy`; returns the names swapped.

    Packing as a module swap (torchao's `quantize_` style): any module tree packs, not only TerDiT, and the
    parent modules keep their own forward, so the state-dict keys stay those of the model. All packed layers
    of the model share one unpack scratch (the memory policy's bound). Layers on the meta device become
    empty PackedLinear (loading fills them); others are packed from their weights (see `ternary_codes`).
    """
    if fmt not in FORMATS:
        raise TerditError(f"unknown packed format {fmt!r}; choose from {', '.join(FORMATS)}")
    if policy not in POLICIES:
        raise TerditError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    filter_fn = filter_fn or default_filter
    existing = next((m for m in model.modules() if isinstance(m, PackedLinear)), None)
    scratch = existing.scratch if existing is not None else Scratch()
    targets = [
        (fqn, m)
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, PackedLinear) and filter_fn(m, fqn)
    ]
    for fqn, layer in targets:
        parent, _, child = fqn.rpartition(".")
        packed = packed_from(layer, fmt, layer_policy(model, fqn, policy), scratch)
        setattr(model.get_submodule(parent) if parent else model, child, packed)
    return [fqn for fqn, _ in targets]


def layer_policy(model: nn.Module, fqn: str, policy: str) -> str:
    """The policy the layer `fqn` of `model` gets when the model is given `policy`: the same, except that
    "int8" leaves the layers under the model's `_per_sample_modules` (TerDiT: each block's adaLN modulation)
    packed, on "int8-packed"'s path. Those see one row per image, so an int8 matmul gains next to nothing over
    unpacking, while resident int8 codes would cost 0.75 byte per weight more: at 600M the adaLN layers hold a
    quarter of the weights (144 of 576 MiB as int8, 36 MiB packed)."""
    if policy != "int8":
        return policy
    names = set(getattr(model, "_per_sample_modules", None) or ())
    return "int8-packed" if names & set(fqn.split(".")) else policy


def set_policy(model: nn.Module, policy: str) -> None:
    """Switch every PackedLinear of `model` to `policy` (per layer: `layer_policy`; drops cached weights when
    leaving "speed", and the compiled parents of `compile_int8_`), and its FFN chunking with it (`chunk_ffn_`)."""
    uncompile_int8_(model)
    for fqn, m in model.named_modules():
        if isinstance(m, PackedLinear):
            m.set_policy(layer_policy(model, fqn, policy))
    chunk_ffn_(model)


def ffn_chunk_rows(ffn_hidden: int, budget: int = FFN_CHUNK_BYTES) -> int:
    """Tokens per FFN call so that one fp32 hidden activation (rows x ffn_hidden) takes at most `budget` bytes
    (600M: 512 tokens, so batch 1 with guidance runs whole; 4.2B: 256)."""
    return max(1, budget // (4 * ffn_hidden))


def _unpacks_once(ffn: list[PackedLinear]) -> bool:
    """Whether an FFN whose packed layers are `ffn` unpacks each weight at most once per call when it runs on
    chunks of tokens: resident weights, or "int8-packed" codes that fit whole in the int8 scratch side by side.
    Where the integer path is off, both int8 policies unpack floats per call, as "memory" does."""
    policies = {m.policy for m in ffn}
    if policies & set(cpu_int8.INT8_POLICIES) and not cpu_int8.integer_path_on():
        return False
    if policies <= {"speed", "int8"}:
        return True
    sizes = [m.unpacked_numel for m in ffn]  # int8 codes: one byte each
    return (policies == {"int8-packed"} and sum(sizes) <= HELD_FFN_BYTES
            and all(n <= m.scratch_limit for n, m in zip(sizes, ffn)))


def chunk_ffn_(model: nn.Module) -> None:
    """On CPU, a TerDiT's FFNs run on `ffn_chunk_rows` tokens at a time (the same values, a lower peak) where
    each weight is unpacked at most once per FFN call (`_unpacks_once`): full precision, "speed", "int8", and
    "int8-packed" up to HELD_FFN_BYTES, whose layers then keep their codes at fixed places of the int8 scratch
    across the chunks (`hold_offset`, `Scratch.held`). Elsewhere (GPU, "memory", a larger "int8-packed" FFN)
    all tokens at once. load_deployed and set_policy call it."""
    set_rows = getattr(model, "set_ffn_chunk_rows", None)
    if set_rows is None:
        return
    ffns = [[m for m in block.feed_forward.modules() if isinstance(m, PackedLinear)] for block in model.layers]
    for m in (m for ffn in ffns for m in ffn):
        m.hold_offset = None
    if next(model.parameters()).device.type != "cpu" or not all(_unpacks_once(ffn) for ffn in ffns):
        set_rows(None)
        return
    for ffn in ffns:
        offset = 0
        for m in ffn:
            if m.policy == "int8-packed":
                m.hold_offset, offset = offset, offset + m.unpacked_numel
    set_rows(ffn_chunk_rows(model.config.ffn_hidden))


def compile_int8_(model: nn.Module) -> int:
    """The int8 policies on CPU: torch.compile, in place, each unit of `compile_units` (TerDiT: each transformer
    block) holding "int8" or "int8-packed" layers, with those layers' integer path traced into its graph; returns
    how many. "int8" multiplies with its prepacked weight (`cpu_int8.qlinear_u8`), "int8-packed" (and adaLN's
    layers of an "int8" model, see `layer_policy`) through `cpu_int8.packed_int8_mm`, which unpacks into the
    shared scratch inside one opaque op. A unit holding a packed layer of another policy stays eager.

    The per-layer kernel runs each layer's quantize / int8 matmul as its own compiled unit, so the model's own
    code between layers runs eagerly and layers on one input share its tokens only through `SharedTokens`.
    Traced inside the block, Inductor CSEs the repeated quantization of an input (wq, wk, wv; w1, w3), fuses
    the norm and modulation before a layer into its quantization and the SwiGLU product into w2's, and fuses
    RoPE, gates and residuals: fewer passes, and fewer step-sized temporaries for the allocator to fragment
    (measured: terdit/deploy/README.md). Compiling attention and FFN alone had already made them 5-8% faster
    than the earlier fused units of packed block subclasses (600M, 1 thread), a step 1.30x faster than bf16
    instead of 1.05-1.14x; with whole blocks, 1.40-1.66x compiled FP bf16 (AVX512-VNNI EPYC, README). (Traced as
    plain tensor code, "int8-packed"'s unpacking got fresh buffers where the per-layer path reuses the scratch, and
    a whole step was no faster: hence the opaque op.) Blocks of one class share one compiled graph. Nothing happens
    where the per-layer integer path is off (no int8 dot products, TERDIT_NO_KERNELS=1, TERDIT_CPU_COMPILE=0);
    call after `warm_cache` (the prepacked weights must exist; a layer without them takes the per-layer path).
    A compile failure switches back to eager for the process, as the per-layer units do.
    """
    if not (cpu_int8.compile_enabled() and cpu_int8.integer_path_on()):
        return 0

    def int8_layer(m: nn.Module) -> bool:
        return isinstance(m, PackedLinear) and m.policy in cpu_int8.INT8_POLICIES and m.packed.device.type == "cpu"

    units = [u for u in compile_units(model, int8_layer)
             if all(int8_layer(m) for m in u.modules() if isinstance(m, PackedLinear))]

    def failed(e: Exception) -> None:  # the units, their layers' traced path and the integer path go eager
        cpu_int8.compile_failed(e)
        for unit in units:
            _uncompile(unit)

    for unit in units:
        for layer in unit.modules():
            if isinstance(layer, PackedLinear):
                layer.traced_int8 = True
                if layer.policy == "int8-packed":
                    layer.packed_handle = cpu_int8.packed_handle(layer)
        call = compile_with_fallback(unit, failed, dynamic=False)
        call.terdit_int8 = True  # type: ignore[attr-defined]
    return len(units)


def _uncompile(unit: nn.Module) -> None:
    unit._compiled_call_impl = None
    for layer in unit.modules():
        if isinstance(layer, PackedLinear):
            layer.traced_int8 = False
            layer.packed_handle = None


def uncompile_int8_(model: nn.Module) -> None:
    """Undo `compile_int8_`: the parents run eagerly again (set_policy calls it)."""
    for m in model.modules():
        if getattr(m._compiled_call_impl, "terdit_int8", False):
            _uncompile(m)


def warm_cache(model: nn.Module, dtype: torch.dtype) -> None:
    """Unpack now, so the first forward of a "speed" (or "int8") model does not pay for it."""
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.policy == "speed":
            m.weight_for(dtype)
        elif isinstance(m, PackedLinear) and m.policy == "int8" and m.packed.device.type == "cpu":
            m.int8_weight()


def reserve_scratch(model: nn.Module, dtype: torch.dtype) -> None:
    """Size the shared scratch for the largest block once, instead of growing it during the first forward."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.policy == "memory"]
    if not layers:
        return
    scratch = layers[0].scratch
    device = layers[0].packed.device
    blocks = [min(m.out_features, m._row_block(dtype)) * m.packed.shape[1] for m in layers]
    scratch.reserve(max(n * DIGITS[m.fmt] for n, m in zip(blocks, layers)), dtype, device)
    scratch.reserve(max(blocks), torch.int32, device)


auto_register()  # this machine's kernels (terdit.deploy.backends), once the layer they serve exists
