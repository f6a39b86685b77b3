"""ModelConfig: the network's settings as a YAML-able dataclass, validated once; the allowed values of each
option live here, and the CLI and the migration of stored settings read them from here."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from fedsubtype.errors import ConfigError
from fedsubtype.model.variants import VARIANTS

ReadOut = Literal["none", "statistics", "linear_heads", "linear_heads_profile"]
"""How the network reads the parameter-free intensity statistics of its input (see READ_OUT_PARTS)."""
READ_OUTS: tuple[str, ...] = typing.get_args(ReadOut)
"""The values of `read_out`, in order: each one adds to the one before it."""


@dataclass(frozen=True)
class ReadOutParts:
    """What one value of `read_out` switches on."""

    statistics: bool
    """The region statistics (7 a region) join the region-pooled features before the shared representation."""
    linear_heads: bool
    """Each task adds its own linear map of the statistics to its logit (wide and deep), started from a
    per-task linear model of the training cases."""
    profile: bool
    """The statistics also include the peritumoral profile (variants that see peritumoral tissue)."""


READ_OUT_PARTS: dict[str, ReadOutParts] = {
    "none": ReadOutParts(statistics=False, linear_heads=False, profile=False),
    "statistics": ReadOutParts(statistics=True, linear_heads=False, profile=False),
    "linear_heads": ReadOutParts(statistics=True, linear_heads=True, profile=False),
    "linear_heads_profile": ReadOutParts(statistics=True, linear_heads=True, profile=True),
}
assert tuple(READ_OUT_PARTS) == READ_OUTS


@dataclass
class ModelConfig:
    """Settings of the spatial multi-task network (defaults: ~0.3 M parameters, CPU-friendly).

    The input edge S must be a multiple of 8 (the extractor downsamples three times).
    """

    variant: str = "full"
    """One of VARIANTS: the full model or an ablation row."""
    in_channels: int = 1
    """Image channels (one post-contrast phase)."""
    width: int = 16
    """Channels of the first stage; stages 2 and 3 use 2x and 4x."""
    blocks: tuple[int, int, int] = (1, 1, 1)
    """Residual blocks per stage."""
    groups: int = 8
    """GroupNorm groups (at most; the largest divisor of each layer's channels not above this)."""
    feature_dim: int = 64
    """Channels of the fused multi-scale feature map that is pooled per region."""
    hidden_dim: int = 64
    """Size of the shared representation feeding the task branches."""
    dropout: float = 0.2
    """Dropout before the task branches."""
    region_channels: bool = True
    """Give the network the used region masks as extra input channels (shape cues)."""
    mask_input: bool = True
    """Zero the image outside the regions a variant uses, so ablated tissue is truly unseen."""
    read_out: ReadOut = "linear_heads_profile"
    """How the network reads the input's intensity statistics per region (mean and sd of the image, of a
    smoothed image and of the fine residual; log volume fraction: 7 parameter-free numbers a region):

    - `none`: it does not; the convolutional path alone.
    - `statistics`: they join the region-pooled features before the shared representation. On the phantom
      the trained convolutional features encode them worse than a linear model of them reads them.
    - `linear_heads`: that, and each task adds its own linear read-out of them to its head's output (a
      wide-and-deep model), started from per-task linear models fitted on the training cases
      (`region_stats.StatisticsHeads`), so the tasks do not all begin on the labels' common direction.
      Not with differential privacy, which would not cover that fit.
    - `linear_heads_profile`: that, with the peritumoral profile among the statistics (the image's mean in
      four distance bands of the peritumoral shell and each inner band minus the outermost: 7 numbers,
      `region_stats.peritumoral_profile`) for variants that see peritumoral tissue. The best configuration
      measured (docs/paper-benchmark.md)."""

    @property
    def read_out_parts(self) -> ReadOutParts:
        """What `read_out` switches on."""
        return READ_OUT_PARTS[self.read_out]

    def validate(self, where: str = "model") -> None:
        """Raise ConfigError (one line naming the key) for an impossible setting."""
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}", f"use one of {', '.join(VARIANTS)}",
                              where=f"{where}.variant")
        for key in ("in_channels", "width", "groups", "feature_dim", "hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}", "use a positive number",
                                  where=f"{where}.{key}")
        if len(self.blocks) != 3 or any(b < 1 for b in self.blocks):
            raise ConfigError(f"blocks must be three positive numbers, got {list(self.blocks)}", "e.g. [1, 1, 1]",
                              where=f"{where}.blocks")
        if self.read_out not in READ_OUTS:
            raise ConfigError(f"unknown read_out {self.read_out!r}", f"use one of {', '.join(READ_OUTS)}",
                              where=f"{where}.read_out")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "e.g. 0.2", where=f"{where}.dropout")
