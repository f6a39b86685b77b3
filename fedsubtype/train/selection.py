"""Model selection and early stopping: which epoch's weights a run keeps, judged on validation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.evaluate.metrics import finite_or_none


MIN_SELECTION_CASES = 20
"""Validation splits smaller than this are too small to choose an epoch on: the run keeps its last weights."""


def too_few_to_select(n_val: int) -> str | None:
    """The one-line warning for a validation split that is too small to select on (None when it is not)."""
    if 0 < n_val < MIN_SELECTION_CASES:
        return (f"warning: the validation split has {n_val} cases, too few to choose an epoch on (fewer than "
                f"{MIN_SELECTION_CASES}); the run keeps its last weights, and validation only reports and sets "
                "thresholds: give validation more cases to select on")
    return None


def val_summary(metrics: dict[str, Any], loss: float | None) -> dict[str, Any]:
    """The validation columns of a history row: loss, mean and per-task AUC, Ki-67 MAE (None when undefined)."""
    row: dict[str, Any] = {"val_loss": loss}
    mean_auc = metrics.get("mean_auc")
    row["val_mean_auc"] = finite_or_none(mean_auc)
    for t in CLASSIFICATION_TASKS:
        row[f"val_{t}_auc"] = finite_or_none((metrics.get(t) or {}).get("auc"))
    row["val_ki67_mae"] = finite_or_none((metrics.get("ki67") or {}).get("mae"))
    return row



def is_better(row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Lower validation loss wins; when no loss is defined, higher validation mean AUC.

    The loss sums every task over every validation case and moves smoothly between epochs; the mean AUC of
    a few dozen cases jumps by chance and picked early, worse epochs (docs/training.md, "Defaults and how they
    were chosen")."""
    if best is None:
        return True
    loss, best_loss = row.get("val_loss"), best.get("val_loss")
    if loss is not None and best_loss is not None:
        return loss < best_loss
    if loss is not None and best_loss is None:
        return True
    if loss is None and best_loss is not None:
        return False
    auc, best_auc = row.get("val_mean_auc"), best.get("val_mean_auc")
    return auc is not None and (best_auc is None or auc > best_auc)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state_dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Selector:
    """Keeps the best weights seen at validation and counts stale validations (for early stopping)."""

    def __init__(self, model: nn.Module, selects: bool) -> None:
        self.model, self.selects = model, selects
        self.best_row: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self.stale = 0

    def observe(self, row: dict[str, Any], evaluated: bool) -> bool:
        """Record an epoch's row; True when it is the new best."""
        if not self.selects:  # no validation (or too little to select on): the latest weights are the result
            self.best_epoch = row["epoch"]
            return False
        if not evaluated:
            return False
        if is_better(row, self.best_row):
            self.best_row, self.best_epoch, self.best_state, self.stale = dict(row), row["epoch"], snapshot(self.model), 0
            return True
        self.stale += 1
        return False


def save_state(state: dict[str, torch.Tensor] | None, path: Path, epoch: int) -> None:
    """`best_weights.pt` (epoch + state_dict), atomically; nothing when there is no state yet."""
    if state is None:
        return
    from fedsubtype.configio import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"epoch": epoch, "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())
