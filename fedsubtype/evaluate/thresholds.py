"""Decision thresholds per classification task: chosen on validation predictions, or the fixed 0.5."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.evaluate.predictions import Predictions


def fixed_thresholds(method: str = "fixed") -> dict[str, dict[str, Any]]:
    """0.5 for every classification task, recorded with `method` (the reason)."""
    return {t: {"value": 0.5, "method": method} for t in CLASSIFICATION_TASKS}


def choose_thresholds(preds: Predictions, method: str = "youden") -> dict[str, dict[str, Any]]:
    """Per-task decision thresholds: Youden's J on these (validation) predictions, or fixed 0.5.

    Falls back to 0.5 (and says so) for a task whose labels are missing or of one class only.
    """
    from sklearn.metrics import roc_curve

    if method != "youden":
        return fixed_thresholds()
    out: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(CLASSIFICATION_TASKS):
        y = preds.labels[:, j]
        keep = ~np.isnan(y)
        if keep.sum() == 0 or len(np.unique(y[keep])) < 2:
            out[task] = {"value": 0.5, "method": "fixed (validation labels of one class or missing)"}
            continue
        fpr, tpr, thr = roc_curve(y[keep], preds.probs[keep, j])
        finite = np.isfinite(thr)
        best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
        out[task] = {"value": float(np.clip(thr[best], 0.0, 1.0)), "method": "youden", "n": int(keep.sum())}
    return out


def threshold_values(meta: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{task: value} of a thresholds record (what scoring and the prediction calls take)."""
    return {t: v["value"] for t, v in meta.items()}
