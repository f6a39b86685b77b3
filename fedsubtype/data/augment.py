"""Training augmentations that mimic scanner and acquisition differences between sites (MONAI dictionary transforms).

Spatial transforms act on ``image`` and ``regions`` with the same random draw (nearest for regions),
so the region map stays aligned. Intensity transforms act on the image only. Every draw comes from
the transform's own seeded random state: the same seed gives the same augmented batch, and
:meth:`ScannerAugmentation.reseed_for` makes it independent of DataLoader workers and order.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedsubtype.errors import ConfigError

_BIAS_OFFSET = 3.0
"""Z-scored images are shifted by this before the multiplicative bias field (MRI bias multiplies raw intensities)."""


class ScannerAugmentation:
    """Random flips, small rotation/scale, bias field, intensity scale/shift, blur and noise, seeded."""

    def __init__(self, seed: int, strength: float = 1.0) -> None:
        from monai.transforms import (Compose, RandAffined, RandBiasFieldd, RandFlipd, RandGaussianNoised,
                                      RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
                                      ShiftIntensityd)

        s = float(strength)
        keys = ["image", "regions"]
        self.seed = int(seed)
        self.strength = s
        self.transform = Compose([
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),  # left vs right breast
            RandAffined(keys=keys, prob=0.8, rotate_range=(0.26 * s,) * 3, scale_range=(0.1 * s,) * 3,
                        translate_range=(2.0 * s,) * 3, mode=("bilinear", "nearest"), padding_mode="border"),
            ShiftIntensityd(keys="image", offset=_BIAS_OFFSET),
            RandBiasFieldd(keys="image", prob=0.5, degree=3, coeff_range=(0.0, 0.1 * s)),
            ShiftIntensityd(keys="image", offset=-_BIAS_OFFSET),
            RandScaleIntensityd(keys="image", prob=0.8, factors=0.15 * s),
            RandShiftIntensityd(keys="image", prob=0.8, offsets=0.2 * s),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.25 * s, 1.0 * s), sigma_y=(0.25 * s, 1.0 * s),
                                sigma_z=(0.25 * s, 1.0 * s)),
            RandGaussianNoised(keys="image", prob=0.5, std=0.1 * s),
        ])
        self.reseed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream from `seed`."""
        self.transform.set_random_state(seed=int(seed) % (2**32))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "ScannerAugmentation":
        """MONAI-style reseed of the current stream. The base seed used by :meth:`reseed_for` is kept, so a
        DataLoader worker that calls this cannot make items depend on which worker drew them."""
        self.transform.set_random_state(seed=None if seed is None else int(seed) % (2**32), state=state)
        return self

    def reseed_for(self, epoch: int, index: int) -> None:
        """Seed from (base seed, epoch, item index): an item's augmentation no longer depends on worker or order."""
        self.reseed(int(np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)[0]))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        """Augment ``image`` ([1,S,S,S]) and ``regions`` ([S,S,S] or [1,S,S,S]); other keys pass through."""
        import torch

        image = torch.as_tensor(data["image"], dtype=torch.float32)
        regions = torch.as_tensor(data["regions"])
        squeeze = regions.ndim == image.ndim - 1
        out = self.transform({"image": image.clone(),
                              "regions": (regions[None] if squeeze else regions).to(torch.float32)})
        new_regions = torch.round(torch.as_tensor(out["regions"]).as_subclass(torch.Tensor)).to(regions.dtype)
        return {**data,
                "image": torch.as_tensor(out["image"]).as_subclass(torch.Tensor).to(torch.float32).contiguous(),
                "regions": (new_regions[0] if squeeze else new_regions).contiguous()}


def build_augmentation(seed: int, *, strength: float = 1.0) -> Callable[[dict], dict]:
    """Scanner-difference augmentation on keys image/regions; `strength` scales every magnitude (0 = off)."""
    if not (0.0 <= float(strength) <= 3.0):
        raise ConfigError(f"augmentation strength {strength!r} is out of range", "use a value in [0, 3] (1 = default)")
    return ScannerAugmentation(seed, strength)
