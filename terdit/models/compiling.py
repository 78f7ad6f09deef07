"""torch.compile of a module in place, with a way back to eager when compiling fails.

torch.compile compiles on a module's first call, and can fail there for reasons outside terdit (no C++
compiler for Inductor, an unsupported platform). Every torch.compile user in terdit (the CPU integer path of
deployed models, `terdit train --compile`) turns such a failure into one warning and the eager module, which
computes the same values, instead of an error in the middle of sampling or training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def compile_with_fallback(
    module: nn.Module, on_failure: Callable[[Exception], None], **compile_kwargs: Any
) -> Callable[..., Any]:
    """Compile `module` in place, as `Module.compile` does (the parameter names and state dict stay those of
    the module); if a compiled call raises, `module` goes back to eager, `on_failure(error)` runs (warn, undo
    related state) and the call is repeated eagerly. An error of the module itself is then raised again by
    the eager call. Returns the wrapper installed as the module's compiled call.

    Covers failures when a forward compiles; a backward graph that fails to compile during `backward()` is
    not caught here."""
    compiled = torch.compile(module._call_impl, **compile_kwargs)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # e.g. no C++ compiler: the eager module computes the same values
            module._compiled_call_impl = None
            on_failure(e)
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    return call


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the instances of its `_repeated_blocks` classes (diffusers' regional
    compilation; TerDiT: TransformerBlock), else the modules of a diffusers transformer's `transformer_blocks`
    (DiTTransformer2DModel declares no `_repeated_blocks`); empty for other models."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    return list(getattr(model, "transformer_blocks", None) or ())


def compile_units(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules to compile around `model`'s layers (those `is_layer` picks): each of its `repeated_blocks`
    holding such a layer, so Inductor fuses a whole block's element-wise work (norms, modulation, RoPE, gates,
    residuals) with the layers; for a model without blocks, each module with such a layer among its children."""
    blocks = repeated_blocks(model)
    if blocks:
        return [b for b in blocks if any(map(is_layer, b.modules()))]
    return [m for m in model.modules() if not is_layer(m) and any(map(is_layer, m.children()))]


__all__ = ["compile_units", "compile_with_fallback", "repeated_blocks"]
