"""Evaluation metrics that do not leak labels: a metric leaves the site only when computed over enough cases.

A per-task AUC over a handful of validation cases (or a NaN AUC, which says the split has one class), or a
Ki-67 MAE the coordinator can probe with constant predictions, reveals individual labels. A task's AUC is
released only with at least N cases of each class, the Ki-67 MAE only over at least N cases, the mean AUC
only when every task's AUC is released (otherwise it would give away the withheld one); the reply says how
many were withheld (`metrics-omitted`, a number) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.evaluate.metrics import finite_or_none

OMITTED_KEY = "metrics-omitted"
"""Number of gated evaluation metrics a reply leaves out (too few cases)."""
GATED_KEYS: tuple[str, ...] = ("mean-auc", *(f"{t}-auc" for t in CLASSIFICATION_TASKS), "ki67-mae")



def releasable_eval_metrics(scores: Mapping[str, Any], n_cases: int, min_cases: int) -> dict[str, float]:
    """The evaluation reply from `compute_metrics` scores: num-examples, metrics over ≥ `min_cases`, omitted count."""
    out: dict[str, float] = {"num-examples": float(n_cases)}
    aucs = []
    for task in CLASSIFICATION_TASKS:
        block = scores.get(task) or {}
        n, pos, auc = int(block.get("n") or 0), int(block.get("n_pos") or 0), finite_or_none(block.get("auc"))
        if auc is not None and pos >= min_cases and n - pos >= min_cases:
            out[f"{task}-auc"] = auc
            aucs.append(auc)
    if len(aucs) == len(CLASSIFICATION_TASKS):
        out["mean-auc"] = sum(aucs) / len(aucs)
    ki67 = scores.get("ki67") or {}
    mae = finite_or_none(ki67.get("mae"))
    if mae is not None and int(ki67.get("n") or 0) >= min_cases:
        out["ki67-mae"] = mae
    out[OMITTED_KEY] = float(sum(1 for k in GATED_KEYS if k not in out))
    return out
