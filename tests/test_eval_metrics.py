"""Metric definitions checked against closed forms and direct NumPy computations."""

import numpy as np
import pytest
from scipy.special import rel_entr

from terdit.errors import TerditError
from terdit.eval import metrics
from terdit.eval.metrics import (
    Statistics,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_from_probs,
    pairwise_sq_distances,
    precision_recall,
)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(Statistics(m1, np.diag(s1)), Statistics(m2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-10)
    # N(0, I) vs N(m, I): only the mean term remains
    got = frechet_distance(Statistics(np.zeros(16), np.eye(16)), Statistics(m1, np.eye(16)))
    assert got == pytest.approx(np.sum(m1**2), rel=1e-10)


def test_fid_from_features_matches_eigenvalue_formula():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    # tr sqrt(S1 S2) = sum of square roots of the (real, non-negative) eigenvalues of S1 S2
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-8)
    st = compute_statistics(a)
    assert st.mu.dtype == np.float64 and np.allclose(st.sigma, s1)


def test_non_finite_sqrtm_retries_with_eps_on_the_diagonals(monkeypatch):
    real_sqrtm = metrics.linalg.sqrtm
    calls = []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky)
    s1, s2 = np.diag([1.0, 2.0, 0.0]), np.diag([4.0, 0.5, 0.0])
    with pytest.warns(UserWarning, match="adding"):
        got = frechet_distance(Statistics(np.zeros(3), s1), Statistics(np.zeros(3), s2))
    eps = 1e-6
    d1, d2 = np.diag(s1) + eps, np.diag(s2) + eps
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(d1 * d2))
    assert len(calls) == 2 and got == pytest.approx(expected, rel=1e-12)


def test_complex_sqrtm_is_accepted_only_with_tiny_imaginary_diagonal(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: np.eye(2) + 1e-5j * np.eye(2))
    assert frechet_distance(Statistics(np.zeros(2), s), Statistics(np.zeros(2), s)) == pytest.approx(0)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: np.eye(2) + 0.1j * np.eye(2))
    with pytest.raises(TerditError, match="imaginary"):
        frechet_distance(Statistics(np.zeros(2), s), Statistics(np.zeros(2), s))


def test_mismatched_statistics_raise():
    with pytest.raises(TerditError, match="do not match"):
        frechet_distance(Statistics(np.zeros(3), np.eye(3)), Statistics(np.zeros(4), np.eye(4)))
    with pytest.raises(TerditError):
        compute_statistics(np.zeros((1, 4)))


def test_inception_score_closed_forms():
    rng = np.random.default_rng(2)
    constant = np.tile(rng.normal(size=(1, 12)), (100, 1))
    assert inception_score(constant) == pytest.approx(1.0, abs=1e-12)
    k = 7
    one_hot = np.eye(k)[np.arange(700) % k]
    assert inception_score_from_probs(one_hot) == pytest.approx(k, rel=1e-12)
    assert inception_score(one_hot * 200.0) == pytest.approx(k, rel=1e-9)  # confident logits


def test_inception_score_uses_consecutive_splits_of_5000_in_file_order():
    # first 5,000: two balanced classes (score 2); next 5,000: four (score 4); then a 1-sample split (score 1)
    labels = np.concatenate([np.arange(5000) % 2, np.arange(5000) % 4, [0]])
    probs = np.eye(4)[labels]
    assert inception_score_from_probs(probs) == pytest.approx((2 + 4 + 1) / 3, rel=1e-12)


def test_inception_score_matches_direct_kl_computation():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(250, 10)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[:100], p[100:200], p[200:]):
        py = part.mean(0)
        scores.append(np.exp(np.mean([rel_entr(row, py).sum() for row in part])))
    assert inception_score(logits, split_size=100) == pytest.approx(np.mean(scores), rel=1e-10)


def _brute_force_pr(ref, samples, k=3):
    """Direct float64 definition: k-th neighbour radii (self excluded), coverage with <=."""
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(samples, samples), axis=1)[:, k]
    cross = d2(ref, samples)
    precision = np.mean((cross <= r_ref[:, None]).any(axis=0))
    recall = np.mean((cross <= r_smp[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_identical_and_far_apart_sets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_with_small_batches():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(90, 5)).astype(np.float32)
    smp = (rng.normal(size=(70, 5)) * 1.3 + 0.4).astype(np.float32)
    expected = _brute_force_pr(ref, smp)
    for batch in (7, 10000):
        got = precision_recall(ref, smp, batch_size=batch, half=False)
        assert got == pytest.approx(expected, abs=1e-12)
    half = precision_recall(ref, smp, batch_size=16)  # ADM's float16 distances: close, not identical
    assert half == pytest.approx(expected, abs=0.05)


def test_precision_uses_inclusive_radius():
    # reference points 0..4 on a line: the radius (k=3) of point 0 is 3^2 = 9; a sample at -3 is exactly on it
    ref = np.arange(5, dtype=np.float32)[:, None]
    smp = np.array([[-3.0], [10.0], [11.0], [12.0], [13.0]], dtype=np.float32)
    precision, _ = precision_recall(ref, smp)
    assert precision == pytest.approx(1 / 5)


def test_half_precision_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(6)
    u, v = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    direct = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert np.allclose(pairwise_sq_distances(u, v), direct, rtol=5e-3, atol=5e-3)
    big_u, big_v = u * 1000, v * 1000  # squared norms exceed float16's 65504
    got = pairwise_sq_distances(big_u, big_v)
    assert np.isfinite(got).all()
    assert np.allclose(got, ((big_u[:, None].astype(np.float64) - big_v[None]) ** 2).sum(-1), rtol=1e-4)
