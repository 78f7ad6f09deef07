"""The whole ADM evaluation of a sample batch against a reference batch: IS, FID, sFID, precision, recall."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from terdit.errors import TerditError
from terdit.eval.features import FeatureExtractor, extract_features
from terdit.eval.metrics import (
    Statistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from terdit.eval.reference import ReferenceBatch


@dataclass
class EvalResult:
    """The five numbers (sfid None when the extractor has no spatial features) and how they were made."""

    features: str
    num_ref: int
    num_samples: int
    inception_score: float
    fid: float
    sfid: float | None
    precision: float
    recall: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        """ADM's printout order: Inception Score, FID, sFID, Precision, Recall."""
        sfid = "skipped" if self.sfid is None else f"{self.sfid}"
        lines = [f"Inception Score: {self.inception_score}", f"FID: {self.fid}", f"sFID: {sfid}",
                 f"Precision: {self.precision}", f"Recall: {self.recall}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _statistics(batch: ReferenceBatch | np.ndarray, feats: dict[str, np.ndarray], extractor: FeatureExtractor,
                spatial: bool, notes: list[str]) -> Statistics:
    """Statistics stored in the npz when it has them (ADM's reference batches: whole-dataset Inception
    statistics), else computed from the extracted features."""
    key = "spatial" if spatial else "pool"
    if isinstance(batch, ReferenceBatch) and batch.stored_statistics(spatial) is not None:
        mu, sigma = batch.stored_statistics(spatial)
        if extractor.name != "inception":
            if not spatial:
                notes.append(f"{batch.path}: stored statistics ignored (they are Inception statistics, "
                             f"these features are {extractor.name})")
        elif mu.shape[0] != feats[key].shape[1]:
            raise TerditError(f"{batch.path}: stored {'mu_s' if spatial else 'mu'} has {mu.shape[0]} dims, "
                              f"{extractor.name} {key} features have {feats[key].shape[1]}")
        else:
            return Statistics(mu, sigma)
    return compute_statistics(feats[key])


def evaluate(ref: ReferenceBatch | np.ndarray, samples: ReferenceBatch | np.ndarray,
             extractor: FeatureExtractor, batch_size: int = 64, progress: bool = True,
             half_distances: bool = True) -> EvalResult:
    """Evaluate `samples` against `ref` (ADM npz batches, or uint8 NHWC arrays) with `extractor`.

    IS comes from the sample logits; FID/sFID from statistics (stored ones when present, for Inception);
    precision/recall from the pool features of the reference images and of the samples."""
    ref_images = ref.images if isinstance(ref, ReferenceBatch) else ref
    sample_images = samples.images if isinstance(samples, ReferenceBatch) else samples
    notes: list[str] = []
    ref_feats = extract_features(extractor, ref_images, batch_size, "reference", progress)
    sample_feats = extract_features(extractor, sample_images, batch_size, "samples", progress)
    fid = frechet_distance(_statistics(ref, ref_feats, extractor, False, notes),
                           _statistics(samples, sample_feats, extractor, False, notes))
    sfid = None
    if extractor.has_spatial:
        sfid = frechet_distance(_statistics(ref, ref_feats, extractor, True, notes),
                                _statistics(samples, sample_feats, extractor, True, notes))
    else:
        notes.append(f"sFID skipped: the {extractor.name} extractor has no spatial features")
    precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], half=half_distances)
    return EvalResult(features=extractor.name, num_ref=len(ref_images), num_samples=len(sample_images),
                      inception_score=inception_score(sample_feats["logits"]), fid=fid, sfid=sfid,
                      precision=precision, recall=recall, notes=notes)
