"""The digits classifier as a feature extractor: accuracy, caching, and metrics that order corruptions."""

import numpy as np
import pytest

from terdit.eval import digits as digits_mod
from terdit.eval.digits import (
    DigitsClassifierConfig,
    DigitsExtractor,
    digits_split,
    digits_test_accuracy,
    digits_uint8_from,
    load_digits_classifier,
)
from terdit.eval.evaluate import evaluate
from terdit.eval.features import extract_features
from terdit.eval.metrics import fid_from_features, inception_score, precision_recall


@pytest.fixture(scope="module")
def extractor(shared_cache):
    return DigitsExtractor()


def _features(extractor, x):
    return extract_features(extractor, digits_uint8_from(x), batch_size=256, progress=False)


def test_classifier_accuracy_on_held_out_digits(extractor):
    assert digits_test_accuracy(extractor.net) >= 0.95


def test_classifier_is_cached_by_hyperparameter_hash(shared_cache, extractor, monkeypatch):
    cfg = DigitsClassifierConfig()
    assert (shared_cache / f"digits-classifier-{cfg.key()}.safetensors").is_file()

    def no_training(*a, **k):
        raise AssertionError("should have loaded the cached classifier")

    monkeypatch.setattr(digits_mod, "train_digits_classifier", no_training)
    again = load_digits_classifier(cfg)
    for a, b in zip(again.state_dict().values(), extractor.net.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    assert DigitsClassifierConfig(steps=301).key() != cfg.key()


def test_damaged_cache_file_is_retrained(shared_cache):
    cfg = DigitsClassifierConfig(steps=3)
    path = shared_cache / f"digits-classifier-{cfg.key()}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage")
    load_digits_classifier(cfg)
    assert path.stat().st_size > 1000


def test_fid_is_small_for_real_digits_and_grows_with_noise(extractor):
    train, _ = digits_split("train")
    test, _ = digits_split("test")
    f_train = _features(extractor, train)["pool"]
    fid_real = fid_from_features(f_train, _features(extractor, test)["pool"])
    rng = np.random.default_rng(0)
    noisy = [np.clip(test + s * rng.normal(size=test.shape), -1, 1) for s in (0.25, 0.5, 1.0)]
    fids = [fid_from_features(f_train, _features(extractor, x)["pool"]) for x in noisy]
    noise = fid_from_features(f_train, _features(extractor, rng.uniform(-1, 1, size=test.shape))["pool"])
    assert fid_real < 0.05 * noise
    assert fid_real < fids[0] < fids[1] < fids[2]
    assert noise > 10 * fid_real


def test_is_and_precision_recall_behave(extractor):
    train, _ = digits_split("train")
    test, labels = digits_split("test")
    f_train, f_test = _features(extractor, train), _features(extractor, test)
    assert 8.0 < inception_score(f_test["logits"]) <= 10.0
    zeros = _features(extractor, test[labels == 0])
    assert inception_score(zeros["logits"]) < 1.5  # one class only
    precision, recall = precision_recall(f_train["pool"], f_test["pool"])
    assert precision > 0.8 and recall > 0.8
    precision_z, recall_z = precision_recall(f_train["pool"], zeros["pool"])
    assert precision_z > 0.8 and recall_z < 0.3  # mode dropping: precise but poor recall
    noise = _features(extractor, np.random.default_rng(1).uniform(-1, 1, size=test.shape))
    assert precision_recall(f_train["pool"], noise["pool"])[0] < 0.2


def test_evaluate_end_to_end_on_arrays(extractor):
    ref = digits_uint8_from(digits_split("train")[0])
    samples = digits_uint8_from(digits_split("test")[0])
    result = evaluate(ref, samples, extractor, progress=False)
    assert result.sfid is None and "sFID skipped" in result.notes[0]
    assert result.num_ref == len(ref) and result.num_samples == len(samples)
    assert result.precision > 0.8 and result.recall > 0.8 and result.inception_score > 8
    f_ref = _features(extractor, digits_split("train")[0])["pool"]
    f_smp = _features(extractor, digits_split("test")[0])["pool"]
    assert result.fid == pytest.approx(fid_from_features(f_ref, f_smp))
