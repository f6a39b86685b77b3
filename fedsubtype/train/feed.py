"""The training data as the loop reads it: seeded augmentation, loader worker seeding, the label matrix."""

from __future__ import annotations

import copy
import random
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsubtype import TASKS
from fedsubtype.train.config import TrainConfig


def worker_init(worker_id: int) -> None:
    """Seed a loader worker's Python, NumPy and augmentation streams from its torch seed."""
    base = torch.initial_seed() % (2**32)
    random.seed(base)
    np.random.seed(base)
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "augment", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=base)


class _Augmented(Dataset):
    """A view of a dataset whose items pass through an augmentation transform (for datasets without `augment`)."""

    def __init__(self, base: Dataset, augment: Callable[[dict], dict]) -> None:
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return self.augment(dict(self.base[i]))


def with_augmentation(data: Dataset, cfg: TrainConfig) -> Dataset:
    """The training data with seeded MONAI augmentations (unless disabled); a transform the caller set is kept, reseeded."""
    existing = getattr(data, "augment", None)
    if existing is not None:  # the caller's own transform: reseed it so the run stays reproducible
        if hasattr(existing, "set_random_state"):
            existing.set_random_state(seed=cfg.seed)
        return data
    if not cfg.augment or cfg.augment_strength == 0:
        return data
    from fedsubtype.data.augment import build_augmentation

    transform = build_augmentation(cfg.seed, strength=cfg.augment_strength)
    if hasattr(data, "augment"):
        view = copy.copy(data)
        view.augment = transform  # type: ignore[attr-defined]
        return view
    return _Augmented(data, transform)


def label_matrix(data: Dataset) -> np.ndarray:
    """[N, 4] labels of a dataset in TASKS order, NaN where missing (read without images when it can)."""
    if hasattr(data, "label_matrix"):
        return np.asarray(data.label_matrix(), dtype=np.float64)  # type: ignore[attr-defined]
    rows = []
    for i in range(len(data)):  # type: ignore[arg-type]
        item = data[i]
        lab = np.asarray(item["labels"], dtype=np.float64)
        rows.append(np.where(np.asarray(item["present"]), lab, np.nan))
    return np.stack(rows) if rows else np.zeros((0, len(TASKS)))
