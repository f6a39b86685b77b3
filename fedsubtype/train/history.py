"""The per-epoch record of a run: loss means, the metrics_per_epoch.csv table and the one-line progress report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsubtype import TASKS


class LossMeter:
    """Epoch means of the loss and of each task's term, each task weighted by how many cases had its label."""

    def __init__(self) -> None:
        self.total = 0.0
        self.batches = 0
        self.task_sum = {t: 0.0 for t in TASKS}
        self.task_n = {t: 0 for t in TASKS}

    def add(self, loss: float, parts: dict[str, Any]) -> None:
        self.total += loss
        self.batches += 1
        for t in TASKS:
            n = int(parts.get(f"n_{t}", 0))
            if n:
                self.task_sum[t] += float(parts[t]) * n
                self.task_n[t] += n

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train_loss": self.total / self.batches if self.batches else None}
        for t in TASKS:
            out[f"train_loss_{t}"] = self.task_sum[t] / self.task_n[t] if self.task_n[t] else None
        return out


def write_history_csv(history: list[dict[str, Any]], path: str | Path) -> None:
    """Per-epoch metrics table (atomic); columns are the union of the rows' keys in first-seen order."""
    from fedsubtype.configio import write_rows_csv

    write_rows_csv(path, history)


def epoch_line(row: dict[str, Any]) -> str:
    """One progress line for an epoch's history row."""
    parts = [f"epoch {row['epoch']}", f"steps {row['steps']}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    if row.get("val_loss") is not None:
        parts.append(f"val loss {row['val_loss']:.4f}")
    if row.get("val_mean_auc") is not None:
        parts.append(f"val mean AUC {row['val_mean_auc']:.3f}")
    if row.get("val_ki67_mae") is not None:
        parts.append(f"val Ki-67 MAE {row['val_ki67_mae']:.1f}")
    if row.get("best"):
        parts.append("(best)")
    return " | ".join(parts)
