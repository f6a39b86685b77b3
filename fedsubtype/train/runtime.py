"""Where and how reproducibly a run executes: the device, the seeds, and moving a batch onto the device."""

from __future__ import annotations

import random

import numpy as np
import torch

from fedsubtype.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, otherwise CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available", "use device: auto or cpu", where="training.device")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def batch_to_device(batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(model inputs, labels, present) of a batch on `device`."""
    inputs = {"image": batch["image"].to(device, non_blocking=True),
              "regions": batch["regions"].to(device, non_blocking=True)}
    return inputs, batch["labels"].to(device).float(), batch["present"].to(device).bool()


def batch_len(batch: dict) -> int:
    """Cases in a batch (0 for the empty batch Poisson sampling can draw)."""
    image = batch.get("image")
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0
