"""FID, sFID, Inception Score and Precision/Recall with the exact definitions of ADM's evaluator
(openai/guided-diffusion `evaluations/evaluator.py`). Every function takes plain feature arrays, so any
feature extractor works (Inception for ImageNet, the digits classifier for the CPU configs)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.special import log_softmax, xlogy

from terdit.errors import TerditError

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
PR_BATCH_SIZE = 10000


@dataclass
class Statistics:
    """Mean and covariance of a feature set; float64, covariance with N - 1 as np.cov computes it."""

    mu: np.ndarray
    sigma: np.ndarray


def compute_statistics(features: np.ndarray) -> Statistics:
    """Statistics of (N, D) features; needs N >= 2 for a covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise TerditError(f"need at least 2 feature vectors of shape (N, D) for statistics, got {f.shape}")
    return Statistics(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)), with ADM's (TTUR's) safeguards: a
    non-finite matrix square root is retried with eps * I added to both covariances, and a complex result is
    accepted (real part) only when its diagonal's imaginary parts are below 1e-3."""
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise TerditError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, "
                          f"covariances {s1.shape} vs {s2.shape} (were they made with different features?)")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product of covariances; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TerditError(f"FID: matrix square root has an imaginary component of "
                              f"{np.max(np.abs(covmean.imag)):.3g}; use more images than feature dimensions")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy's matrix square root without its accuracy warning (ADM calls it with disp=False, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def fid_from_features(ref: np.ndarray | Statistics, samples: np.ndarray | Statistics) -> float:
    """Fréchet distance of two feature sets (or precomputed statistics): FID or sFID, by the features."""
    ref_stats = ref if isinstance(ref, Statistics) else compute_statistics(ref)
    sample_stats = samples if isinstance(samples, Statistics) else compute_statistics(samples)
    return frechet_distance(ref_stats, sample_stats)


def inception_score_from_probs(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits (file order, last one may be shorter) of exp(E_x KL(p(y|x) || p(y))).
    0 * log 0 counts as 0 (ADM's formula gives NaN there; it cannot occur with softmax outputs in float64)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise TerditError(f"Inception Score needs class probabilities of shape (N, K), got {p.shape}")
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = xlogy(part, part) - xlogy(part, np.broadcast_to(marginal, part.shape))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score from unnormalised logits (for Inception: pool_3 @ W, no bias, 1008 classes)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise TerditError(f"Inception Score needs logits of shape (N, K), got {logits.shape}")
    return inception_score_from_probs(np.exp(log_softmax(logits, axis=1)), split_size)


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray, half: bool = True) -> np.ndarray:
    """Squared Euclidean distances max(|u|^2 - 2 u.v + |v|^2, 0) as float32, the formula ADM uses.

    half=True mimics ADM running it in float16 (inputs and every intermediate rounded to float16, sums
    accumulated in float32) and falling back to float32 when any float16 value overflows."""
    u32, v32 = np.asarray(u, dtype=np.float32), np.asarray(v, dtype=np.float32)
    if half:
        with np.errstate(over="ignore", invalid="ignore"):
            r = _round_half
            u16, v16 = r(u32), r(v32)
            nu = r(r(u16 * u16).sum(axis=1, dtype=np.float32))[:, None]
            nv = r(r(v16 * v16).sum(axis=1, dtype=np.float32))[None, :]
            d = np.maximum(r(r(nu - r(2 * r(u16 @ v16.T))) + nv), np.float32(0))
        if np.isfinite(d).all():
            return d
    nu = (u32 * u32).sum(axis=1)[:, None]
    nv = (v32 * v32).sum(axis=1)[None, :]
    return np.maximum(nu - 2 * (u32 @ v32.T) + nv, np.float32(0))


def _round_half(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE,
                   half: bool = True) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (the point itself is
    neighbour 0). Distances come in batch_size x batch_size blocks, as in ADM, but only the k + 1 smallest per
    row are kept between blocks, so memory stays at one block instead of batch_size x N."""
    f = np.asarray(features, dtype=np.float32)
    if len(f) <= k:
        raise TerditError(f"precision/recall with k={k} needs more than {k} images per set, got {len(f)}")
    radii = np.empty(len(f), dtype=np.float32)
    for start in range(0, len(f), batch_size):
        rows = f[start:start + batch_size]
        nearest = np.empty((len(rows), 0), dtype=np.float32)
        for c in range(0, len(f), batch_size):
            block = np.concatenate([nearest, pairwise_sq_distances(rows, f[c:c + batch_size], half)], axis=1)
            keep = min(k + 1, block.shape[1])
            nearest = np.partition(block, keep - 1, axis=1)[:, :keep]
        radii[start:start + len(rows)] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def _coverage(ref: np.ndarray, ref_radii: np.ndarray, samples: np.ndarray, sample_radii: np.ndarray,
              batch_size: int, half: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sample inside some reference ball, reference point inside some sample ball), with `<=`. Each distance
    block is computed once, reference rows against sample columns, as ADM does."""
    sample_in = np.zeros(len(samples), dtype=bool)
    ref_in = np.zeros(len(ref), dtype=bool)
    for r in range(0, len(ref), batch_size):
        for s in range(0, len(samples), batch_size):
            dist = pairwise_sq_distances(ref[r:r + batch_size], samples[s:s + batch_size], half)
            sample_in[s:s + batch_size] |= (dist <= ref_radii[r:r + batch_size, None]).any(axis=0)
            ref_in[r:r + batch_size] |= (dist <= sample_radii[None, s:s + batch_size]).any(axis=1)
    return sample_in, ref_in


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = PR_BATCH_SIZE, half: bool = True) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) as ADM computes it on pool features:
    precision = share of samples inside the reference manifold (union of k-NN balls around reference points),
    recall = share of reference points inside the sample manifold."""
    ref = np.asarray(ref, dtype=np.float32)
    samples = np.asarray(samples, dtype=np.float32)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise TerditError(f"precision/recall needs (N, D) features of equal D, got {ref.shape} and "
                          f"{samples.shape}")
    ref_radii = manifold_radii(ref, k, batch_size, half)
    sample_radii = manifold_radii(samples, k, batch_size, half)
    sample_in, ref_in = _coverage(ref, ref_radii, samples, sample_radii, batch_size, half)
    return float(sample_in.mean()), float(ref_in.mean())
