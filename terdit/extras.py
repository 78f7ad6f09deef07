"""Optional dependencies and the pip extra that installs each, so every "missing" message names it the same way.

    pip install 'terdit[tensorboard]'   TensorBoard logging in `terdit train`
    pip install 'terdit[plots]'         matplotlib figures of `terdit reproduce` / `terdit analyze`
    pip install 'terdit[gpu]'           Triton kernels for packed models on CUDA
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from terdit.errors import TerditError

EXTRA_OF = {"tensorboard": "tensorboard", "matplotlib": "plots", "triton": "gpu"}


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install_hint(module: str, feature: str) -> str:
    """One line: what is missing, for what, and the command that installs it."""
    return f"{feature} needs {module}, which is not installed: pip install 'terdit[{EXTRA_OF[module]}]'"


def require(module: str, feature: str) -> ModuleType:
    """Import an optional dependency, or raise a TerditError (one CLI line) naming its extra."""
    if not available(module):
        raise TerditError(install_hint(module, feature))
    return importlib.import_module(module)
