"""Metrics of a model's predictions (the docs/metrics.md keys), from existing predictions or a dataset."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.evaluate.predictions import Predictions, predict_dataset


def score_predictions(preds: Predictions, *, n_boot: int = 1000, seed: int = 0,
                      thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Metrics of existing predictions, with bootstrap intervals and calls at `thresholds` (0.5 by default)."""
    from fedsubtype.evaluate.metrics import compute_metrics

    cut = tuple(float((thresholds or {}).get(t, 0.5)) for t in CLASSIFICATION_TASKS)
    return compute_metrics(preds.labels, preds.probs, preds.ki67, n_boot=n_boot, seed=seed, thresholds=cut)


def evaluate_dataset(model: nn.Module, data: Dataset, n_boot: int = 1000, seed: int = 0, *,
                     thresholds: dict[str, float] | None = None, batch_size: int = 16,
                     device: str = "auto") -> dict[str, Any]:
    """Predict and score with :func:`fedsubtype.evaluate.metrics.compute_metrics`."""
    preds = predict_dataset(model, data, batch_size=batch_size, device=device)
    return score_predictions(preds, n_boot=n_boot, seed=seed, thresholds=thresholds)
