"""Latent extraction (2 processes, resume), the latent dataset, and agreement with on-the-fly encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from terdit.cli.data import main as data_cli
from terdit.data.base import flip_decision, item_hash
from terdit.data.images import scan_image_folder
from terdit.data.latents import (
    LatentDataset,
    extract_latents,
    mmap_safetensors,
    read_manifest,
    read_safetensors_header,
    shard_name,
)
from terdit.data.sources import open_image_data
from terdit.data.synthetic import make_image_folder, save_tiny_vae, smooth_image
from terdit.data.vae import load_vae
from terdit.errors import TerditError

RES = 32


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny", (8, 16))


def _messy(root: Path) -> tuple[dict[str, int], set[str]]:
    """A folder with valid png/jpg/webp in modes L, P, CMYK, RGBA, RGB, bad files and an empty class."""
    make_image_folder(root, classes=3, per_class=4, seed=1)
    rng = np.random.default_rng(2)
    extra = {"class_0/gray.png": "L", "class_1/pal.png": "P", "class_2/cmyk.jpg": "CMYK",
             "class_1/rgba.webp": "RGBA"}
    for rel, mode in extra.items():
        Image.fromarray(smooth_image(rng, 45, 70)).convert(mode).save(root / rel)
    (root / "class_0" / "zero.jpg").write_bytes(b"")
    good = (root / "class_2" / "img_0.webp").read_bytes()
    (root / "class_2" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (root / "class_1" / "half.webp").write_bytes(good[: len(good) // 2])
    (root / "class_0" / "labels.txt").write_text("x")
    (root / "class_3_empty").mkdir()
    valid = {}
    for d in sorted(root.iterdir()):
        for f in d.iterdir():
            if f.name not in ("zero.jpg", "corrupt.jpg", "half.webp", "labels.txt"):
                valid[f"{d.name}/{f.name}"] = int(d.name.split("_")[1])
    return valid, {"class_0/zero.jpg", "class_2/corrupt.jpg", "class_1/half.webp", "class_0/labels.txt"}


def mmap_meta(path: Path) -> dict[str, str]:
    return read_safetensors_header(path)[0]["__metadata__"]


def _contents(out: Path) -> dict[str, np.ndarray]:
    m = read_manifest(out)
    keys = ("latents", "latents_flip", "labels", "indices")
    parts = [mmap_safetensors(out / s["file"]) for s in m["shards"]]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}


def _torchrun(args: list[str], nproc: int, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "terdit.cli.data", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def test_two_process_extraction_and_resume(tmp_path, vae_dir):
    data = tmp_path / "data"
    valid, bad = _messy(data)
    out = tmp_path / "lat2"
    common = ["extract-latents", str(data), "--vae", str(vae_dir), "--resolution", str(RES), "--flip",
              "--shard-size", "3", "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    r = _torchrun([*common, "--out", str(out)], 2, {"TERDIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(out)
    c = _contents(out)
    idx = scan_image_folder(data)
    # every valid image exactly once, with its folder's label; bad ones reported
    stored = [idx.paths[i] for i in c["indices"]]
    assert sorted(stored) == sorted(valid) and len(stored) == len(set(stored))
    assert [valid[p] for p in stored] == c["labels"].tolist()
    assert {s["path"] for s in m["skipped"]} == bad and m["num_skipped"] == len(bad)
    assert m["num_items"] == len(valid) and m["class_names"][3] == "class_3_empty" and m["num_classes"] == 4
    assert m["class_counts"] == [sum(v == k for v in valid.values()) for k in range(4)]
    assert "4 file(s) skipped" in r.stderr
    assert len(m["shards"]) == -(-len(valid) // 3)
    writers = {mmap_meta(out / s["file"])["written_by"] for s in m["shards"]}
    assert writers == {"rank 0 of 2", "rank 1 of 2"}

    # resume: a single process, stopped after one shard, a stray temp file and a torn shard, then continued
    out1 = tmp_path / "lat1"
    kw = dict(vae=str(vae_dir), resolution=RES, flip=True, shard_size=3, batch_size=5, num_workers=0,
              progress=False)
    assert extract_latents(data, out1, max_shards=1, **kw) is None
    assert (out1 / shard_name(0)).is_file() and not (out1 / "manifest.json").exists()
    (out1 / ".shard-000001.safetensors.123.tmp").write_bytes(b"partial")
    torn_src = (out / shard_name(2)).read_bytes()
    (out1 / shard_name(2)).write_bytes(torn_src[: len(torn_src) // 2])  # a torn file is redone
    with pytest.raises(TerditError, match="unfinished"):
        open_image_data(str(out1), resolution=RES, vae=None, seed=0)
    m1 = extract_latents(data, out1, **kw)
    assert m1 is not None and m1["settings_hash"] == m["settings_hash"]
    assert not list(out1.glob(".*.tmp"))
    c1 = _contents(out1)
    for k in ("labels", "indices"):
        np.testing.assert_array_equal(c1[k], c[k])
    for k in ("latents", "latents_flip"):
        np.testing.assert_allclose(c1[k].astype(np.float32), c[k].astype(np.float32), atol=2e-3, rtol=2e-3)
    # a complete directory is left alone; other settings into it are refused
    assert extract_latents(data, out1, **kw)["settings_hash"] == m["settings_hash"]
    with pytest.raises(TerditError, match="other settings"):
        extract_latents(data, out1, **{**kw, "resolution": 16})


def test_image_and_latent_paths_agree(tmp_path, vae_dir):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3, seed=4)
    out = tmp_path / "lat"
    assert data_cli(["extract-latents", str(data), "--vae", str(vae_dir), "--out", str(out), "--resolution",
                     str(RES), "--flip", "--store-dtype", "fp32", "--shard-size", "4", "--num-workers", "0",
                     "--no-progress"]) == 0
    seed = 11
    img = open_image_data(str(data), resolution=RES, vae=str(vae_dir), seed=seed, vae_sample=False)
    lat = open_image_data(str(out), resolution=RES, vae=None, seed=seed, vae_sample=False)
    n = len(img.dataset)
    assert len(lat.dataset) == n and img.num_classes == lat.num_classes == 3
    assert img.sample_shape == lat.sample_shape == (4, RES // 2, RES // 2)
    assert lat.encode is None and img.encode is not None
    vs = list(range(2 * n + 1))  # two epochs: both flip decisions occur for the same items
    assert len({flip_decision(seed, v) for v in vs}) == 2
    xb = torch.stack([img.dataset[v][0] for v in vs])
    z_img = img.encode(xb)
    z_lat = torch.stack([x for x, _ in lat.dataset.__getitems__(vs)])
    assert [img.dataset[v][1] for v in vs] == [y for _, y in lat.dataset.__getitems__(vs)]
    torch.testing.assert_close(z_img, z_lat, atol=1e-4, rtol=1e-4)
    # decode maps back to images of the right shape and range
    im = lat.decode(z_lat[:2])
    assert im.shape == (2, 3, RES, RES) and im.abs().max() <= 1

    # flip=False: never mirrored, whatever the virtual index
    noflip = LatentDataset(out, seed=seed, flip=False)
    plain = img.encode(torch.stack([_unflipped(img.dataset, i) for i in range(n)]))
    for v in vs:
        torch.testing.assert_close(noflip[v][0], plain[v % n], atol=1e-4, rtol=1e-4)


def _unflipped(ds, i):
    x, _ = ds[i]
    return x.flip(-1) if flip_decision(ds.seed, i) else x


def test_sample_and_moments_modes(tmp_path, vae_dir):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, seed=5)
    vae = load_vae(str(vae_dir))
    kw = dict(vae=vae, resolution=RES, num_workers=0, progress=False, store_dtype="fp32")
    a = extract_latents(data, tmp_path / "a", vae_mode="sample", seed=3, batch_size=2, shard_size=4, **kw)
    b = extract_latents(data, tmp_path / "b", vae_mode="sample", seed=3, batch_size=6, shard_size=6, **kw)
    assert a["num_items"] == b["num_items"] == 6
    ca = np.concatenate([np.asarray(mmap_safetensors(tmp_path / "a" / s["file"])["latents"])
                         for s in a["shards"]])
    cb = np.asarray(mmap_safetensors(tmp_path / "b" / shard_name(0))["latents"])
    np.testing.assert_allclose(ca, cb, atol=1e-5)  # noise belongs to the item, not to batch or shard

    # stored sample = mean + std * noise(seed, item)
    idx = scan_image_folder(data)
    ds = open_image_data(str(data), resolution=RES, vae=str(vae_dir), seed=0, flip=False, vae_sample=False)
    mean, std = vae.moments(torch.stack([ds.dataset[i][0] for i in range(len(idx))]))
    g = [torch.Generator().manual_seed(item_hash(3, i, 2)) for i in range(len(idx))]
    want = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=gi) for gi in g])
    np.testing.assert_allclose(ca, want.numpy(), atol=1e-4)

    extract_latents(data, tmp_path / "m", vae_mode="moments", flip=True, shard_size=4, **kw)
    sampled = LatentDataset(tmp_path / "m", seed=9, flip=True, sample=True)
    means = LatentDataset(tmp_path / "m", seed=9, flip=True, sample=False)
    n = len(sampled)
    x0, x1 = sampled[1][0], sampled[1 + n][0]
    torch.testing.assert_close(sampled[1][0], x0)  # deterministic in (seed, v)
    assert not torch.allclose(x0, x1)  # fresh noise in the next epoch
    assert (x0 - means[1][0]).abs().mean() > 0


def test_errors(tmp_path, vae_dir):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, seed=6)
    with pytest.raises(TerditError, match="pass --vae"):
        open_image_data(str(data), resolution=RES, vae=None, seed=0)
    pix = open_image_data(str(data), resolution=RES, vae="none", seed=0)
    assert pix.sample_shape == (3, RES, RES) and pix.encode is None
    with pytest.raises(TerditError, match="no such directory"):
        load_vae(str(tmp_path / "missing_vae"))
    with pytest.raises(TerditError, match="not a multiple"):
        load_vae(str(vae_dir)).latent_shape(33)
    assert data_cli(["extract-latents", str(data), "--vae", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "o"), "--num-workers", "0"]) == 2
    out = tmp_path / "lat"
    extract_latents(data, out, vae=str(vae_dir), resolution=RES, num_workers=0, progress=False)
    with pytest.raises(TerditError, match="extracted at 32px"):
        open_image_data(str(out), resolution=64, vae=None, seed=0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["vae_mode"] == "mean" and m["store_dtype"] == "fp16"
    assert m["scale_factor"] == pytest.approx(0.18215)
    # no stored mirrored latents: a flipped virtual index gets the stored latent mirrored along its width
    flipping, plain = LatentDataset(out, seed=2, flip=True), LatentDataset(out, seed=2, flip=False)
    n = len(plain)
    for v in range(2 * n):
        want = plain[v][0].flip(-1) if flip_decision(2, v) else plain[v][0]
        torch.testing.assert_close(flipping[v][0], want, rtol=0, atol=0)


def test_hub_id_offline_is_a_clear_error(tmp_path):
    code = ("from terdit.data.vae import load_vae\n"
            "from terdit.errors import TerditError\n"
            "try:\n    load_vae('stabilityai/sd-vae-ft-ema')\n"
            "except TerditError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR --vae stabilityai/sd-vae-ft-ema: cannot load the VAE" in r.stdout, r.stdout + r.stderr
    assert "Hugging Face cache" in r.stdout
