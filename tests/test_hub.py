"""TerDiT.save_pretrained / from_pretrained / push_to_hub: every layout, round trips, offline behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from random_models import random_micro as random_model
from random_models import train_micro_run

import terdit.loading.hub as hub
from terdit.deploy import PackedLinear, export_model, load_deployed
from terdit.errors import TerditError
from terdit.io import load_tensors
from terdit.models import TerDiT
from terdit.models.kinds import kind_of
from terdit.models.runs import load_run_model

ROOT = Path(__file__).resolve().parents[1]



def forward(model: torch.nn.Module) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, cfg.num_classes])).sample


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_micro_run(tmp_path_factory.mktemp("hub") / "run", steps=3, ema_decay=0.5)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_save_pretrained_writes_the_hub_pair_and_loads_back_identically(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["_class_name"] == "TerDiT" and _public(written) == _public(model.config)
    saved = load_tensors(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert "library_name: terdit" in (tmp_path / "m" / "README.md").read_text()  # terdit's model card

    loaded = TerDiT.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, TerDiT) and not loaded.training
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(forward(loaded), forward(model))


def test_folder_saved_by_terdit_0_1_still_opens(tmp_path):
    """terdit 0.1's save_pretrained wrote config.json in the TerDiTConfig form + model.safetensors (a plain
    state dict); such folders keep opening, in the requested dtype."""
    model = random_model(seed=3)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(model.config.to_dict()))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"),
              metadata={"format": "pt"})
    assert kind_of(tmp_path / "old") == "legacy"
    loaded = TerDiT.from_pretrained(tmp_path / "old")
    assert loaded.config == model.config and torch.equal(forward(loaded), forward(model))
    assert TerDiT.from_pretrained(tmp_path / "old", torch_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_run_folder_loads_the_latest_ema_weights(run_dir):
    ema = TerDiT.from_pretrained(run_dir)
    raw = TerDiT.from_pretrained(run_dir, ema=False)
    ckpt = run_dir / "checkpoints" / "0000003"
    for name, model in (("ema", ema), ("model", raw)):
        stored = load_tensors(ckpt / f"{name}.safetensors")
        assert all(torch.equal(model.state_dict()[k], stored[k]) for k in stored)
    assert not torch.equal(forward(ema), forward(raw))  # decay 0.5 over 3 steps: the EMA lags the weights


def test_train_checkpoint_to_pretrained_round_trip_gives_identical_outputs(run_dir, tmp_path):
    reference = load_run_model(run_dir)
    TerDiT.from_pretrained(run_dir).save_pretrained(tmp_path / "pretrained")
    again = TerDiT.from_pretrained(tmp_path / "pretrained")
    assert again.config == reference.config
    assert torch.equal(forward(again), forward(reference))
    bf16 = TerDiT.from_pretrained(tmp_path / "pretrained", dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_deploy_directory_loads_packed_and_saves_back_as_deploy(tmp_path, fmt):
    model = random_model()
    export_model(model, tmp_path / "deploy", fmt)
    packed = TerDiT.from_pretrained(tmp_path / "deploy")
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    expected = forward(load_deployed(tmp_path / "deploy"))
    assert torch.equal(forward(packed), expected)
    torch.testing.assert_close(forward(packed), forward(model), rtol=1e-4, atol=1e-5)  # what QAT computes

    packed.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["deploy"]["format"] == fmt
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == \
        (tmp_path / "deploy" / "model.safetensors").stat().st_size
    assert torch.equal(forward(TerDiT.from_pretrained(tmp_path / "again")), expected)


def test_pipeline_folder_opens_its_transformer(tmp_path):
    from terdit.sampling.pipeline import TerDiTPipeline

    model = random_model()
    TerDiTPipeline(model).save_pretrained(tmp_path / "pipe")
    assert torch.equal(forward(TerDiT.from_pretrained(tmp_path / "pipe")), forward(model))


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch):
    uploaded: dict[str, object] = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            uploaded["repo"] = repo_id
            uploaded["files"] = sorted(p.name for p in folder.iterdir())
            uploaded["config"] = json.loads((folder / "config.json").read_text())
            uploaded["weights"] = load_tensors(folder / "diffusion_pytorch_model.safetensors")
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    model = random_model()
    assert model.push_to_hub("me/terdit-micro") == "https://example.invalid/commit/1"
    assert uploaded["repo"] == "me/terdit-micro"
    assert uploaded["files"] == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert _public(uploaded["config"]) == _public(model.config)
    assert all(torch.equal(uploaded["weights"][k], v) for k, v in model.state_dict().items())


def _fake_cached_repo(cache: Path, repo_id: str, model: TerDiT) -> None:
    """The Hugging Face cache layout of a downloaded repo: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)


def test_cached_hub_id_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    model = random_model()
    _fake_cached_repo(tmp_path / "cache", "someone/terdit-micro", model)
    loaded = TerDiT.from_pretrained("someone/terdit-micro", cache_dir=tmp_path / "cache")
    assert torch.equal(forward(loaded), forward(model))


def test_uncached_hub_id_fails_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(TerditError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        TerDiT.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 10


def test_uncached_hub_id_fails_fast_when_the_network_is_down(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset, and the endpoint refuses connections: no 25 s of huggingface_hub retries."""
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(TerditError, match="not in the Hugging Face cache.*did not answer"):
        TerDiT.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 10


def test_offline_subprocess_with_hf_hub_offline_env(tmp_path):
    """The real switch: HF_HUB_OFFLINE=1 in the environment of a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    code = ("import time; from terdit import TerDiT; from terdit.errors import TerditError\n"
            "t = time.perf_counter()\n"
            "try:\n    TerDiT.from_pretrained('someone/not-cached')\n"
            "except TerditError as e:\n    print('ERR', round(time.perf_counter() - t, 2), e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.stdout.startswith("ERR"), out.stderr
    assert float(out.stdout.split()[1]) < 10
    assert "HF_HUB_OFFLINE" in out.stdout


def test_local_paths_never_reach_the_hub(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used for a local path")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    monkeypatch.setattr(hub, "hub_reachable", no_network)
    random_model().save_pretrained(tmp_path / "m")
    TerDiT.from_pretrained(tmp_path / "m")
    for bad in ("./missing", str(tmp_path / "missing"), "a/b/c"):
        with pytest.raises(TerditError, match="no such directory"):
            TerDiT.from_pretrained(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TerditError, match="not a terdit model directory"):
        TerDiT.from_pretrained(tmp_path / "empty")


def test_weights_that_do_not_fit_the_config_are_a_user_error(tmp_path):
    random_model().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["dim"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TerditError, match="does not match"):
        TerDiT.from_pretrained(tmp_path / "m")
    config["dim"], config["bogus"] = 32, 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TerditError, match="unknown keys"):
        TerDiT.from_pretrained(tmp_path / "m")


def test_torch_dtype_applies_to_every_layout(run_dir, tmp_path):
    """One call, every artefact, the dtype asked for: a training run, a pretrained folder, a packed deploy folder."""
    TerDiT.from_pretrained(run_dir).save_pretrained(tmp_path / "pretrained")
    export_model(load_run_model(run_dir), tmp_path / "deploy", "base3")
    for path in (run_dir, tmp_path / "pretrained", tmp_path / "deploy"):
        model = TerDiT.from_pretrained(path, torch_dtype=torch.bfloat16)
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        assert floats == {torch.bfloat16} and model.dtype == torch.bfloat16, path
        assert not model.training


def test_model_card_carries_the_models_facts(run_dir, tmp_path):
    model = TerDiT.from_pretrained(run_dir)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    counts = model.parameter_counts()
    assert "More Information Needed" not in card and "arxiv.org/abs/2405.14854" in card
    assert f"{counts['total']:,} total: {counts['ternary']:,} ternary" in card
    assert "- steps: 3" in card and "DDIMScheduler, DiTPipeline" not in card  # a 10-class model: terdit's pipeline only
    assert "TerDiTPipeline" in card and "1.58 of information" in card


def test_open_model_is_from_pretrained_and_without_hooks_terdit_is_a_plain_diffusers_model(tmp_path, monkeypatch):
    """terdit.open_model is the one opener (TerDiT.from_pretrained calls it through terdit.loading's hook); with
    the hooks removed, the model layer alone behaves as diffusers' ModelMixin (no model card, no terdit layouts)."""
    import terdit
    import terdit.models.terdit as model_module

    model = random_model(seed=5)
    model.save_pretrained(tmp_path / "m")
    opened = terdit.open_model(tmp_path / "m")
    assert isinstance(opened, TerDiT) and torch.equal(forward(opened), forward(model))
    monkeypatch.setattr(model_module, "_HOOKS", {})
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
    assert torch.equal(forward(TerDiT.from_pretrained(tmp_path / "plain")), forward(model))
