"""Training writes TensorBoard scalars and sample images that TensorBoard itself can read back."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from terdit.train import TrainArgs, Trainer

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
