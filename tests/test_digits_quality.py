"""End to end: a short default digits run draws recognisable digits of the requested class.

The full budget (`terdit train` with no arguments, 2000 steps) reaches >= 90% at guidance 4; see
benchmarks/digits_quality.py. Here a shorter run must clear a looser floor, far above chance (10%).
"""

import pytest

from terdit.data.digits import class_accuracy
from terdit.models.runs import load_run_model
from terdit.sampling.generate import sample_latents
from terdit.training.trainer import TrainArgs, Trainer

STEPS, FLOOR = 1400, 0.5


@pytest.mark.slow
def test_short_digits_run_draws_the_requested_classes(tmp_path):
    run = tmp_path / "digits"
    Trainer(TrainArgs(out=str(run), steps=STEPS, tensorboard=False, progress=False, sample_steps=50)).run()
    model = load_run_model(run)
    labels = [c for c in range(10) for _ in range(10)]
    images = sample_latents(model, labels, cfg_scale=4.0, steps=100, seed=0)
    acc = class_accuracy(images, labels)
    print(f"class accuracy after {STEPS} steps: {acc:.2f}")
    assert acc >= FLOOR
