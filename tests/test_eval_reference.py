"""ADM npz batches: round trips, streaming reads, and bad files turned into TerditErrors naming the file."""

import numpy as np
import pytest
from PIL import Image

from terdit.errors import TerditError
from terdit.eval.reference import (
    NpzImages,
    center_crop,
    images_from_folder,
    load_batch,
    resize_batch,
    to_uint8_nhwc,
    write_batch,
)


def test_round_trip_with_statistics_and_streaming_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(11, 6, 5, 3), dtype=np.uint8)
    stats = {"mu": rng.normal(size=4), "sigma": np.eye(4), "mu_s": rng.normal(size=2), "sigma_s": np.eye(2)}
    path = write_batch(tmp_path / "ref.npz", images, stats)
    batch = load_batch(path)
    assert batch.images.shape == images.shape and len(batch.images) == 11
    parts = list(batch.images.batches(4))
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(parts), images)
    np.testing.assert_array_equal(batch.images.read(limit=5), images[:5])
    mu, sigma = batch.stored_statistics()
    np.testing.assert_array_equal(mu, stats["mu"])
    np.testing.assert_array_equal(batch.stored_statistics(spatial=True)[1], np.eye(2))
    with np.load(path, allow_pickle=False) as plain:  # an ordinary npz, as ADM's evaluator expects
        np.testing.assert_array_equal(plain["arr_0"], images)


def test_compressed_npz_and_extra_keys_are_read(tmp_path):
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    np.savez_compressed(tmp_path / "s.npz", arr_0=images, labels=np.array([3, 1]))
    batch = load_batch(tmp_path / "s.npz")
    np.testing.assert_array_equal(batch.images.read(), images)
    assert batch.stored_statistics() is None


def test_float_images_use_dit_uint8_conversion():
    x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5], dtype=np.float32).reshape(1, 1, 2, 3)
    expected = np.array([0, 64, 128, 255, 255, 255], dtype=np.uint8).reshape(1, 2, 3, 1)  # clamp(127.5x+128)
    np.testing.assert_array_equal(to_uint8_nhwc(x), expected)


@pytest.mark.parametrize("case,match", [
    ("missing_key", "no 'arr_0'"),
    ("float_dtype", "dtype float32"),
    ("three_dims", "shape"),
    ("truncated", "truncated|not an .npz|unreadable"),
    ("not_zip", "not an .npz"),
    ("object_array", "objects|not a valid"),
    ("mu_only", "'mu' / 'sigma'"),
])
def test_bad_npz_raise_naming_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.npz"
    good = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    if case == "missing_key":
        np.savez(path, images=good)
    elif case == "float_dtype":
        np.savez(path, arr_0=good.astype(np.float32))
    elif case == "three_dims":
        np.savez(path, arr_0=good[..., 0])
    elif case == "truncated":
        np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_zip":
        path.write_text("hello")
    elif case == "object_array":
        np.savez(path, arr_0=np.array([{"a": 1}], dtype=object))
    elif case == "mu_only":
        np.savez(path, arr_0=good, mu=np.zeros(3))
    with pytest.raises(TerditError, match=match) as info:
        load_batch(path)
    assert str(path) in str(info.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(TerditError, match="nothere.npz: file not found"):
        NpzImages(tmp_path / "nothere.npz")


def test_center_crop_follows_adm_loader():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    out = center_crop(img, 20)
    assert out.size == (20, 20)
    # independent: box-halve twice (300x100 -> 150x50 -> 75x25), bicubic to 60x20, take the middle 20 columns
    ref = img.resize((150, 50), Image.Resampling.BOX).resize((75, 25), Image.Resampling.BOX)
    ref = ref.resize((60, 20), Image.Resampling.BICUBIC).crop((20, 0, 40, 20))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_folder_and_npz_resizing(tmp_path):
    rng = np.random.default_rng(2)
    for i, size in enumerate([(30, 40), (50, 20)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = images_from_folder(tmp_path, 16)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    gray = images_from_folder(tmp_path, 8, channels=1)
    assert gray.shape == (2, 8, 8, 1)
    assert resize_batch(imgs, 16) is imgs
    assert resize_batch(gray, 4).shape == (2, 4, 4, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TerditError, match="empty: no image files"):
        images_from_folder(tmp_path / "empty", 8)
