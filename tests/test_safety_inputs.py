"""Input problems are input errors (issue problems 6 and 7): exit 2 with one line naming the file or
argument, checked before any work and before anything is written; resume refuses what would silently mix
or change a run; sample-npz and extract-latents refuse or redo parts that do not belong."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from forked import terdit, tree
from random_models import train_micro_run

from terdit.cli import main

# flags every version knows; the runs resumed here keep their stored --sample-steps 2
TRAIN = ["train", "--config", "TerDiT-Micro", "--steps", "3", "--batch-size", "4", "--ckpt-every", "2",
         "--log-every", "1", "--no-tensorboard", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_micro_run(tmp_path_factory.mktemp("inputs") / "run", steps=3, batch_size=4, ckpt_every=2,
                           log_every=1)


def _spoil(kind: str, run: Path) -> None:
    """Damage a copy of a run the way crashes, disks and hands do."""
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    if kind == "no-train-args":
        (run / "train_args.json").unlink()
    elif kind == "bad-train-args":
        (run / "train_args.json").write_text("{not json")
    elif kind == "typed-train-args":
        (run / "train_args.json").write_text(json.dumps({**json.loads((run / "train_args.json").read_text()),
                                                         "weight_decay": "none"}))
    elif kind == "truncated-state":
        data = (ckpt / "train_state.pt").read_bytes()
        (ckpt / "train_state.pt").write_bytes(data[: len(data) // 2])
    elif kind == "missing-state":
        (ckpt / "train_state.pt").unlink()
    elif kind == "wrong-width":
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "dim": 64}))
    elif kind == "bad-config":
        (run / "config.json").write_text("[1, 2")
    elif kind == "torn-middle-log":
        lines = (run / "log.jsonl").read_text().splitlines()
        (run / "log.jsonl").write_text("\n".join([lines[0][:7], *lines[1:]]) + "\n")
    else:
        raise AssertionError(kind)


# (damage, extra train arguments or None for `sample`, what the one line must name)
SPOILED = [
    ("no-train-args", [], "train_args.json: missing"),
    ("bad-train-args", [], "train_args.json: not readable JSON"),
    ("typed-train-args", [], "train_args.json: bad training arguments"),
    ("truncated-state", [], "train_state.pt: not a readable torch state file"),
    ("missing-state", [], "train_state.pt: file not found"),
    ("wrong-width", [], "does not match the model config"),
    ("wrong-width", None, "does not match the model config"),
    ("bad-config", [], "config.json: not a readable terdit config"),
    ("bad-config", None, "config.json: not a readable terdit config"),
    ("torn-middle-log", [], "log.jsonl: line 1 is not a log entry"),
]


@pytest.mark.parametrize("damage,extra,needle", SPOILED)
def test_a_damaged_run_is_an_input_error_and_stays_as_it_was(run, tmp_path, capsys, damage, extra, needle):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _spoil(damage, copy)
    before = tree(copy)
    capsys.readouterr()
    if extra is None:
        argv = ["sample", "--run", str(copy), "--steps", "2", "--out", str(tmp_path / "s.png")]
    else:
        argv = [*TRAIN, "--steps", "4", "--out", str(copy), "--resume", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "unexpected" not in err, err
    assert tree(copy) == before
    assert not (tmp_path / "s.png").exists()


def test_a_torn_last_log_line_is_dropped_on_resume(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "0000003")
    (copy / "log.jsonl").write_text((copy / "log.jsonl").read_text() + '{"step": 4, "lo')
    assert main([*TRAIN, "--out", str(copy), "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (copy / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_changed_settings_unless_overridden(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "0000003")
    before = tree(copy)
    for change, name in ((["--batch-size", "8"], "--batch-size 4 -> 8"), (["--lr", "0.001"], "--lr"),
                         (["--grad-accum", "2"], "--grad-accum 1 -> 2"), (["--seed", "3"], "--seed")):
        capsys.readouterr()
        assert main([*TRAIN, "--out", str(copy), "--resume", *change]) == 2
        err = capsys.readouterr().err
        assert name in err and "--override" in err, err
        assert tree(copy) == before
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(copy), "--resume", "--steps", "1"]) == 2
    assert "--steps 1 is below the run's step 2" in capsys.readouterr().err
    assert tree(copy) == before
    assert main([*TRAIN, "--out", str(copy), "--resume", "--no-ternary", "--override"]) == 2
    assert "the model differs from the run's (--linear 'ternary' -> 'fp')" in capsys.readouterr().err
    assert tree(copy) == before  # the weights fix the model: --override does not change it
    assert main([*TRAIN, "--out", str(copy), "--resume", "--lr", "0.001", "--override"]) == 0
    assert json.loads((copy / "train_args.json").read_text())["lr"] == 0.001
    assert [json.loads(x)["lr"] for x in (copy / "log.jsonl").read_text().splitlines()][-1] == 0.001


# (argv after the command, what the one line must name); RUN / OUT are filled in
BAD_ARGS = [
    (["train", "--num-workers", "-1"], "--num-workers"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--batch-size", "1000000000"], "--batch-size 1000000000"),
    (["train", "--batch-size", "6", "--grad-accum", "4"], "not divisible"),
    (["train", "--out", "FILE/run"], "is not a directory"),
    (["train", "--out", "FOREIGN"], "is not a terdit run"),
    (["sample", "--run", "RUN", "--cfg", "nan"], "--cfg"),
    (["sample", "--run", "RUN", "--cfg", "inf"], "--cfg"),
    (["sample", "--run", "RUN", "--cfg-channels", "9"], "--cfg-channels 9"),
    (["sample", "--run", "RUN", "--out", "FILE/x.png"], "is not a directory"),
    (["sample-npz", "--run", "RUN", "--cfg", "nan"], "--cfg"),
    (["sample-npz", "--run", "RUN", "--cfg-channels", "9", "--num-samples", "2"], "--cfg-channels 9"),
    (["sample-npz", "--run", "RUN", "--out", "FILE/x.npz"], "is not a directory"),
    (["sample-npz", "--run", "RUN", "--batch-size", "1000000000", "--out", "OUT"], "--batch-size 1000000000"),
    (["sample", "--run", "RUN", "--num-per-class", "1000000000", "--out", "OUT"], "--num-per-class"),
    (["sample-npz", "--run", "RUN", "--out", "RUN"], "must end in .npz"),
    (["export", "RUN", "--out", "FILE/dep"], "is not a directory"),
    (["extract-latents", "RUN", "--vae", "none", "--out", "OUT", "--num-workers", "-1"], "--num-workers"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS)
def test_bad_arguments_are_one_line_and_write_nothing(run, tmp_path, capsys, argv, needle):
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "FOREIGN").mkdir()
    (tmp_path / "FOREIGN" / "thesis.tex").write_text("keep")
    sub = {"RUN": str(run), "FILE": str(tmp_path / "FILE"), "OUT": str(tmp_path / "out.npz"),
           "FOREIGN": str(tmp_path / "FOREIGN")}
    argv = [sub.get(a, a) for a in argv]
    argv = [str(tmp_path / a) if a.startswith("FILE/") else a.replace("RUN/", f"{run}/") for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    argv = [*argv[:1], *(TRAIN[1:] if argv[0] == "train" else []), *argv[1:]]
    before, run_before = tree(tmp_path), tree(run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "FOREIGN"]
    assert tree(run) == run_before


def test_disk_full_is_an_input_error(run, tmp_path, capsys, monkeypatch):
    import terdit.sampling.generate

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(terdit.sampling.generate, "atomic_write", full)
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "s.png" in err and "unexpected" not in err


def test_sample_npz_never_mixes_parts_of_other_weights_at_the_same_path(tmp_path):
    """A run trained again into the same folder: the parts of the old weights are refused."""
    run, out = tmp_path / "run", tmp_path / "s.npz"
    npz = ["sample-npz", "--run", str(run), "--num-samples", "4", "--batch-size", "2", "--steps", "2",
           "--no-progress", "--out", str(out)]
    assert terdit([*TRAIN, "--sample-steps", "2", "--out", str(run)]).rc == 0
    assert terdit(npz, {"TERDIT_FAULT": "part:*:1"}).rc == 137  # killed after its first batch
    shutil.rmtree(run)
    assert terdit([*TRAIN, "--sample-steps", "2", "--out", str(run), "--seed", "1"]).rc == 0  # other weights
    res = terdit(npz)
    assert res.rc == 2 and "different settings (weights" in res.out, res.out
    assert not out.exists()


def _extraction(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """An image folder of 6 images, a tiny VAE, and the extract-latents command (shards of 4) into tmp_path/lat."""
    from terdit.data.synthetic import make_image_folder, save_tiny_vae

    monkeypatch.setenv("TERDIT_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=3, seed=1)
    vae = save_tiny_vae(tmp_path / "vae", (8, 16))
    return data, ["extract-latents", str(data), "--vae", str(vae), "--out", str(tmp_path / "lat"), "--resolution",
                  "16", "--shard-size", "4", "--num-workers", "0", "--no-progress"]


def test_extract_latents_redoes_a_truncated_shard(tmp_path, monkeypatch):
    from terdit.data.latents import LatentDataset
    from terdit.errors import TerditError

    data, argv = _extraction(tmp_path, monkeypatch)
    assert terdit(argv).rc == 0
    shard = tmp_path / "lat" / "shard-000000.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(TerditError, match="cut short"):
        LatentDataset(tmp_path / "lat")
    res = terdit(argv)
    assert res.rc == 0 and "redoing 1 shard" in res.out and "already complete" not in res.out, res.out
    assert shard.stat().st_size == len(good)
    assert len(LatentDataset(tmp_path / "lat")) == 6


@pytest.mark.parametrize("change,needle", [({"dim": "abc"}, "bad model config"),
                                           ({"deploy": {"format": "2bit", "packed": 5}}, "bad deploy section"),
                                           ({"deploy": 5}, "no 'deploy' section")])
def test_a_damaged_deploy_config_is_an_input_error(run, tmp_path, capsys, change, needle):
    dep = tmp_path / "dep"
    assert main(["export", str(run), "--out", str(dep)]) == 0
    cfg = json.loads((dep / "config.json").read_text())
    (dep / "config.json").write_text(json.dumps({**cfg, **change}))
    capsys.readouterr()
    assert main(["sample", "--run", str(dep), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "config.json" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.png").exists()


def test_a_latent_folder_being_written_is_locked(tmp_path):
    import os

    from terdit.io import locked

    out = tmp_path / "lat"
    with locked(out / ".lock", "latents"):  # as a running extraction holds it
        res = terdit(["extract-latents", str(tmp_path), "--vae", "none", "--out", str(out), "--num-workers", "0"])
    assert res.rc == 2 and f"in use by process {os.getpid()}" in res.out, res.out


def test_extract_latents_refuses_shards_of_images_replaced_since(tmp_path, monkeypatch):
    from PIL import Image


    data, argv = _extraction(tmp_path, monkeypatch)
    assert terdit(argv, {"TERDIT_FAULT": "rename:shard-000000.safetensors:1"}).rc == 137
    victim = sorted((data / "class_0").iterdir())[0]
    Image.new("RGB", (33, 47), "red").save(victim, format=Image.open(victim).format)  # same name, new image
    res = terdit(argv)
    assert res.rc == 2 and "made with other settings or from a changed folder" in res.out, res.out
    assert "inputs_fingerprint" in res.out
