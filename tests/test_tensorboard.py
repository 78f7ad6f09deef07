"""Training writes TensorBoard scalars and sample images that TensorBoard itself can read back."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from terdit.training.trainer import TrainArgs, Trainer

SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/steps_per_s", "train/images_per_s"]


def test_training_writes_scalars_and_images(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainArgs(out=str(run), config="TerDiT-Micro", steps=3, batch_size=8, log_every=1, sample_every=2,
                      sample_steps=2, lr=3e-4, progress=False)).run()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3]
    assert all(e.value == pytest.approx(3e-4) for e in acc.Scalars("train/lr"))  # stored as float32
    assert all(e.value > 0 for e in acc.Scalars("train/loss"))
    images = acc.Images("samples")
    assert [im.step for im in images] == [2, 3]  # --sample-every 2, and the final grid
    assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 0


def test_grid_once_per_sampling_point_readable_size_and_hparams(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainArgs(out=str(run), config="TerDiT-Micro", steps=4, batch_size=8, log_every=2, sample_every=2,
                      sample_steps=2, progress=False)).run()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images = acc.Images("samples")
    assert [im.step for im in images] == [2, 4]  # the last sampling point and the final grid are one
    assert images[0].width >= 64 * 8  # 8 samples of 8x8, enlarged as samples.png is
    hparams = acc.PluginTagToContent("hparams")  # the run's settings, recorded with its final metrics
    assert b"batch_size" in hparams["_hparams_/session_start_info"] and b"final/loss" in hparams["_hparams_/experiment"]
    assert [e.step for e in acc.Scalars("final/loss")] == [4]
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1  # hparams in the same file


def test_steps_per_second_leaves_out_sampling_pauses(tmp_path, monkeypatch):
    """A 1 s pause at every step (a stand-in for drawing the sample grid) must not show in steps/s."""
    import json
    import time

    monkeypatch.setattr(Trainer, "_sample_grid", lambda self, *args: time.sleep(1.0))
    run = tmp_path / "run"
    Trainer(TrainArgs(out=str(run), config="TerDiT-Micro", steps=3, batch_size=8, log_every=1, sample_every=1,
                      sample_steps=2, progress=False, tensorboard=False)).run()
    rates = [json.loads(line)["steps_per_s"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rates) == 3 and min(rates[1:]) > 2.0  # counted with the pause, each would be below 1


def test_without_the_extra_training_says_which_to_install_and_goes_on(tmp_path, monkeypatch, capsys):
    import terdit.extras

    monkeypatch.setattr(terdit.extras, "available", lambda module: module != "tensorboard")
    run = tmp_path / "run"
    Trainer(TrainArgs(out=str(run), config="TerDiT-Micro", steps=1, batch_size=8, sample_steps=2,
                      progress=False)).run()
    hint = [line for line in capsys.readouterr().out.splitlines() if "tensorboard" in line.lower()]
    assert hint == ["terdit: TensorBoard logging off; TensorBoard logging needs tensorboard, which is not "
                    "installed: pip install 'terdit[tensorboard]'"]
    assert (run / "samples.png").is_file() and not (run / "tensorboard").exists()
