"""Fault injection: `kill -9` (os._exit(137) from terdit.io.fault_point) at every atomic write, rename and
removal of train, sample-npz, extract-latents, export, convert and quantize; rerunning the command then
gives bitwise the uninterrupted result with no leftovers. Also SIGINT / SIGTERM during training and the
locks that keep a second writer out. Each child is a fork of the test process (see tests/forked.py)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from forked import fault_sites, leftovers, terdit, tree

from terdit.io import load_tensors

TRAIN = ["train", "--config", "TerDiT-Micro", "--steps", "3", "--batch-size", "4", "--ckpt-every", "2",
         "--keep-checkpoints", "1", "--log-every", "1", "--sample-steps", "2", "--no-tensorboard", "--no-progress"]


def _train_snapshot(run: Path) -> dict:
    """Everything a finished run holds that must not depend on interruptions (timings excluded)."""
    log = [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
           for line in (run / "log.jsonl").read_text().splitlines()]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    last = run / "checkpoints" / ckpts[-1]
    return {"log": log, "ckpts": ckpts, "samples": (run / "samples.png").read_bytes(),
            "model": (last / "model.safetensors").read_bytes(), "ema": (last / "ema.safetensors").read_bytes(),
            "config": (run / "config.json").read_text(),
            "args": {k: v for k, v in json.loads((run / "train_args.json").read_text()).items()
                     if k not in ("out", "resume")}}


def _kill_everywhere(tmp_path: Path, argv: Callable[[Path], list[str]], again: Callable[[Path], list[str]],
                     snapshot: Callable[[Path], object], prepare: Callable[[Path], None] = lambda p: None,
                     after_kill: Callable[[Path], None] = lambda p: None,
                     env: Callable[[Path], dict[str, str]] = lambda p: {}) -> list[str]:
    """Kill `argv` at each fault point a clean run passes; `again` must then finish it bitwise identical to
    the clean run, leaving no temporaries, moved-aside folders or locks. Returns the sites."""
    ref = tmp_path / "ref"
    prepare(ref)
    sites = fault_sites(argv(ref), tmp_path / "sites.log", env(ref))
    expected = snapshot(ref)
    assert not leftovers(ref)
    for i, site in enumerate(sites, 1):
        d = tmp_path / f"k{i}"
        prepare(d)
        res = terdit(argv(d), {**env(d), "TERDIT_FAULT": f"*:{i}"})
        assert res.rc == 137, (site, res.out)
        after_kill(d)
        res = terdit(again(d), env(d))
        assert res.rc == 0, (site, res.out)
        assert snapshot(d) == expected, site
        assert not leftovers(d), (site, leftovers(d))
    return sites


def test_train_survives_a_kill_at_every_write(tmp_path):
    def again(d: Path) -> list[str]:  # what a user reruns: --resume once there is a checkpoint
        has_ckpt = (d / "run" / "checkpoints").is_dir() and any(
            p.name.isdigit() for p in (d / "run" / "checkpoints").iterdir())
        return [*TRAIN, "--out", str(d / "run"), *(["--resume"] if has_ckpt else [])]

    def loadable(d: Path) -> None:  # between any two points, the newest checkpoint loads
        ckpts = sorted(p for p in (d / "run" / "checkpoints").glob("[0-9]*")) if (d / "run").is_dir() else []
        if ckpts:
            load_tensors(ckpts[-1] / "ema.safetensors")

    sites = _kill_everywhere(tmp_path, lambda d: [*TRAIN, "--out", str(d / "run")], again,
                             lambda d: _train_snapshot(d / "run"), after_kill=loadable)
    for needed in ("rename:config.json", "rename:train_args.json", "write:model.safetensors",
                   "rename:ema.safetensors", "fill:0000002", "rename:0000002", "remove:0000002",
                   "rename:samples.png"):
        assert needed in sites


def test_resume_at_the_final_step_redoes_samples_and_never_rewrites_the_checkpoint(tmp_path):
    """--keep-checkpoints 1, killed after the final checkpoint and before samples.png: the rerun draws the
    grid, and no kill point of that rerun leaves the run without a loadable checkpoint."""
    run = tmp_path / "run"
    argv = [*TRAIN, "--out", str(run)]
    assert terdit(argv, {"TERDIT_FAULT": "write:samples.png:1"}).rc == 137
    assert not (run / "samples.png").exists()
    before = (run / "checkpoints" / "0000003" / "model.safetensors").read_bytes()
    sites = fault_sites([*argv, "--resume"], tmp_path / "sites.log")
    assert not any(s.endswith(":0000003") or s.startswith("write:model") for s in sites), sites
    assert (run / "samples.png").is_file()
    assert (run / "checkpoints" / "0000003" / "model.safetensors").read_bytes() == before
    ref = tmp_path / "ref"
    assert terdit([*TRAIN, "--out", str(ref)]).rc == 0
    assert (ref / "samples.png").read_bytes() == (run / "samples.png").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, sig):
    run = tmp_path / "run"
    argv = [*TRAIN, "--ckpt-every", "1000", "--out", str(run)]
    res = terdit(argv, {"TERDIT_FAULT": f"train-step:2:1:{sig.name[3:]}"})  # the signal arrives in step 2
    assert res.rc == 128 + sig, res.out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000002"]
    assert not (run / "samples.png").exists() and not leftovers(run)
    assert terdit([*argv, "--resume"]).rc == 0
    ref = tmp_path / "ref"
    assert terdit([*TRAIN, "--out", str(ref)]).rc == 0
    a, b = _train_snapshot(run), _train_snapshot(ref)
    assert a["log"] == b["log"] and a["model"] == b["model"] and a["ema"] == b["ema"]
    assert a["samples"] == b["samples"]


def test_default_training_checkpoints_by_time(tmp_path):
    """No --ckpt-every: a checkpoint still appears once --ckpt-minutes have passed (0.0001 min here)."""
    run = tmp_path / "run"
    argv = ["train", "--config", "TerDiT-Micro", "--steps", "3", "--batch-size", "4", "--sample-steps", "2",
            "--no-tensorboard", "--no-progress", "--keep-checkpoints", "5", "--ckpt-minutes", "0.000001",
            "--out", str(run)]
    assert terdit(argv).rc == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001", "0000002", "0000003"]


def test_a_locked_run_folder_refuses_a_second_writer_naming_it(tmp_path):
    from terdit.io import locked

    run = tmp_path / "run"
    first = os.fork()
    if first == 0:  # a stand-in for a training process: holds the lock until killed
        with locked(run / ".lock", "run"):
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    try:
        os.waitpid(first, os.WUNTRACED)  # it stopped, holding the lock
        res = terdit([*TRAIN, "--out", str(run)])
        assert res.rc == 2 and f"in use by process {first}" in res.out, res.out
        assert not (run / "config.json").exists()
    finally:
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
    res = terdit([*TRAIN, "--out", str(run)])  # the lock died with its holder
    assert res.rc == 0, res.out


def test_two_trainings_into_one_folder(tmp_path):
    """A real second `terdit train` while the first is stopped mid-run (SIGSTOP from its own fault point)."""
    run = tmp_path / "run"
    first = os.fork()
    if first == 0:
        res = terdit([*TRAIN, "--out", str(run)], {"TERDIT_FAULT": "train-step:1:1:STOP"})
        os._exit(res.rc)
    try:
        # the grandchild stops itself; wait for its lock to appear with a pid in it
        for _ in range(600):
            lock = run / ".lock"
            if lock.is_file() and lock.read_text().strip():
                break
            os.sched_yield()
            import time

            time.sleep(0.05)
        holder = int((run / ".lock").read_text())
        res = terdit([*TRAIN, "--out", str(run), "--seed", "1"])
        assert res.rc == 2 and f"in use by process {holder}" in res.out, res.out
        res = terdit([*TRAIN, "--out", str(run), "--resume"])
        assert res.rc == 2 and f"in use by process {holder}" in res.out, res.out
        os.kill(holder, signal.SIGCONT)
    finally:
        _, status = os.waitpid(first, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one writer's log, not two interleaved


# ------------------------------------------------------------------------------------------- sample-npz


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("micro") / "run"
    assert terdit([*TRAIN, "--out", str(run)]).rc == 0
    return run


def test_sample_npz_survives_a_kill_at_every_write(tmp_path, micro_run):
    def argv(d: Path) -> list[str]:
        return ["sample-npz", "--run", str(micro_run), "--num-samples", "5", "--batch-size", "2", "--steps", "2",
                "--no-progress", "--out", str(d / "s.npz")]

    sites = _kill_everywhere(tmp_path, argv, argv, lambda d: (d / "s.npz").read_bytes(),
                             prepare=lambda d: d.mkdir())
    assert {"rename:settings.json", "write:batch-000002.npz", "part:batch-000001.npz", "write:s.npz",
            "rename:s.npz"} <= set(sites)


def test_a_second_sample_npz_into_the_same_output_is_refused(tmp_path, micro_run):
    out = tmp_path / "s.npz"
    argv = ["sample-npz", "--run", str(micro_run), "--num-samples", "4", "--batch-size", "2", "--steps", "2",
            "--no-progress", "--out", str(out)]
    first = os.fork()
    if first == 0:
        os._exit(terdit(argv, {"TERDIT_FAULT": "part:*:1:STOP"}).rc)
    try:
        lock = tmp_path / ".s.npz.lock"
        import time

        for _ in range(600):
            if lock.is_file() and lock.read_text().strip():
                break
            time.sleep(0.05)
        holder = int(lock.read_text())
        res = terdit(argv)
        assert res.rc == 2 and f"in use by process {holder}" in res.out, res.out
        os.kill(holder, signal.SIGCONT)
    finally:
        _, status = os.waitpid(first, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and out.is_file() and not leftovers(tmp_path)


# -------------------------------------------------------------------------------------- extract-latents


def test_extract_latents_survives_a_kill_at_every_write(tmp_path):
    from terdit.data.latents import read_safetensors_header
    from terdit.data.synthetic import make_image_folder, save_tiny_vae

    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=3, seed=1)
    vae = save_tiny_vae(tmp_path / "vae", (8, 16))

    def argv(d: Path) -> list[str]:
        return ["extract-latents", str(data), "--vae", str(vae), "--out", str(d / "lat"), "--resolution", "16",
                "--shard-size", "4", "--num-workers", "0", "--no-progress"]

    def snapshot(d: Path) -> dict:  # safetensors orders its metadata per process: compare it parsed
        out = {}
        for p in sorted((d / "lat").iterdir()):
            header, start = read_safetensors_header(p) if p.suffix == ".safetensors" else (None, 0)
            out[p.name] = (header, p.read_bytes()[start:])
        return out

    sites = _kill_everywhere(tmp_path, argv, argv, snapshot, prepare=lambda d: d.mkdir(),
                             env=lambda d: {"TERDIT_CACHE": str(d / "cache")})  # each trial scans afresh
    assert {"write:shard-000000.safetensors", "rename:shard-000001.safetensors", "rename:manifest.json"} <= set(sites)


# ------------------------------------------------------------------------------- export, convert, quantize


def _rerun(argv: Callable[[Path], list[str]], name: str) -> Callable[[Path], list[str]]:
    """What a user reruns after a crash: the same command, with --overwrite once the output is there."""
    def again(d: Path) -> list[str]:
        cmd = argv(d)
        return [*cmd, "--overwrite"] if (d / name).exists() and "--overwrite" not in cmd else cmd

    return again


def _dir_snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("replace", [False, True])
def test_export_survives_a_kill_at_every_write(tmp_path, micro_run, replace):
    """Fresh, and replacing an older export with --overwrite: after a kill the folder holds the old export
    or the new one, whole, and the rerun finishes the new one."""
    def prepare(d: Path) -> None:
        d.mkdir()
        if replace:
            assert terdit(["export", str(micro_run), "--format", "base3", "--out", str(d / "dep")]).rc == 0

    def argv(d: Path) -> list[str]:
        return ["export", str(micro_run), "--out", str(d / "dep"), *(["--overwrite"] if replace else [])]

    old = {}

    def whole(d: Path) -> None:
        if (d / "dep").exists():
            assert _dir_snapshot(d / "dep") in (old.get("old"), old.get("new")), sorted(os.listdir(d))

    old_ref = tmp_path / "old"
    prepare(old_ref)
    old["old"] = _dir_snapshot(old_ref / "dep") if replace else None
    new_ref = tmp_path / "new"
    new_ref.mkdir()
    assert terdit(["export", str(micro_run), "--out", str(new_ref / "dep")]).rc == 0
    old["new"] = _dir_snapshot(new_ref / "dep")
    sites = _kill_everywhere(tmp_path, argv, _rerun(argv, "dep"), lambda d: _dir_snapshot(d / "dep"), prepare=prepare,
                             after_kill=whole)
    assert ("exchange:dep" if replace else "rename:dep") in sites


def test_convert_and_quantize_survive_a_kill_at_every_write(tmp_path, monkeypatch):
    import torch
    from test_deploy_public import write_terdit_release

    from terdit.deploy import public
    from terdit.io import save_tensors
    from terdit.models import TerDiT, get_config

    monkeypatch.setitem(public.PUBLIC_MODELS, "DiT_Llama_tiny_patch2", "TerDiT-Micro")
    rel = tmp_path / "rel"
    rel.mkdir()
    write_terdit_release(rel)
    fp = tmp_path / "fp"
    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro", linear="fp"))
    model.config.save(fp / "config.json")
    save_tensors(fp / "checkpoints" / "0000001" / "ema.safetensors", model.state_dict())

    def convert(d: Path) -> list[str]:
        return ["convert", str(rel), "--out", str(d / "dep")]

    def quantize(d: Path) -> list[str]:
        return ["quantize", str(fp), "--out", str(d / "q")]

    def fresh(d: Path) -> None:
        d.mkdir(parents=True)

    sites = _kill_everywhere(tmp_path / "c", convert, _rerun(convert, "dep"), tree, prepare=fresh)
    assert "rename:dep" in sites
    sites = _kill_everywhere(tmp_path / "q", quantize, _rerun(quantize, "q"), tree, prepare=fresh)
    assert {"rename:quantize.json", "rename:q"} <= set(sites)
