"""`evaluate` and `make-reference` driven through argparse, as the `terdit` command runs them."""

import argparse
import json

import numpy as np
import pytest

from terdit.cli import evaluate as cli
from terdit.errors import TerditError
from terdit.eval.digits import digits_split, digits_uint8_from
from terdit.eval.evaluate import evaluate
from terdit.eval.metrics import Statistics, compute_statistics, frechet_distance
from terdit.eval.reference import load_batch, write_batch


@pytest.fixture(autouse=True, scope="module")
def cache(shared_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TERDIT_INCEPTION_WEIGHTS", raising=False)
        yield


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_digits_json(tmp_path, capsys):
    ref = write_batch(tmp_path / "ref.npz", digits_uint8_from(digits_split("train")[0]))
    samples = write_batch(tmp_path / "samples.npz", digits_split("test")[0])  # float NCHW in [-1, 1]
    assert run(["evaluate", str(ref), str(samples), "--features", "digits", "--json", "--device", "cpu",
                "--no-progress", "--batch-size", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == "digits" and out["sfid"] is None
    assert out["num_samples"] == len(digits_split("test")[0])
    assert 0 <= out["fid"] < 50 and out["inception_score"] > 8
    assert 0.8 < out["precision"] <= 1 and 0.8 < out["recall"] <= 1
    assert any("sFID skipped" in n for n in out["notes"])


def test_evaluate_text_output_and_input_errors(tmp_path, capsys):
    ref = write_batch(tmp_path / "ref.npz", digits_uint8_from(digits_split("test")[0][:50]))
    assert run(["evaluate", str(ref), str(ref), "--features", "digits", "--no-progress"]) == 0
    text = capsys.readouterr().out.splitlines()
    names = [line.split(":")[0] for line in text[:5]]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    rgb = write_batch(tmp_path / "rgb.npz", np.zeros((5, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(TerditError, match="rgb.npz: digits features need"):
        run(["evaluate", str(ref), str(rgb), "--features", "digits", "--no-progress"])
    with pytest.raises(TerditError, match="--inception-weights"):
        run(["evaluate", str(rgb), str(rgb), "--no-progress", "--device", "cpu"])
    with pytest.raises(TerditError, match="missing.npz: file not found"):
        run(["evaluate", str(tmp_path / "missing.npz"), str(ref), "--features", "digits"])


def test_make_reference_from_digits_npz_and_folder(tmp_path, capsys):
    assert run(["make-reference", "digits", "--out", str(tmp_path / "digits.npz")]) == 0
    digits = load_batch(tmp_path / "digits.npz").images.read()
    assert digits.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(digits, digits_uint8_from(digits_split("all")[0]))

    big = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_batch(tmp_path / "big.npz", big)
    assert run(["make-reference", str(tmp_path / "big.npz"), "--out", str(tmp_path / "small.npz"),
                "--resolution", "16", "--limit", "2"]) == 0
    assert load_batch(tmp_path / "small.npz").images.shape == (2, 16, 16, 3)

    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "imgs" / "a.png")
    assert run(["make-reference", str(tmp_path / "imgs"), "--out", str(tmp_path / "f.npz"),
                "--resolution", "8"]) == 0
    img = load_batch(tmp_path / "f.npz").images.read()
    assert img.shape == (1, 8, 8, 3) and tuple(img[0, 4, 4]) == (200, 10, 10)
    with pytest.raises(TerditError, match="needs --resolution"):
        run(["make-reference", str(tmp_path / "imgs"), "--out", str(tmp_path / "g.npz")])
    with pytest.raises(TerditError, match="nowhere: no such"):
        run(["make-reference", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.npz")])


class _FakeInception:
    """A tiny stand-in with Inception's interface: 4 pool features, 3 spatial, 5 logits."""

    name = "inception"
    has_spatial = True

    def check_images(self, shape, source):
        pass

    def __call__(self, images):
        x = images.reshape(len(images), -1).astype(np.float64) / 255
        return {"pool": x[:, :4], "spatial": x[:, 4:7], "logits": x[:, :5] * 3}


def test_stored_reference_statistics_are_used_for_fid_and_sfid(tmp_path):
    rng = np.random.default_rng(3)
    ref_imgs = rng.integers(0, 256, (40, 2, 2, 3), dtype=np.uint8)
    smp_imgs = rng.integers(0, 256, (30, 2, 2, 3), dtype=np.uint8)
    stats = {"mu": np.full(4, 0.2), "sigma": np.eye(4) * 0.1, "mu_s": np.full(3, 0.7), "sigma_s": np.eye(3)}
    ref = load_batch(write_batch(tmp_path / "ref.npz", ref_imgs, stats))
    smp = load_batch(write_batch(tmp_path / "smp.npz", smp_imgs))
    result = evaluate(ref, smp, _FakeInception(), batch_size=7, progress=False)
    flat = smp_imgs.reshape(30, -1) / 255
    assert result.fid == pytest.approx(frechet_distance(Statistics(stats["mu"], stats["sigma"]),
                                                        compute_statistics(flat[:, :4])))
    assert result.sfid == pytest.approx(frechet_distance(Statistics(stats["mu_s"], stats["sigma_s"]),
                                                         compute_statistics(flat[:, 4:7])))
    bad = load_batch(write_batch(tmp_path / "bad.npz", ref_imgs, {"mu": np.zeros(2), "sigma": np.eye(2)}))
    with pytest.raises(TerditError, match="bad.npz: stored mu has 2 dims"):
        evaluate(bad, smp, _FakeInception(), progress=False)
