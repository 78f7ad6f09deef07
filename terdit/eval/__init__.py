"""Evaluation exactly as OpenAI's ADM evaluator computes it (FID, sFID, IS, precision, recall), in PyTorch
and NumPy/SciPy, with the FID Inception loaded from a local weights file and a digits classifier for offline
runs."""

from terdit.eval.digits import DigitsExtractor, digits_test_accuracy, digits_uint8, load_digits_classifier
from terdit.eval.evaluate import EvalResult, evaluate
from terdit.eval.features import FeatureExtractor, extract_features
from terdit.eval.inception import FIDInception, InceptionExtractor, load_inception
from terdit.eval.metrics import (
    Statistics,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_from_probs,
    precision_recall,
)
from terdit.eval.reference import NpzImages, ReferenceBatch, load_batch, to_uint8_nhwc, write_batch
from terdit.eval.resize import tf1_resize_bilinear

__all__ = [
    "DigitsExtractor", "EvalResult", "FIDInception", "FeatureExtractor", "InceptionExtractor", "NpzImages",
    "ReferenceBatch", "Statistics", "compute_statistics", "digits_test_accuracy", "digits_uint8", "evaluate",
    "extract_features", "fid_from_features", "frechet_distance", "inception_score",
    "inception_score_from_probs", "load_batch", "load_digits_classifier", "load_inception",
    "precision_recall", "tf1_resize_bilinear", "to_uint8_nhwc", "write_batch",
]
