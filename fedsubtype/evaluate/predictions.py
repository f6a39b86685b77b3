"""Per-case model outputs: the Predictions table, its CSV form, and batched inference over a dataset."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.train.runtime import batch_to_device, resolve_device


@dataclass
class Predictions:
    """Per-case outputs of a model on a dataset; labels NaN where missing, Ki-67 in percent."""

    case_ids: list[str]
    sites: list[str]
    probs: np.ndarray
    ki67: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.case_ids)

    def subset(self, idx: Sequence[int] | np.ndarray, sites: list[str] | None = None) -> Predictions:
        """The cases at `idx`, in that order (with `sites` replacing their site names when given)."""
        idx = np.asarray(idx, dtype=int)
        return Predictions([self.case_ids[i] for i in idx], sites if sites is not None else [self.sites[i] for i in idx],
                           self.probs[idx], self.ki67[idx], self.labels[idx])

    def to_csv(self, path: str | Path, thresholds: dict[str, float] | None = None) -> None:
        """Write one row per case (atomic): probabilities, Ki-67 prediction, calls at `thresholds`, true labels."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = ["case_id", "site", *[f"{t}_prob" for t in CLASSIFICATION_TASKS], "ki67_pred"]
        if thresholds:
            head += [f"{t}_call" for t in CLASSIFICATION_TASKS]
        head += [f"{t}_true" for t in TASKS]
        w.writerow(head)
        for i, cid in enumerate(self.case_ids):
            row: list[Any] = [cid, self.sites[i], *[f"{p:.6f}" for p in self.probs[i]], f"{self.ki67[i]:.3f}"]
            if thresholds:
                row += [int(self.probs[i, j] >= thresholds.get(t, 0.5)) for j, t in enumerate(CLASSIFICATION_TASKS)]
            row += ["" if np.isnan(v) else (f"{v:g}") for v in self.labels[i]]
            w.writerow(row)
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def read_csv(cls, path: str | Path) -> Predictions:
        """Read back what `to_csv` wrote (calls, when present, are ignored)."""
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))

        def num(v: str) -> float:
            return float(v) if v not in ("", None) else np.nan

        return cls(
            case_ids=[r["case_id"] for r in rows], sites=[r.get("site", "") for r in rows],
            probs=np.array([[num(r[f"{t}_prob"]) for t in CLASSIFICATION_TASKS] for r in rows], dtype=float).reshape(-1, 3),
            ki67=np.array([num(r["ki67_pred"]) for r in rows], dtype=float),
            labels=np.array([[num(r[f"{t}_true"]) for t in TASKS] for r in rows], dtype=float).reshape(-1, 4),
        )


class _Collector:
    """Accumulates batch outputs (and, with a loss, the case-weighted mean loss) into Predictions."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.sites: list[str] = []
        self.probs: list[np.ndarray] = []
        self.ki67: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.loss_sum, self.loss_n = 0.0, 0

    def add(self, batch: dict, out: dict, lab: torch.Tensor, present: torch.Tensor) -> None:
        self.probs.append(torch.sigmoid(out["logits"]).float().cpu().numpy())
        self.ki67.append((out["ki67"].float().cpu().numpy().reshape(-1)) * 100.0)
        self.labels.append(np.where(present.cpu().numpy(), lab.cpu().numpy(), np.nan))
        self.ids += [str(c) for c in batch["case_id"]]
        self.sites += [str(s) for s in batch["site"]]

    def result(self) -> tuple[Predictions, float | None]:
        preds = Predictions(
            case_ids=self.ids, sites=self.sites,
            probs=np.concatenate(self.probs).astype(np.float64) if self.probs else np.zeros((0, 3)),
            ki67=np.concatenate(self.ki67).astype(np.float64) if self.ki67 else np.zeros(0),
            labels=np.concatenate(self.labels).astype(np.float64) if self.labels else np.zeros((0, 4)),
        )
        return preds, (self.loss_sum / self.loss_n if self.loss_n else None)


def run_predictions(model: nn.Module, data: Dataset, batch_size: int, device: torch.device,
                    loss_fn: Callable | None = None) -> tuple[Predictions, float | None]:
    """Predictions of `model` on `data` in order (eval mode, no gradients; the training mode is restored),
    and the mean `loss_fn` over the cases when one is given."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    acc = _Collector()
    with torch.no_grad():
        for batch in loader:
            inputs, lab, present = batch_to_device(batch, device)
            out = model(**inputs)
            if loss_fn is not None:
                loss, _ = loss_fn(out, lab, present)
                acc.loss_sum += float(loss) * lab.shape[0]
                acc.loss_n += lab.shape[0]
            acc.add(batch, out, lab, present)
    model.train(was_training)
    return acc.result()


def predict_dataset(model: nn.Module, data: Dataset, *, batch_size: int = 16, device: str = "auto") -> Predictions:
    """Run the model over a dataset in order (eval mode, no gradients); the model is moved to `device`."""
    dev = resolve_device(device)
    model.to(dev)
    preds, _ = run_predictions(model, data, batch_size, dev)
    return preds
