"""`terdit sample-npz`: exact sample count, DiT's pixel rule, resume after interruption, process-count
independence, refusal of a parts folder made with other settings."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from random_models import train_micro_run

from terdit import cli
from terdit.errors import TerditError
from terdit.eval import load_batch
from terdit.models.runs import load_run_model
from terdit.sampling.npz import (
    MassSampleArgs,
    batch_labels,
    batch_noise_seed,
    parts_dir,
    sample_npz,
)

FAST = dict(num_samples=10, batch_size=4, steps=2, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_micro_run(tmp_path_factory.mktemp("run") / "micro")


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory) -> Path:
    """One uninterrupted single-process run with FAST settings."""
    path = sample_npz(MassSampleArgs(run=str(run), out=str(tmp_path_factory.mktemp("ref") / "s.npz"), **FAST))
    assert path is not None
    return path


def _expected(run: Path, num: int, bsz: int, seed: int, cfg: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples computed directly: the diffusion loop per batch and DiT's pixel rule written out here."""
    from terdit.diffusion import GaussianDiffusion, guided_model_fn

    model = load_run_model(run, ema=True)
    cfg_m = model.config
    images, labels = [], []
    for b in range(-(-num // bsz)):
        lab = batch_labels(seed, b, min(bsz, num - b * bsz), list(range(cfg_m.num_classes)))
        gen = torch.Generator().manual_seed(batch_noise_seed(seed, b))
        x = torch.randn(len(lab), cfg_m.in_channels, cfg_m.input_size, cfg_m.input_size, generator=gen)
        fn = guided_model_fn(model, torch.as_tensor(lab), cfg, cfg_m.num_classes)
        with torch.no_grad():
            x = GaussianDiffusion.create(steps, learn_sigma=cfg_m.learn_sigma).sample(fn, x, generator=gen)
        px = np.floor(np.clip(x.numpy().astype(np.float64) * 127.5 + 128, 0, 255)).astype(np.uint8)
        images.append(px.transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def test_exact_count_labels_and_pixels(run, reference):
    with np.load(reference) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 1)  # NHWC; the last batch holds 2
    assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 10
    exp_images, exp_labels = _expected(run, 10, 4, seed=0, cfg=1.5, steps=2)
    np.testing.assert_array_equal(labels, exp_labels)
    # the float -> uint8 rounding may differ by one level where 127.5 x + 128 lands on an integer
    assert np.abs(arr.astype(int) - exp_images.astype(int)).max() <= 1
    assert (arr == exp_images).mean() > 0.99
    assert len(load_batch(reference).images) == 10  # the streaming ADM reader accepts the file
    assert not parts_dir(reference).exists()


def test_labels_are_uniform_and_respect_a_class_subset():
    draws = np.concatenate([batch_labels(0, b, 500, list(range(10))) for b in range(20)])
    counts = np.bincount(draws, minlength=10)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 27.9  # 99.9% quantile of chi-square with 9 degrees of freedom
    assert not np.array_equal(batch_labels(0, 0, 500, list(range(10))), batch_labels(0, 1, 500, list(range(10))))
    sub = batch_labels(3, 7, 200, [2, 5, 9])
    assert set(sub.tolist()) == {2, 5, 9}


def test_interrupted_run_resumes_to_the_same_file(run, reference, tmp_path):
    out = tmp_path / "s.npz"
    assert sample_npz(MassSampleArgs(run=str(run), out=str(out), **FAST), max_batches=2) is None
    parts = parts_dir(out)
    assert sorted(p.name for p in parts.glob("batch-*.npz")) == ["batch-000000.npz", "batch-000001.npz"]
    (parts / ".batch-000002.npz.crash.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves
    assert not out.exists()
    assert sample_npz(MassSampleArgs(run=str(run), out=str(out), **FAST)) == out
    assert out.read_bytes() == reference.read_bytes()
    assert not parts.exists()


def _torchrun(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\nfrom terdit import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # "--" stops torchrun's own parser, which would take --run for an abbreviation of its --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
           str(launcher), "sample-npz", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_two_processes_give_the_same_npz_even_when_resuming_a_one_process_start(run, reference, tmp_path):
    argv = ["--run", str(run), "--num-samples", "10", "--batch-size", "4", "--steps", "2", "--no-progress",
            "--device", "cpu"]
    fresh = tmp_path / "fresh.npz"
    res = _torchrun(tmp_path, [*argv, "--out", str(fresh)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert fresh.read_bytes() == reference.read_bytes()
    # one process draws batch 0 and stops; two processes share what is left (batches 1 and 2)
    mixed = tmp_path / "mixed.npz"
    sample_npz(MassSampleArgs(run=str(run), out=str(mixed), **FAST), max_batches=1)
    res = _torchrun(tmp_path, [*argv, "--out", str(mixed)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert mixed.read_bytes() == reference.read_bytes()


def test_parts_made_with_other_settings_are_refused(run, tmp_path):
    out = tmp_path / "s.npz"
    sample_npz(MassSampleArgs(run=str(run), out=str(out), **FAST), max_batches=1)
    before = sorted(p.name for p in parts_dir(out).iterdir())
    for change in (dict(cfg=4.0), dict(seed=1), dict(batch_size=5), dict(num_samples=12)):
        with pytest.raises(TerditError, match="different settings"):
            sample_npz(MassSampleArgs(run=str(run), out=str(out), **{**FAST, **change}))
    assert sorted(p.name for p in parts_dir(out).iterdir()) == before  # nothing touched


def test_cli_errors_are_one_line_exit_2(run, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "done.npz"
    existing.write_bytes(b"x")
    cases = [
        ["--out", str(existing)],  # an existing result is never overwritten
        ["--out", str(tmp_path / "s.png")],
        ["--out", str(tmp_path / "a.npz"), "--classes", "3", "10"],
        ["--out", str(tmp_path / "b.npz"), "--steps", "0"],
    ]
    for extra in cases:
        code = cli.main(["sample-npz", "--run", str(run), "--num-samples", "4", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert err.startswith("terdit sample-npz: error:") and err.count("\n") == 1, err
    assert existing.read_bytes() == b"x"
