"""Image folders: ADM crop, colour modes, scanning with bad files, labels, flips, cache."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from terdit.data import images as images_mod
from terdit.data.base import flip_decision, item_hash
from terdit.data.images import (
    ImageFolderDataset,
    adm_center_crop,
    check_image,
    scan_image_folder,
    to_rgb,
)
from terdit.data.synthetic import smooth_image
from terdit.errors import TerditError

pytestmark = pytest.mark.usefixtures("private_cache")


def _reference_crop(img: Image.Image, n: int) -> np.ndarray:
    """ADM's crop spelled out step by step with explicit sizes, for comparison."""
    w, h = img.size
    while w >= 2 * n and h >= 2 * n:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    if w < h:
        new = (n, int(round(h * n / w)))
    else:
        new = (int(round(w * n / h)), n)
    img = img.resize(new, Image.BICUBIC)
    a = np.array(img)
    y0 = (a.shape[0] - n) // 2
    x0 = (a.shape[1] - n) // 2
    return a[y0:y0 + n, x0:x0 + n]


@pytest.mark.parametrize("hw,n", [((300, 200), 64), ((48, 64), 32), ((517, 1031), 128),
                                  ((100, 100), 100), ((33, 90), 64)])
def test_adm_center_crop_matches_manual_steps(hw, n):
    img = Image.fromarray(smooth_image(np.random.default_rng(1), *hw))
    got = np.asarray(adm_center_crop(img, n))
    assert got.shape == (n, n, 3)
    np.testing.assert_array_equal(got, _reference_crop(img, n))


def test_adm_crop_box_halving_count():
    # 1031x517 at 128: short side 517 >= 256 -> halve (515x258); 258 >= 256 -> again (257x129); bicubic.
    seen = []
    real = Image.Image.resize

    def spy(self, size, resample=None, *a, **k):
        seen.append((size, resample))
        return real(self, size, resample, *a, **k)

    img = Image.new("RGB", (1031, 517), (10, 20, 30))
    Image.Image.resize = spy
    try:
        out = adm_center_crop(img, 128)
    finally:
        Image.Image.resize = real
    assert [s for s, _ in seen] == [(515, 258), (257, 129), (255, 128)]
    assert [r for _, r in seen] == [Image.Resampling.BOX, Image.Resampling.BOX, Image.Resampling.BICUBIC]
    assert np.all(np.asarray(out) == (10, 20, 30))


def test_to_rgb_modes():
    gray = Image.new("L", (4, 4), 77)
    assert np.all(np.asarray(to_rgb(gray)) == 77)
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 0))
    assert np.all(np.asarray(to_rgb(rgba)) == (1, 2, 3))  # alpha dropped, colour kept
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([9, 8, 7] + [0] * 765)
    pal.info["transparency"] = 0
    assert np.all(np.asarray(to_rgb(pal)) == (9, 8, 7))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in naive CMYK
    assert np.all(np.asarray(to_rgb(cmyk)) == (255, 0, 0))
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.all(np.asarray(to_rgb(deep)) == 255)
    assert to_rgb(Image.new("1", (4, 4), 1)).mode == "RGB"


def _jpeg_bytes(rng, h=40, w=50, mode="RGB"):
    buf = io.BytesIO()
    img = Image.fromarray(smooth_image(rng, h, w))
    img.convert(mode).save(buf, "JPEG")
    return buf.getvalue()


def _messy_folder(root):
    """3 classes with valid images in mixed formats/modes, bad files of every kind, and an empty class."""
    rng = np.random.default_rng(0)
    valid = {}
    for c, name in enumerate(["apple", "bear", "cloud"]):
        d = root / name
        d.mkdir(parents=True)
        base = Image.fromarray(smooth_image(rng, 36 + 4 * c, 44))
        files = {
            "a.png": base.convert("L"),
            "b.jpg": base,
            "c.webp": base.convert("RGBA"),
            "d.png": base.convert("P"),
            "e.jpg": base.convert("CMYK"),
        }
        for fname, img in files.items():
            img.save(d / fname)
            valid[f"{name}/{fname}"] = c
    (root / "bear" / "sub").mkdir()
    Image.fromarray(smooth_image(rng, 30, 30)).save(root / "bear" / "sub" / "nested.bmp")
    valid["bear/sub/nested.bmp"] = 1
    (root / "empty_class").mkdir()
    good = _jpeg_bytes(rng)
    bad = {
        "apple/truncated.jpg": good[: len(good) // 2],
        "bear/zero.png": b"",
        "cloud/garbage.png": b"this is not a png at all",
        "cloud/readme.txt": b"notes",
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "stray.jpg").write_bytes(good)  # not inside a class folder
    return valid, set(bad) | {"stray.jpg"}


def test_scan_labels_and_bad_files(tmp_path, caplog):
    valid, bad = _messy_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="terdit.data"):
        idx = scan_image_folder(tmp_path / "data")
    assert idx.class_names == ["apple", "bear", "cloud", "empty_class"]
    assert dict(zip(idx.paths, idx.labels)) == valid  # each file exactly once, with its folder's label
    assert len(idx.paths) == len(set(idx.paths))
    for p, lab in zip(idx.paths, idx.labels):
        assert idx.class_names[lab] == p.split("/")[0]
    assert {p for p, _ in idx.skipped} == bad
    reasons = dict(idx.skipped)
    assert reasons["bear/zero.png"] == "empty file"
    assert "not an image" in reasons["cloud/readme.txt"]
    assert reasons["apple/truncated.jpg"].startswith("unreadable")
    assert idx.empty_classes == ["empty_class"]
    assert "5 file(s) skipped" in caplog.text and "empty_class" in caplog.text
    with pytest.raises(TerditError, match="--strict"):
        scan_image_folder(tmp_path / "data", strict=True)


def test_check_image_catches_truncation(tmp_path):
    rng = np.random.default_rng(3)
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(smooth_image(rng, 64, 64)).save(buf, fmt)
        p = tmp_path / f"x.{fmt.lower()}"
        p.write_bytes(buf.getvalue())
        assert check_image(p) is None
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
        assert check_image(p) is not None, fmt


def test_class_map(tmp_path):
    valid, _ = _messy_folder(tmp_path / "data")
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"apple": 7, "bear": 0, "cloud": 3, "empty_class": 5}))
    idx = scan_image_folder(tmp_path / "data", class_map=cmap)
    want = {"apple": 7, "bear": 0, "cloud": 3}
    assert all(lab == want[p.split("/")[0]] for p, lab in zip(idx.paths, idx.labels))
    assert idx.num_classes == 8 and idx.class_names[7] == "apple" and idx.class_names[1] == ""
    cmap.write_text(json.dumps({"apple": 0, "bear": 1}))
    with pytest.raises(TerditError, match="not in the class map"):
        scan_image_folder(tmp_path / "data", class_map=cmap)
    cmap.write_text(json.dumps({"apple": 0, "bear": 0, "cloud": 1, "empty_class": 2}))
    with pytest.raises(TerditError, match="share an index"):
        scan_image_folder(tmp_path / "data", class_map=cmap)


def test_scan_errors(tmp_path):
    with pytest.raises(TerditError, match="not a directory"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(TerditError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "flat" / "c").mkdir()
    (tmp_path / "flat" / "c" / "x.png").write_bytes(b"")
    with pytest.raises(TerditError, match="no readable images"):
        scan_image_folder(tmp_path / "flat")


def test_scan_cache_rechecks_only_changed_folders(tmp_path, monkeypatch):
    valid, _ = _messy_folder(tmp_path / "data")
    first = scan_image_folder(tmp_path / "data")
    calls = []
    real = images_mod.check_image
    monkeypatch.setattr(images_mod, "check_image", lambda p: calls.append(p) or real(p))
    again = scan_image_folder(tmp_path / "data")
    assert calls == [] and again.paths == first.paths and again.skipped == first.skipped
    Image.new("RGB", (20, 20)).save(tmp_path / "data" / "cloud" / "new.png")
    third = scan_image_folder(tmp_path / "data")
    assert calls and {c.parent.name for c in calls} == {"cloud"}
    assert "cloud/new.png" in third.paths


def test_dataset_flip_is_a_function_of_seed_and_virtual_index(tmp_path):
    _messy_folder(tmp_path / "data")
    idx = scan_image_folder(tmp_path / "data")
    n = len(idx)
    ds = ImageFolderDataset(idx, 32, seed=5, flip=True)
    plain = ImageFolderDataset(idx, 32, flip=False)
    flips = 0
    for v in range(3 * n):
        x, y = ds[v]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        x0, y0 = plain[v % n]
        assert y == y0 == idx.labels[v % n]
        f = flip_decision(5, v)
        flips += f
        torch.testing.assert_close(x, x0.flip(-1) if f else x0, rtol=0, atol=0)
    assert 0.25 * 3 * n < flips < 0.75 * 3 * n
    # epochs differ, seeds differ, values are stable
    assert [flip_decision(5, v) for v in range(64)] != [flip_decision(5, v + n) for v in range(64)]
    assert [flip_decision(5, v) for v in range(64)] != [flip_decision(6, v) for v in range(64)]
    assert item_hash(0, 0) == item_hash(0, 0) and item_hash(0, 0) != item_hash(0, 0, 1)
    # pixel values: unflipped item equals crop of the file converted to RGB, scaled to [-1, 1]
    with Image.open(idx.root / idx.paths[0]) as im:
        ref = np.asarray(adm_center_crop(im.convert("RGB"), 32)).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(plain[0][0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
