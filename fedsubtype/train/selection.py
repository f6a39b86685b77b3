"""Model selection and early stopping: which epoch's weights a run keeps, judged on validation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.evaluate.metrics import finite_or_none


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
    """Higher validation mean AUC wins; when AUC is undefined, lower validation loss."""
    if best is None:
        return True
    auc, best_auc = row.get("val_mean_auc"), best.get("val_mean_auc")
    if auc is not None and best_auc is not None:
        return auc > best_auc
    if auc is not None and best_auc is None:
        return True
    if auc is None and best_auc is not None:
        return False
    loss, best_loss = row.get("val_loss"), best.get("val_loss")
    return loss is not None and (best_loss is None or loss < best_loss)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state_dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Selector:
    """Keeps the best weights seen at validation and counts stale validations (for early stopping)."""

    def __init__(self, model: nn.Module, has_val: bool) -> None:
        self.model, self.has_val = model, has_val
        self.best_row: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self.stale = 0

    def observe(self, row: dict[str, Any], evaluated: bool) -> bool:
        """Record an epoch's row; True when it is the new best."""
        if not self.has_val:  # no validation: the latest weights are the result
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
