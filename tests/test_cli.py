"""The command line: sampling outputs and one-line errors with exit status 2 for bad input."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from random_models import train_micro_run

from terdit.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_micro_run(tmp_path_factory.mktemp("cli") / "run")


def test_sample_png_and_npz(run_dir, tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main(["sample", "--run", str(run_dir), "--classes", "3", "1", "4", "--cfg", "4", "--steps", "5",
                 "--seed", "0", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0
    assert main(["sample", "--run", str(run_dir), "--classes", "3", "1", "--num-per-class", "2", "--steps", "5",
                 "--out", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["arr_0"].shape == (4, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [3, 3, 1, 1]
    again = tmp_path / "again.npz"
    main(["sample", "--run", str(run_dir), "--classes", "3", "1", "--num-per-class", "2", "--steps", "5",
          "--out", str(again)])
    with np.load(npz) as a, np.load(again) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])  # deterministic for a seed


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sample", "--classes", "12"], "outside [0, 10)"),
        (["sample", "--cfg", "-1"], "--cfg: must be >= 0"),
        (["sample", "--steps", "0"], "--steps must be in [1, 1000]"),
        (["sample", "--out", "x.jpg"], "must end in .png"),
    ],
)
def test_bad_sampling_input_is_one_line_and_touches_nothing(run_dir, tmp_path, capsys, argv, needle):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    args = [argv[0], "--run", str(run_dir), *argv[1:]]
    if "--out" not in args:
        args += ["--out", str(out), "--overwrite"]  # even allowed to replace it, a refused run keeps it
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert out.read_bytes() == b"precious"


def test_bad_run_paths(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sample", "--run", str(tmp_path / "empty")]) == 2
    assert "not a terdit model directory" in capsys.readouterr().err


def test_bad_training_input(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--config", "TerDiT-1T", "--out", str(out)]) == 2
    assert "unknown config" in capsys.readouterr().err
    assert main(["train", "--steps", "0", "--out", str(out)]) == 2
    assert "--steps" in capsys.readouterr().err
    assert not out.exists()


def test_entry_point_prints_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "terdit.cli", "sample", "--run", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_configs_lists_paper_sizes(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "TerDiT-600M" in out and "609,885,856" in out


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_exported_deploy_dir_samples_the_same_images(run_dir, tmp_path, fmt):
    deploy = tmp_path / fmt
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(deploy)]) == 0
    a, b = tmp_path / "qat.npz", tmp_path / "packed.npz"
    common = ["--classes", "3", "1", "4", "--steps", "5", "--seed", "3"]
    assert main(["sample", "--run", str(run_dir), *common, "--out", str(a)]) == 0
    assert main(["sample", "--run", str(deploy), *common, "--out", str(b)]) == 0
    with np.load(a) as x, np.load(b) as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])


@pytest.mark.parametrize("policy", ["int8", "int8-packed"])
def test_sample_policy_runs_the_cpu_integer_path(run_dir, tmp_path, monkeypatch, policy):
    """`terdit sample --policy int8 | int8-packed` on a deploy folder takes the integer path for its layers
    (forced on here, eagerly) and draws what the exact path draws, up to pixels that the activations' 8-bit
    rounding moves (same seed and noise)."""
    from terdit.deploy import cpu_int8

    deploy = tmp_path / "dep"
    assert main(["export", str(run_dir), "--format", "2bit", "--out", str(deploy)]) == 0
    monkeypatch.setenv("TERDIT_CPU_INT8", "1")
    monkeypatch.setenv("TERDIT_CPU_COMPILE", "0")
    taken: list[bool] = []
    accepts = cpu_int8.accepts
    monkeypatch.setattr(cpu_int8, "accepts", lambda layer, x: taken.append(accepts(layer, x)) or taken[-1])
    common = ["--classes", "3", "1", "4", "--num-per-class", "4", "--steps", "5", "--seed", "3"]
    exact, integer = tmp_path / "exact.npz", tmp_path / "integer.npz"
    assert main(["sample", "--run", str(deploy), *common, "--out", str(exact)]) == 0  # --policy memory
    assert taken == []
    assert main(["sample", "--run", str(deploy), *common, "--policy", policy, "--out", str(integer)]) == 0
    assert taken and all(taken)
    with np.load(exact) as a, np.load(integer) as b:
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert (diff > 0).mean() < 0.05 and diff.mean() < 1.0, ((diff > 0).mean(), diff.mean())
