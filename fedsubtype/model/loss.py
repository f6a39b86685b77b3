"""Joint multi-task loss: BCE for ER/PR/HER2 + weighted MSE (or Huber) for Ki-67, missing labels masked.

Normalisation: each task's term is the mean of its per-case losses over the cases whose label is
present in the batch; the total is the task-weighted sum of those means over tasks with at least
one present label. A missing label removes only that task's term for that case; a batch with no
label at all gives a zero loss that still has a graph (backward gives zero gradients, no NaN).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedsubtype import CLASSIFICATION_TASKS, TASKS

KI67_SCALE = 100.0
"""Ki-67 labels are percent; the model predicts a fraction (label / KI67_SCALE)."""


class JointLoss:
    """Callable loss for the model's output dict; returns (loss tensor, per-task floats for logging)."""

    def __init__(self, task_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 ki67_loss: Literal["mse", "huber"] = "mse", pos_weight: Sequence[float] | None = None,
                 huber_delta: float = 0.1, per_case: bool = False) -> None:
        if len(task_weights) != len(TASKS) or any(w < 0 for w in task_weights):
            raise ValueError(f"task_weights must be {len(TASKS)} non-negative numbers (er, pr, her2, ki67), "
                             f"got {list(task_weights)}")
        if ki67_loss not in ("mse", "huber"):
            raise ValueError(f"ki67_loss must be 'mse' or 'huber', got {ki67_loss!r}")
        if pos_weight is not None and (len(pos_weight) != 3 or any(w <= 0 for w in pos_weight)):
            raise ValueError(f"pos_weight must be 3 positive numbers (er, pr, her2), got {list(pos_weight)}")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be positive, got {huber_delta}")
        self.task_weights = tuple(float(w) for w in task_weights)
        self.ki67_loss = ki67_loss
        self.pos_weight = None if pos_weight is None else tuple(float(w) for w in pos_weight)
        self.huber_delta = float(huber_delta)
        # DP-SGD (privacy): the total must be a mean over cases of per-case losses, so that one case's
        # clipped gradient does not depend on which other cases carry a label; per_case divides each
        # task's sum by the batch size instead of by its number of present labels.
        self.per_case = bool(per_case)

    def __call__(self, outputs: dict, labels: torch.Tensor, present: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """`labels` [B,4] (Ki-67 in percent, anything where missing), `present` bool [B,4].

        The log dict has each task's mean loss (0.0 when no case had the label) and `n_<task>`,
        the number of cases that contributed; weight by `n_<task>` when averaging over batches.
        """
        logits, ki67 = outputs["logits"], outputs["ki67"]
        present = present.to(torch.bool)
        labels = torch.where(present, labels.to(logits.dtype), torch.zeros_like(labels, dtype=logits.dtype))
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, dtype=logits.dtype,
                                                                       device=logits.device)
        per_case = [F.binary_cross_entropy_with_logits(logits, labels[:, :3], pos_weight=pos_weight,
                                                       reduction="none")]
        target = labels[:, 3] / KI67_SCALE
        if self.ki67_loss == "mse":
            ki_loss = (ki67 - target) ** 2
        else:
            ki_loss = F.huber_loss(ki67, target, delta=self.huber_delta, reduction="none")
        per_case = torch.cat(per_case + [ki_loss.unsqueeze(1)], dim=1)  # [B,4]
        masked = torch.where(present, per_case, torch.zeros_like(per_case))
        counts = present.sum(0)
        means = masked.sum(0) / counts.clamp_min(1).to(masked.dtype)
        weights = torch.tensor(self.task_weights, dtype=masked.dtype, device=masked.device)
        if self.per_case:  # privacy: mean over cases of Σ_t w_t·ℓ_it (see __init__)
            total = (masked * weights).sum() / max(1, masked.shape[0])
        else:
            total = (weights * means).sum()  # the where() keeps a graph even when nothing is present
        log = {"loss": float(total.detach())}
        for i, task in enumerate(TASKS):
            log[task] = float(means[i].detach())
            log[f"n_{task}"] = int(counts[i])
        return total, log


def pos_weight_from_labels(labels: np.ndarray, max_weight: float = 10.0) -> list[float]:
    """BCE `pos_weight` per classification task = negatives / positives among present labels
    (NaN = missing), clipped to [1/max_weight, max_weight]; 1.0 where a class is absent."""
    labels = np.asarray(labels, dtype=float)
    if labels.ndim != 2 or labels.shape[1] < len(CLASSIFICATION_TASKS):
        raise ValueError(f"labels must be an (N, >=3) array (er, pr, her2[, ki67]), got shape {labels.shape}")
    weights = []
    for j in range(len(CLASSIFICATION_TASKS)):
        col = labels[:, j][~np.isnan(labels[:, j])]
        pos, neg = float((col == 1).sum()), float((col == 0).sum())
        w = neg / pos if pos > 0 and neg > 0 else 1.0
        weights.append(float(np.clip(w, 1.0 / max_weight, max_weight)))
    return weights
