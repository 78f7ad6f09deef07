"""TerDiT: the Large-DiT ("LLaMA-DiT") transformer with ternary block linears.

Read top to bottom: embeddings, RoPE, attention, SwiGLU, the block with its adaLN (and TerDiT's
RMSNorm after it), the final layer, the model. Module names follow the public code so that its
checkpoints load without renaming (`layers.{i}.attention.wq`, `layers.{i}.adaLN_modulation.1`, ...).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from terdit.models.configs import TerDiTConfig, TerDiTFrozenConfig, get_config
from terdit.models.labels import permute_labels
from terdit.quant.bitnet import BitLinear
from terdit.quant.layers import make_linear
from terdit.quant.ternary import TernaryLinear


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA's norm; learnable weight, init ones)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def _building_on_meta() -> bool:
    """True inside `with torch.device("meta")`, where modules are built only for their shapes."""
    return torch.get_default_device().type == "meta"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one output, no temporary


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal embedding of the integer timestep ([cos | sin]), then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class (= num_classes), used for label dropout and CFG."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        # On the meta device (deploy loading, parameter counts) skip nn.Embedding's normal_ init: torch
        # has no C++ meta kernel for normal_, and its Python one imports ~900 modules (~150 MB resident).
        weight = torch.empty(rows, hidden) if _building_on_meta() else None
        self.embedding_table = nn.Embedding(rows, hidden, _weight=weight)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class RotaryEmbedding(nn.Module):
    """1-D RoPE over the raster order of patches, rotating adjacent pairs (2i, 2i+1), in fp32.

    Eagerly as a complex multiplication (like the public code): one output tensor and no temporaries. Inside
    torch.compile the same product in real arithmetic, which Inductor fuses into one pass (it has no complex
    kernels and would run the complex ops one by one, each with an fp32 buffer of the input's size).
    The rotation of the model's own `num_tokens` on CPU is cached at construction: torch.compile guards on the
    cache, so a block that filled it would make the next one compile a second graph (the first 600M int8 step
    on CPU, cold compile cache: 28 s, against 16.7 s with the rotation cached).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, num_tokens: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        if num_tokens:
            self.rotation(num_tokens, torch.device("cpu"))

    def rotation(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, head_dim / 2, 2) float32: cos and sin of position * theta^(-2j / head_dim), i.e.
        exp(i * angle) as real pairs (a complex view of it is free; a complex tensor would not compile)."""
        key = (n, device)
        if key not in self._cache:  # on CPU whatever the default device (a model built on the meta device)
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu")
            inv = 1.0 / self.theta ** (steps / self.head_dim)
            angles = torch.outer(torch.arange(n, dtype=torch.float32, device="cpu"), inv)
            # torch.polar as the public code (its cos / sin differ from torch.cos / sin by an ulp here and there)
            self._cache[key] = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(device)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, H, head_dim)."""
        rot = self.rotation(x.shape[1], x.device)[None, :, None]
        pairs = x.float().unflatten(-1, (-1, 2))
        if torch.compiler.is_compiling():
            (a, b), (c, s) = pairs.unbind(-1), rot.unbind(-1)
            return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2).to(x.dtype)
        return torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rot)).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TerDiTConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        lin = _linear_factory(cfg)
        self.wq, self.wk, self.wv, self.wo = (lin(cfg.dim, cfg.dim, bias=False) for _ in range(4))
        if cfg.qk_norm:  # LayerNorm over all heads jointly, before RoPE (as the public code)
            self.q_norm, self.k_norm = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.rope = rope

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, H, N, head_dim) views, RoPE applied right after each projection."""
        shape = (*x.shape[:2], self.n_heads, self.head_dim)
        q = self.rope(self.q_norm(self.wq(x)).view(shape))
        k = self.rope(self.k_norm(self.wk(x)).view(shape))
        return q.transpose(1, 2), k.transpose(1, 2), self.wv(x).view(shape).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One expression, so q, k, v and the attention output are freed as soon as they are used: with
        # packed weights, activations are a large part of inference memory (4.2B: 12 MiB each).
        return self.wo(F.scaled_dot_product_attention(*self.heads(x)).transpose(1, 2).reshape(*x.shape[:2], -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: TerDiTConfig) -> None:
        super().__init__()
        lin = _linear_factory(cfg)
        self.w1 = lin(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = lin(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = lin(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TerDiTConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.attention = Attention(cfg, rope)
        self.feed_forward = FeedForward(cfg)
        # BitNet b1.58 normalises inside every BitLinear and drops these two norms (paper Sec. III-C)
        bitnet = cfg.linear == "bitnet"
        self.attention_norm = nn.Identity() if bitnet else RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = nn.Identity() if bitnet else RMSNorm(cfg.dim, cfg.norm_eps)
        adaln = [nn.SiLU(), _linear_factory(cfg)(cfg.cond_dim, 6 * cfg.dim, bias=True)]
        if cfg.adaln_norm:  # TerDiT: RMSNorm over the whole 6*dim vector, before it is chunked
            adaln.append(RMSNorm(6 * cfg.dim, cfg.norm_eps))
        self.adaLN_modulation = nn.Sequential(*adaln)
        self.ffn_chunk_rows: int | None = None  # TerDiT.set_ffn_chunk_rows

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.ffn(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))
        return x

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN of h (B, N, dim), on at most `ffn_chunk_rows` tokens (of all images together) at a time when
        set: it works token by token, so the values are the whole batch's (up to the float summation order of
        the matmuls), and only one chunk's hidden activations (rows x ffn_hidden, a block's largest) exist at once."""
        rows = self.ffn_chunk_rows
        if not rows or h.shape[0] * h.shape[1] <= rows:
            return self.feed_forward(h)
        h2 = h.reshape(-1, h.shape[-1])
        out = torch.empty_like(h2)
        for r0 in range(0, h2.shape[0], rows):
            out[r0 : r0 + rows] = self.feed_forward(h2[r0 : r0 + rows])
        return out.view_as(h)


class FinalLayer(nn.Module):
    """Full precision: LayerNorm (no affine) modulated by its own adaLN, then a linear to patches."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _linear_factory(cfg: TerDiTConfig):
    def lin(i: int, o: int, bias: bool) -> nn.Linear:
        return make_linear(cfg.linear, i, o, bias, alpha_init=cfg.alpha_init, granularity=cfg.granularity)

    return lin


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers 0.42's ModelMixin.to warns on every dtype cast that modules "should be kept in float32: []"
    even when there are none (its `or []` makes the None check always true); TerDiT keeps none, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())


def _accepts_terdit_config(init):
    """Let `TerDiT(cfg)` take a TerDiTConfig (how terdit builds models) besides diffusers' keyword form."""

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], TerDiTConfig):
            kwargs = {**args[0].model_kwargs(), **kwargs}
            args = args[1:]
        init(self, *args, **kwargs)

    return wrapper


# -- opening and saving: hooks set by terdit.loading ------------------------------------------------------------
# The model layer imports nothing above it, yet `TerDiT.from_pretrained` opens every terdit layout (run folders,
# deploy and release directories, pipeline folders, Hub ids). terdit.loading (imported by the root package, so
# before any terdit module runs) registers the functions that do so here; without them TerDiT is a plain
# diffusers model.
_HOOK_NAMES = ("from_pretrained", "save_pretrained", "push_to_hub")
_HOOKS: dict[str, Callable[..., Any]] = {}


def set_loading_hooks(**hooks: Callable[..., Any] | None) -> None:
    """Register `from_pretrained(cls, path, **kw)`, `save_pretrained(model, directory, *a, **kw)` and
    `push_to_hub(model, repo_id, **kw)`; None removes one (diffusers' own behaviour again)."""
    unknown = sorted(set(hooks) - set(_HOOK_NAMES))
    if unknown:
        raise TypeError(f"set_loading_hooks: unknown hook(s) {', '.join(unknown)}")
    for name, fn in hooks.items():
        if fn is None:
            _HOOKS.pop(name, None)
        else:
            _HOOKS[name] = fn


class TerDiT(ModelMixin, ConfigMixin):
    """Class-conditional diffusion transformer; `linear="fp"` gives Large-DiT.

    A diffusers model (ModelMixin + ConfigMixin), shaped like diffusers' DiTTransformer2DModel: the config has
    `sample_size`, `in_channels`, `out_channels` (2 * in_channels when the variance is learned), forward takes
    `(hidden_states, timestep, class_labels)` and returns `.sample`, so diffusers' DiTPipeline drives it.
    `TerDiT(TerDiTConfig)` also works; `model.config` reads like the TerDiTConfig it was built from (`head_dim`,
    `input_size`, `to_dict()`, ...). `from_pretrained` opens every terdit layout (through terdit.loading's hook).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]  # device_map="auto" places whole blocks (residual stream on one device)
    # its transformer blocks (terdit.models.compiling.repeated_blocks): what diffusers' compile_repeated_blocks(),
    # `terdit train --compile`, FSDP's per-block sharding and the "int8" deploy policy work on
    _repeated_blocks = ["TransformerBlock"]
    # modules whose linears see one row per image (the conditioning), not one per token: the "int8" deploy
    # policy keeps their weights packed (terdit.deploy.packed_linear.layer_policy)
    _per_sample_modules = ["adaLN_modulation"]

    @_accepts_terdit_config
    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        dim: int = 1536,
        depth: int = 16,
        n_heads: int = 32,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        qk_norm: bool = False,
        linear: str = "ternary",
        adaln_norm: bool = True,
        alpha_init: str = "absmean",
        granularity: str = "tensor",
        rope_theta: float = 10000.0,
        label_permutation: str | None = None,
        name: str = "custom",
    ) -> None:
        """`out_channels`: None = 2 * in_channels (learned variance); `label_permutation`: the class order of
        a released checkpoint ("lexicographic"), applied in forward so callers pass ImageNet ids."""
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        cfg = TerDiTConfig.from_model_config(args)
        self.gradient_checkpointing = False
        self.x_embedder = nn.Linear(cfg.patch_size**2 * cfg.in_channels, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.cond_dim, cfg.class_dropout_prob)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, (cfg.input_size // cfg.patch_size) ** 2)
        self.layers = nn.ModuleList(TransformerBlock(cfg, rope) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch_size, cfg.out_channels)
        if not _building_on_meta():  # meta tensors have no values to initialise (see LabelEmbedder)
            self.initialize_weights()

    def register_to_config(self, **kwargs: Any) -> None:
        """ConfigMixin's, with `out_channels` resolved and the result readable as a TerDiTConfig."""
        super().register_to_config(**kwargs)
        config = dict(self._internal_dict)
        if config.get("out_channels") is None and "in_channels" in config:
            config["out_channels"] = 2 * config["in_channels"]
        self._internal_dict = TerDiTFrozenConfig(config)

    @property
    def grad_checkpointing(self) -> bool:
        """Alias of diffusers' `gradient_checkpointing` (what `enable_gradient_checkpointing` sets)."""
        return self.gradient_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        self.gradient_checkpointing = bool(value)

    def set_ffn_chunk_rows(self, rows: int | None) -> None:
        """Run each block's FFN on at most `rows` tokens at a time (None: all at once), for the same output.
        The FFN's hidden activations are a block's largest (600M, batch 4 with guidance: 2048 tokens x 4096 per
        layer output), so chunks lower inference's peak memory; the deploy loader sets this on CPU
        (`terdit.deploy.packed_linear.chunk_ffn_`: 512 tokens at 600M)."""
        if rows is not None and rows < 1:
            raise ValueError(f"ffn chunk rows must be >= 1 or None, got {rows}")
        for block in self.layers:
            block.ffn_chunk_rows = rows

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> TerDiT:  # type: ignore[override]
        """A TerDiT from any terdit layout or Hub id (terdit.loading.open.open_model: keywords and errors there);
        diffusers' ModelMixin.from_pretrained when terdit.loading has not registered its hook."""
        hook = _HOOKS.get("from_pretrained")
        if hook is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return hook(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' folder plus terdit's model card; a packed model writes a deploy directory
        (terdit.loading.hub.save_pretrained)."""
        hook = _HOOKS.get("save_pretrained")
        if hook is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return hook(self, save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        """save_pretrained into a temporary folder and upload it as one commit (terdit.loading.hub.push_to_hub)."""
        hook = _HOOKS.get("push_to_hub")
        if hook is None:
            return super().push_to_hub(repo_id, *args, **kwargs)
        return hook(self, repo_id, *args, **kwargs)

    @classmethod
    def from_config_name(cls, name: str, **overrides) -> TerDiT:
        return cls(get_config(name, **overrides))

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Large-DiT's init: xavier block linears, N(0, .02) embeddings, zero adaLN and output layers."""
        for block in self.layers:
            for lin in (*_block_linears(block.attention), *_block_linears(block.feed_forward)):
                nn.init.xavier_uniform_(lin.weight)
            ada = block.adaLN_modulation[1]
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for m in self.modules():
            if isinstance(m, TernaryLinear):
                m.reset_alpha(generator)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = x.shape[0]
        p, c = self.config.patch_size, self.config.out_channels
        x = x.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(b, c, h, w)

    def model_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        """ImageNet ids -> this model's own class indices (identity unless `label_permutation` is set);
        the null class (num_classes) passes through."""
        perm = self.config.label_permutation
        if perm is None:
            return class_labels
        return permute_labels(perm, self.config.num_classes, class_labels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | float,
        class_labels: torch.Tensor,
        return_dict: bool = True,
        force_drop_ids: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """hidden_states (B, C, H, W) noisy input, timestep (B,) or scalar in [0, 1000), class_labels (B,)
        ImageNet-order ids (num_classes = null) -> `.sample` (B, out_channels, H, W).

        `force_drop_ids` (B,) replaces those labels by the null class (training's label dropout)."""
        x = hidden_states
        h, w = x.shape[-2:]
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(self.patchify(x))
        c = self.t_embedder(t) + self.y_embedder(self.model_labels(class_labels), force_drop_ids)
        for block in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        out = self.unpatchify(self.final_layer(tokens, c), h, w)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def ternary_layers(self) -> dict[str, nn.Linear]:
        """The quantized block linears (TerDiT's TernaryLinear or BitNet's BitLinear), by module name."""
        return {n: m for n, m in self.named_modules() if isinstance(m, (TernaryLinear, BitLinear))}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in quantized block linear weights vs everything else (works on the meta device)."""
        quant = {f"{n}.weight" for n in self.ternary_layers()}
        n_q = sum(p.numel() for n, p in self.named_parameters() if n in quant)
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "ternary": n_q, "full_precision": total - n_q}


def _block_linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.children() if isinstance(m, nn.Linear)]
