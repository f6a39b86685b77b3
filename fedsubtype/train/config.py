"""The `training:` section of a run config: how one training run (or one federated local round) is done."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fedsubtype import TASKS
from fedsubtype.errors import ConfigError

DEFAULT_TASK_WEIGHTS: dict[str, float] = {t: 1.0 for t in TASKS}


@dataclass
class TrainConfig:
    """How one training run (or one federated local round) is done; the `training:` section of a run config."""

    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int | None = 8
    augment: bool = True
    augment_strength: float = 0.5
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    ki67_loss: Literal["mse", "huber"] = "mse"
    class_weighting: bool = False
    progress: bool = True
    eval_every: int = 1
    ema_decay: float | None = 0.995  # exponential moving average of the weights, per step; None = off

    def validate(self, where: str = "training") -> None:
        """Reject impossible values with one line naming the key."""
        def bad(key: str, what: str, fix: str) -> ConfigError:
            return ConfigError(what, fix, where=f"{where}.{key}")

        if self.epochs < 1:
            raise bad("epochs", f"must be at least 1, got {self.epochs}", "set a positive number of epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be at least 1, got {self.max_steps}", "set a positive number or remove it")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be at least 1, got {self.batch_size}", "use e.g. 8")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"must be a positive number, got {self.lr}", "use e.g. 0.001")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}", "use e.g. 0.0001")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}", "use e.g. 0.05")
        if self.patience is not None and self.patience < 1:
            raise bad("patience", f"must be at least 1, got {self.patience}", "set a positive number or null to disable")
        if self.augment_strength < 0:
            raise bad("augment_strength", f"must be >= 0, got {self.augment_strength}", "use 1.0 for the default")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}", "use 0 to load in the main process")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", f"must be at least 1, got {self.threads}", "set a positive number or null")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise bad("device", f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        if self.eval_every < 1:
            raise bad("eval_every", f"must be at least 1, got {self.eval_every}", "use 1 to validate every epoch")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise bad("ema_decay", f"must be in (0, 1), got {self.ema_decay}", "use e.g. 0.995, or null to disable")
        unknown = [k for k in self.task_weights if k not in TASKS]
        if unknown:
            raise bad("task_weights", f"unknown task '{unknown[0]}'", f"use keys among {', '.join(TASKS)}")
        for k, w in self.task_weights.items():
            if w < 0 or not math.isfinite(w):
                raise bad(f"task_weights.{k}", f"must be a finite number >= 0, got {w}", "use e.g. 1.0")
        if not any(self.task_weights.get(t, 1.0) > 0 for t in TASKS):
            raise bad("task_weights", "every task weight is 0", "give at least one task a positive weight")
