"""Training on real-image data paths: latents vs on-the-fly VAE, and 256 -> 512 style continuation."""

import json

import pytest
import torch

from terdit.data.latents import extract_latents
from terdit.data.synthetic import make_image_folder, save_tiny_vae
from terdit.errors import TerditError
from terdit.io import load_tensors
from terdit.training.trainer import TrainArgs, Trainer

FAST = dict(config="TerDiT-Micro", batch_size=4, log_every=1, sample_steps=2, tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def folder_and_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return make_image_folder(root / "data", classes=3, per_class=3), save_tiny_vae(root / "vae")


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_latents_and_image_folder_give_the_same_losses(folder_and_vae, tmp_path):
    data, vae = folder_and_vae
    latents = tmp_path / "latents"
    extract_latents(data, latents, vae=str(vae), resolution=16, flip=True, vae_mode="mean",
                    store_dtype="fp32", num_workers=0, progress=False)
    a, b = tmp_path / "from_images", tmp_path / "from_latents"
    Trainer(TrainArgs(out=str(a), data=str(data), vae=str(vae), resolution=16, vae_sample=False, steps=3,
                      **FAST)).run()
    Trainer(TrainArgs(out=str(b), data=str(latents), steps=3, **FAST)).run()
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-4)
    assert json.loads((b / "config.json").read_text())["input_size"] == 8  # 16 px through a factor-2 VAE


def test_continuation_at_a_higher_resolution(folder_and_vae, tmp_path):
    data, vae = folder_and_vae
    low, high = tmp_path / "r16", tmp_path / "r32"
    Trainer(TrainArgs(out=str(low), data=str(data), vae=str(vae), resolution=16, steps=2, **FAST)).run()
    trainer = Trainer(TrainArgs(out=str(high), data=str(data), vae=str(vae), resolution=32, steps=1,
                                init_from=str(low), **FAST))
    trainer.run()
    assert json.loads((high / "config.json").read_text())["input_size"] == 16
    assert len(_losses(high)) == 1
    # the continued run started from the low-resolution EMA weights: one step of AdamW moves each
    # weight by at most ~lr, so the new weights stay within a few lr of the source
    src = load_tensors(sorted((low / "checkpoints").iterdir())[-1] / "ema.safetensors")
    new = load_tensors(high / "checkpoints" / "0000001" / "model.safetensors")
    assert src.keys() == new.keys()
    assert max((src[k] - new[k]).abs().max().item() for k in src) < 5 * 5e-4 + 1e-6


def test_init_from_a_different_architecture_is_refused(folder_and_vae, tmp_path):
    data, vae = folder_and_vae
    low = tmp_path / "r16"
    Trainer(TrainArgs(out=str(low), data=str(data), vae=str(vae), resolution=16, steps=1, **FAST)).run()
    other = dict(FAST, config="TerDiT-Digits")
    with pytest.raises(TerditError, match="do not fit"):
        Trainer(TrainArgs(out=str(tmp_path / "x"), data=str(data), vae=str(vae), resolution=16, steps=1,
                          init_from=str(low), **other)).run()
    assert torch.__version__  # keep the import used for readers who run this file alone
