"""Outputs never clobber (issue problem 1): export / convert / quantize / sample / sample-npz refuse an
existing --out that is not their own kind, replace their own kind only with --overwrite, never write over
an input; and files / folders follow the umask (problem 3)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from forked import terdit, tree
from random_models import train_micro_run

from terdit.cli import main

TRAIN = ["train", "--config", "TerDiT-Micro", "--steps", "2", "--batch-size", "4", "--sample-steps", "2",
         "--no-tensorboard", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_micro_run(tmp_path_factory.mktemp("outputs") / "run", batch_size=4)


def _refused(argv: list[str], capsys, needle: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_export_onto_its_own_run_is_refused_and_the_run_survives(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = tree(copy)
    _refused(["export", str(copy), "--out", str(copy)], capsys, "is (or holds) the input")
    _refused(["export", str(copy), "--out", str(copy / "checkpoints"), "--overwrite"], capsys,
             "not a deploy directory")
    _refused(["export", str(copy), "--out", str(tmp_path), "--overwrite"], capsys, "the input")
    assert tree(copy) == before


def test_export_never_replaces_a_file_or_a_foreign_folder(run, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    _refused(["export", str(run), "--out", str(file), "--overwrite"], capsys, "exists and is not a deploy directory")
    assert file.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no .notes.txt.old
    folder = tmp_path / "site"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "index.md").write_text("keep")
    _refused(["export", str(run), "--out", str(folder), "--overwrite"], capsys, "not a deploy directory")
    assert (folder / "docs" / "index.md").read_text() == "keep"


def test_export_replaces_its_own_kind_only_with_overwrite(run, tmp_path, capsys):
    dep = tmp_path / "dep"
    assert main(["export", str(run), "--format", "base3", "--out", str(dep)]) == 0
    before = tree(dep)
    _refused(["export", str(run), "--out", str(dep)], capsys, "pass --overwrite")
    assert tree(dep) == before
    assert main(["export", str(run), "--out", str(dep), "--overwrite"]) == 0
    assert tree(dep) != before and '"format": "2bit"' in (dep / "config.json").read_text()
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0  # an empty folder is free


def test_quantize_and_convert_refuse_foreign_outputs(tmp_path, capsys):
    import torch

    from terdit.io import save_tensors
    from terdit.models import TerDiT, get_config

    fp = tmp_path / "fp"  # a full-precision run, what quantize takes
    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro", linear="fp"))
    model.config.save(fp / "config.json")
    save_tensors(fp / "checkpoints" / "0000001" / "ema.safetensors", model.state_dict())
    target = tmp_path / "d"
    (target / "docs").mkdir(parents=True)
    (target / "docs" / "a.md").write_text("keep")
    _refused(["quantize", str(fp), "--out", str(target)], capsys, "not a quantized run folder")
    _refused(["quantize", str(fp), "--out", str(target), "--overwrite"], capsys, "not a quantized run folder")
    assert (target / "docs" / "a.md").read_text() == "keep"
    before = tree(fp)
    _refused(["quantize", str(fp), "--out", str(fp)], capsys, "the input")
    assert tree(fp) == before
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "model_args.pth").write_bytes(b"")
    _refused(["convert", str(rel), "--out", str(rel)], capsys, "the input")


def test_sample_never_overwrites_silently(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.write_bytes(b"precious")
    _refused(["sample", "--run", str(run), "--steps", "2", "--out", str(out)], capsys, "pass --overwrite")
    assert out.read_bytes() == b"precious"
    assert main(["sample", "--run", str(run), "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    folder = tmp_path / "x.png"
    folder.mkdir()
    _refused(["sample", "--run", str(run), "--steps", "2", "--out", str(folder), "--overwrite"], capsys,
             "not a .png file")


def test_sample_npz_refuses_an_existing_npz_without_overwrite(run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"precious")
    argv = ["sample-npz", "--run", str(run), "--num-samples", "2", "--batch-size", "2", "--steps", "2",
            "--no-progress", "--out", str(out)]
    _refused(argv, capsys, "pass --overwrite")
    assert out.read_bytes() == b"precious"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_bytes()[:2] == b"PK"


def _modes(root: Path) -> set[tuple[str, int]]:
    return {(str(p), "d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_folders_follow_the_umask(run, tmp_path, mask):
    """Atomic or not, every file is 0666 & ~umask and every folder 0777 & ~umask (forked, so the umask
    is the child's own)."""
    tmp_path = tmp_path / "made"  # pytest's own folder is 0700: look only at what terdit made
    old = os.umask(mask)
    try:
        out = tmp_path / "r"
        train = ["train", "--config", "TerDiT-Micro", "--steps", "2", "--batch-size", "4", "--ckpt-every", "1",
                 "--no-tensorboard", "--no-progress"]  # flags older versions knew too
        assert terdit([*train, "--out", str(out)]).rc == 0
        assert terdit(["export", str(out), "--out", str(tmp_path / "dep")]).rc == 0
        assert terdit(["sample", "--run", str(out), "--steps", "2", "--out", str(tmp_path / "s.npz")]).rc == 0
        assert terdit(["sample-npz", "--run", str(out), "--num-samples", "2", "--batch-size", "2", "--steps", "2",
                       "--no-progress", "--out", str(tmp_path / "fid.npz")]).rc == 0
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert {(kind, mode) for _, kind, mode in modes} == {("d", 0o777 & ~mask), ("f", 0o666 & ~mask)}, modes
    assert (out / "checkpoints" / "0000002" / "model.safetensors").is_file()
