"""What one optimizer step is made of: the joint loss, the learning-rate schedule, the FedProx term, the EMA copy."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedsubtype import TASKS
from fedsubtype.train.config import TrainConfig


def build_loss(cfg: TrainConfig, train_labels: np.ndarray, per_case: bool = False) -> Callable:
    """The joint loss with the configured task weights and, optionally, the training split's class weights."""
    from fedsubtype.model.loss import JointLoss, pos_weight_from_labels

    weights = tuple(float(cfg.task_weights.get(t, 1.0)) for t in TASKS)
    pos_weight = pos_weight_from_labels(train_labels) if cfg.class_weighting else None
    return JointLoss(task_weights=weights, ki67_loss=cfg.ki67_loss, pos_weight=pos_weight, per_case=per_case)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to 0 (or constant), evaluated per optimizer step."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                   global_params: Sequence[torch.Tensor] | None, mu: float) -> None:
    """One optimizer step with the FedProx gradient mu·(w − w_global) added to the (possibly private) gradient.

    The proximal term does not touch data, so under DP it is added after Opacus clipped and noised the
    data gradient (its ``pre_step``), which costs no privacy and is not clipped away.
    """
    private = hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer")
    if private and not optimizer.pre_step():  # type: ignore[attr-defined]
        return
    if mu > 0 and global_params is not None:
        with torch.no_grad():
            for p, g in zip(params, global_params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p.detach() - g, alpha=mu)
    if private:
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
    else:
        optimizer.step()


def proximal_term(params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float) -> float:
    """(mu/2)·||w − w_global||², the FedProx penalty (reported in the history)."""
    with torch.no_grad():
        return float(0.5 * mu * sum(((p - g) ** 2).sum() for p, g in zip(params, global_params)))


def anchor_params(params: list[torch.Tensor], given: list[torch.Tensor] | None,
                  device: torch.device) -> list[torch.Tensor]:
    """The FedProx anchor w_global: the given global weights on `device`, else a copy of the weights at entry."""
    if given is None:
        return [p.detach().clone() for p in params]
    if len(given) != len(params):
        raise ValueError(f"global_params has {len(given)} tensors, the model {len(params)} trainable parameters")
    return [g.detach().to(device, dtype=p.dtype) for g, p in zip(given, params)]


def averaged_copy(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of `model`'s weights (parameters and buffers), updated after every step.

    Averaging the weights of the last few hundred steps smooths the epoch-to-epoch noise of a small
    dataset; on differentially private training it is post-processing and costs no privacy.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
