"""A torch Dataset over preprocessed, cached cases: image, region map, labels and a label-present mask."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsubtype import TASKS
from fedsubtype.data.cache import PreprocessCache
from fedsubtype.data.manifest import Case


class CaseDataset(Dataset):
    """Items ``{"image": float32 [1,S,S,S], "regions": int64 [S,S,S], "voxel_mm": float32 [],
    "labels": float32 [4], "present": bool [4], "case_id": str, "site": str}`` in TASKS order (Ki-67 in percent, 0 where missing).

    torch's default_collate batches them (strings become lists). An augmentation with ``reseed_for``
    (see :mod:`fedsubtype.data.augment`) is reseeded per (epoch, index), so results do not depend on the
    number of DataLoader workers; call :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(self, cases: Sequence[Case], cache: PreprocessCache, *,
                 augment: Callable[[dict], dict] | None = None) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch."""
        self.epoch = int(epoch)

    def label_matrix(self) -> np.ndarray:
        """(N, 4) float labels in TASKS order with NaN for missing; reads no image."""
        if not self.cases:
            return np.zeros((0, len(TASKS)), dtype=np.float32)
        return np.stack([c.label_vector() for c in self.cases])

    def sites(self) -> list[str]:
        """Site of every case, in order."""
        return [c.site for c in self.cases]

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        pre = self.cache.get(case)
        labels = case.label_vector()
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(pre.image, dtype=np.float32))[None],
            "regions": torch.from_numpy(pre.regions.astype(np.int64)),
            "voxel_mm": torch.tensor(pre.voxel_mm, dtype=torch.float32),
            "labels": torch.from_numpy(np.nan_to_num(labels, nan=0.0).astype(np.float32)),
            "present": torch.from_numpy(case.present_vector()),
            "case_id": case.case_id,
            "site": case.site,
        }
        if self.augment is not None:
            reseed_for = getattr(self.augment, "reseed_for", None)
            if callable(reseed_for):
                reseed_for(self.epoch, index)
            item = self.augment(item)
        return item
