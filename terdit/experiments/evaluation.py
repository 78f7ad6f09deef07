"""Measuring a variant: samples from it, digits metrics (FID/IS/P/R, class accuracy) and a fixed eval loss.

Every measurement compares against the same references, built once, so that variants and checkpoints differ
only by their weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from terdit.errors import TerditError
from terdit.experiments.variants import VARIANTS, Settings, train_args_for
from terdit.models import runs as runlib

EVAL_LOSS_ITEMS = 512  # items of the fixed eval-loss batch
SAMPLE_CHUNK = 256  # samples drawn per sampling call (bounds memory; measured fastest on the 2-core CPU)
NOISE_STRIDE = 1000  # seed k samples with noise seeds 1000k, 1000k + 1, ...: no two seeds share noise
BOOTSTRAP = 200  # bootstrap resamples per interval


def metric_mode(s: Settings) -> str:
    """"digits" (FID/IS/P/R in digits features, class accuracy) or "loss" (eval loss only)."""
    digits_data = s.data in (None, "digits")
    mode = s.metrics if s.metrics != "auto" else ("digits" if digits_data else "loss")
    if mode == "digits" and not digits_data:
        raise TerditError(f"--metrics digits needs the embedded 8x8 digits (no --data), not {s.data}; "
                          f"use --metrics loss and evaluate sample npz files with `terdit evaluate`")
    return mode


class Evaluator:
    """Samples a model and measures it: digits features (FID/IS/P/R), class accuracy, and a fixed eval loss.

    Everything a measurement compares against (reference features, the eval-loss batch with its timesteps
    and noise) is built once, so every variant and checkpoint is measured against exactly the same thing."""

    def __init__(self, s: Settings, device: torch.device) -> None:
        from terdit.data import open_training_data

        self.s, self.device = s, device
        self.mode = mode = metric_mode(s)
        a = train_args_for(VARIANTS["terdit"], s)  # open the data exactly as the trainer does
        self.data = open_training_data(a.data, resolution=a.resolution, vae=a.vae, seed=a.seed, flip=a.flip,
                                       vae_sample=a.vae_sample, class_map=a.class_map,
                                       strict=a.strict_data) if a.data else open_training_data(None)
        self.num_classes = self.data.num_classes
        self._eval_batch()
        if mode == "digits":
            from terdit.data.digits import digits_classifier
            from terdit.eval import DigitsExtractor, digits_uint8
            from terdit.eval.metrics import compute_statistics

            self.extractor = DigitsExtractor()
            self.ref_images = digits_uint8("all")  # the training data itself
            self.ref_feats = self.extractor(self.ref_images)
            self.ref_stats = compute_statistics(self.ref_feats["pool"])
            self.classifier = digits_classifier()

    def _eval_batch(self) -> None:
        """Evenly spaced items, stratified timesteps, seeded noise: a low-variance loss that PTQ models get too."""
        ds = self.data.dataset
        n = min(EVAL_LOSS_ITEMS, len(ds))
        idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
        items = [ds[int(i)] for i in idx]
        self.eval_x = torch.stack([torch.as_tensor(x) for x, _ in items])
        self.eval_y = torch.tensor([int(y) for _, y in items])
        self.eval_t = torch.tensor([int((k + 0.5) * 1000 / n) for k in range(n)])
        self._eval_z: torch.Tensor | None = None  # model-space batch and noise, made on first use
        self._eval_noise: torch.Tensor | None = None

    def _model_space_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval items in model space (encoded once: a sampling VAE must not differ between models)."""
        if self._eval_z is None:
            with torch.no_grad():
                parts = [self.eval_x[lo:lo + 128].to(self.device) for lo in range(0, len(self.eval_x), 128)]
                if self.data.encode is not None:
                    parts = [self.data.encode(x) for x in parts]
                self._eval_z = torch.cat([x.float().cpu() for x in parts])
            gen = torch.Generator().manual_seed(self.s.seed)
            self._eval_noise = torch.randn(self._eval_z.shape, generator=gen)
        assert self._eval_noise is not None
        return self._eval_z, self._eval_noise

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        """Mean training loss (MSE + VB) of the model on the fixed items, timesteps and noise."""
        from terdit.diffusion import GaussianDiffusion

        diffusion = GaussianDiffusion.create(None, learn_sigma=model.config.learn_sigma)
        z, noise = self._model_space_batch()
        total = 0.0
        for lo in range(0, len(z), 128):
            x, e = z[lo:lo + 128].to(self.device), noise[lo:lo + 128].to(self.device)
            y, t = self.eval_y[lo:lo + 128].to(self.device), self.eval_t[lo:lo + 128].to(self.device)
            terms = diffusion.training_losses(lambda xt, tt, y=y: model(xt, tt, y, return_dict=False)[0], x, t, e)
            total += float(terms["loss"].sum())
        return total / len(z)

    def labels(self, n: int) -> list[int]:
        return [k % self.num_classes for k in range(n)]

    @torch.no_grad()
    def sample(self, model: nn.Module, cfg: float, n: int) -> torch.Tensor:
        """N samples, classes uniform; the same noise for every variant of a seed (paired comparison), other
        noise for every seed."""
        from terdit.sampling.generate import sample_latents

        labels = self.labels(n)
        parts = []
        for k, lo in enumerate(range(0, len(labels), SAMPLE_CHUNK)):
            parts.append(sample_latents(model, labels[lo:lo + SAMPLE_CHUNK], cfg_scale=cfg, steps=self.s.sample_steps,
                                        seed=NOISE_STRIDE * self.s.seed + k, device=self.device).cpu())
        return torch.cat(parts)

    def measure(self, model: nn.Module, cfg: float, grid: Path | None, n: int) -> dict[str, Any]:
        """Eval loss and, on digits, the image metrics of N samples; with N above curve_samples also the FID of
        the first curve_samples of them (`fid_curve`, comparable with the curve's smaller evaluations) and
        bootstrap intervals."""
        model.eval()
        t0 = time.perf_counter()
        images = self.sample(model, cfg, n)
        out: dict[str, Any] = {"eval_loss": self.eval_loss(model), "num_samples": len(images)}
        if grid is not None:
            self.save_grid(images, grid)
        if self.mode == "digits":
            from terdit.sampling.generate import to_uint8

            out.update(self.digits_metrics(images, intervals=n > self.s.curve_samples))
            m = self.s.curve_samples
            out["fid_curve"] = self.fid(self.extractor(to_uint8(images[:m]))["pool"])[0] if n > m else out["fid"]
        out["eval_s"] = time.perf_counter() - t0
        return out

    def digits_metrics(self, images: torch.Tensor, intervals: bool = False) -> dict[str, Any]:
        """FID/IS/P/R in digits features and class accuracy; `intervals`: also 95% bootstrap intervals over the
        samples (the generated set resampled with replacement, the reference fixed)."""
        from terdit.data.digits import class_accuracy, to_digit_levels
        from terdit.eval.metrics import inception_score, precision_recall
        from terdit.sampling.generate import to_uint8

        feats = self.extractor(to_uint8(images))
        fid, notes = self.fid(feats["pool"])
        precision, recall = precision_recall(self.ref_feats["pool"], feats["pool"])
        labels = np.asarray(self.labels(len(images)))
        per_class = [class_accuracy(images[labels == c], labels[labels == c], self.classifier)
                     for c in range(self.num_classes)]
        out = {"fid": fid, "inception_score": inception_score(feats["logits"]), "precision": precision,
               "recall": recall, "class_acc": class_accuracy(images, labels, self.classifier),
               "per_class_acc": per_class, "notes": notes}
        if intervals:
            pixels = to_digit_levels(images).reshape(len(images), -1).cpu().numpy()
            correct = self.classifier.predict(pixels) == labels
            out.update(bootstrap_intervals(feats["pool"], correct, self.fid, seed=self.s.seed))
        return out

    def fid(self, pool: np.ndarray) -> tuple[float, list[str]]:
        """FID in the digits feature space; a degenerate sample set (e.g. a collapsed PTQ model) is measured
        with a small ridge on both covariances instead of failing the whole report."""
        from terdit.eval.metrics import Statistics, compute_statistics, frechet_distance

        stats = compute_statistics(pool)
        try:
            return frechet_distance(self.ref_stats, stats), []
        except TerditError:
            ridge = 1e-4 * np.eye(len(stats.mu))
            value = frechet_distance(Statistics(self.ref_stats.mu, self.ref_stats.sigma + ridge),
                                     Statistics(stats.mu, stats.sigma + ridge))
            return value, ["FID computed with a 1e-4 ridge on the covariances (degenerate samples)"]

    def real_baseline(self, n: int) -> dict[str, Any] | None:
        """The metrics of N real digits, each class's digits in a seeded order (repeating once N/10 exceeds a
        class's ~180 images): what a perfect model would score with N samples."""
        if self.mode != "digits":
            return None
        from terdit.data.digits import load_digits_arrays

        x, y = load_digits_arrays("all")
        rng = np.random.default_rng(self.s.seed)
        shuffled = {c: rng.permutation(np.flatnonzero(y == c)) for c in range(self.num_classes)}
        seen = dict.fromkeys(shuffled, 0)
        take = []
        for c in self.labels(n):  # the generated samples' label sequence, so per-class slices line up
            take.append(shuffled[c][seen[c] % len(shuffled[c])])
            seen[c] += 1
        out = self.digits_metrics(torch.from_numpy(x[take]), intervals=n > self.s.curve_samples)
        out["num_samples"] = len(take)
        out["distinct_images"] = len(set(take))
        return out

    def fid_at_this_size(self) -> dict[str, Any] | None:
        """How FID behaves with a 1797-image reference: real digits scored at the curve's sample count, and the
        held-out split (digits neither the feature extractor nor the reference saw) against the training split's
        statistics next to as many training-split digits. The gap between the two is what sitting inside the
        reference is worth: a model scoring below the held-out value is closer to the reference set than new real
        digits are."""
        if self.mode != "digits":
            return None
        from terdit.eval import digits_uint8
        from terdit.eval.metrics import compute_statistics, frechet_distance

        train, held_out = (self.extractor(digits_uint8(split))["pool"] for split in ("train", "test"))
        ref = compute_statistics(train)
        inside = np.random.default_rng(self.s.seed).choice(len(train), size=len(held_out), replace=False)
        curve = self.real_baseline(self.s.curve_samples)
        assert curve is not None
        return {"real_fid_curve": curve["fid"], "curve_samples": self.s.curve_samples,
                "reference_train": len(train), "held_out": len(held_out),
                "fid_held_out": frechet_distance(ref, compute_statistics(held_out)),
                "fid_inside": frechet_distance(ref, compute_statistics(train[inside]))}

    def save_grid(self, images: torch.Tensor, path: Path) -> None:
        """Up to 8 samples of each of up to 10 classes, one class per row."""
        from terdit.sampling.generate import save_grid

        labels = np.asarray(self.labels(len(images)))
        classes = range(min(self.num_classes, 10))
        per = max(1, min(8, min(int((labels == c).sum()) for c in classes)))
        order = [int(i) for c in classes for i in np.flatnonzero(labels == c)[:per]]
        chosen = images[order]
        if self.data.decode is not None:
            with torch.no_grad():
                chosen = torch.cat([self.data.decode(chosen[i:i + 16].to(self.device)).cpu()
                                    for i in range(0, len(chosen), 16)])
        save_grid(chosen, path, nrow=per)


def bootstrap_intervals(pool: np.ndarray, correct: np.ndarray, fid, seed: int = 0,
                        resamples: int = BOOTSTRAP) -> dict[str, list[float]]:
    """95% percentile intervals of FID and class accuracy over resamples of the generated samples.

    They measure the sampling noise of one evaluation only (one trained model, one draw of noise); the spread
    over training seeds is measured separately, across runs. A resample repeats some samples, which FID reads as
    less diversity, so FID's interval sits above the estimate (for N real digits scored against themselves it
    does not even contain it): its width is the sampling noise, its position is not a correction."""
    rng = np.random.default_rng(10_007 + seed)
    fids, accs = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(pool), len(pool))
        fids.append(fid(pool[idx])[0])
        accs.append(float(correct[idx].mean()))
    return {"fid_ci": [float(x) for x in np.percentile(fids, [2.5, 97.5])],
            "class_acc_ci": [float(x) for x in np.percentile(accs, [2.5, 97.5])]}


def ptq_model(fp_run: Path, method: str, granularity: str, checkpoint: Path | None = None,
              device: str = "cpu") -> tuple[nn.Module, list]:
    """The full-precision run's EMA model, fake-quantized post training by `terdit.quant.ptq`."""
    from terdit.quant.ptq import quantize_model

    model = runlib.load_run_model(fp_run, ema=True, checkpoint=checkpoint, device=device)
    return model, quantize_model(model, method, granularity)
