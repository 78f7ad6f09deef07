"""Session set-up that must happen before any test module imports terdit.

diffusers (imported by terdit.models) imports torch._dynamo, which imports triton when it is installed; the
kernel tests need triton in interpreter mode on machines without CUDA, so the switch is set here, first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """TERDIT_CACHE in this test's own folder: nothing cached by another test (or in ~/.cache) is seen."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TERDIT_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One TERDIT_CACHE for the whole session (the digits classifier is fitted once), never ~/.cache; set
    while the module that asks for it runs."""
    path = tmp_path_factory.getbasetemp() / "terdit-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TERDIT_CACHE", str(path))
        yield path


@pytest.fixture
def failing_compile(monkeypatch):
    """torch.compile whose backend raises on the first call, as Inductor does without a C++ compiler; the
    compiled-unit caches and failure flags of terdit's compile users are restored after the test."""
    import terdit.deploy.cpu_int8 as cpu_int8
    import terdit.quant.ternary as ternary

    real_compile = torch.compile

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=failing_backend))
    for module in (cpu_int8, ternary):
        monkeypatch.setattr(module, "_COMPILED", {})
        monkeypatch.setattr(module, "_compile_failed", False)
