"""ModelConfig: the network's settings as a YAML-able dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from fedsubtype.errors import ConfigError
from fedsubtype.model.variants import VARIANTS

STEMS: tuple[str, ...] = ("strided", "deep")
"""How the extractor meets the input: one stride-2 convolution, or a full-resolution one before it."""

POOLINGS: tuple[str, ...] = ("mean", "mean_std")
"""Statistics pooled per region: the weighted mean of each feature, or the mean and the standard deviation."""

REGION_MIXINGS: tuple[str, ...] = ("softmax_sum", "gated_concat")
"""How the region vectors become one: a softmax-weighted sum, or sigmoid-gated and concatenated."""

LEGACY_DEFAULTS: dict[str, object] = {"stem": "strided", "pooling": "mean", "region_mixing": "softmax_sum",
                                      "task_branches": False, "region_statistics": False,
                                      "statistics_heads": False, "peritumoral_profile": False}
"""Keys added after model configs were stored (model files, benchmark folders), with the value the network
had before them: a stored config without the key means this, whatever today's default is."""


@dataclass
class ModelConfig:
    """Settings of the spatial multi-task network (defaults: ~0.4 M parameters, CPU-friendly).

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
    physical_size: bool = False
    """Give the representation the tumour's physical size (volume in mL, field of view in mm). The crop is
    resized to S³ whatever the tumour's size, so without this the network cannot see how big it is."""
    stem: str = "strided"
    """`strided`: one stride-2 convolution first; `deep`: a full-resolution convolution before it, so
    voxel-scale texture passes a nonlinearity before the first downsampling (about 7 k more parameters)."""

    pooling: str = "mean"
    """Statistics pooled per region: `mean` of each feature, or `mean_std` (mean and standard deviation,
    so within-region heterogeneity is read directly; about 25 k more parameters at the default sizes)."""

    region_mixing: str = "softmax_sum"
    """`softmax_sum`: softmax weights over the regions and one weighted sum (regions compete; trained on
    the phantom, one region ends up with nearly all the weight); `gated_concat`: a sigmoid weight per
    region, vectors concatenated (each region keeps its features)."""

    task_branches: bool = False
    """Give each task its own attention, region weighting and representation over the shared extractor and
    fusion (as multi-task attention networks do). On the phantom the shared set collapses onto one
    direction that every head reads; separate sets loosen that only a little (docs/paper-benchmark.md)."""

    region_statistics: bool = False
    """Append the input's intensity statistics per region (mean and sd of the image, of a smoothed image
    and of the fine residual; log volume fraction: 7 numbers a region, computed without parameters) to the
    region-pooled features before the shared representation. On the phantom the trained convolutional
    features encode these worse than a linear model of the statistics reads them (docs/paper-benchmark.md)."""

    statistics_heads: bool = False
    """Give each task its own linear read-out of the region statistics (the 7 numbers a region above), added to
    its head's output: a wide-and-deep model. The read-outs start from per-task linear models fitted on the
    training cases (`region_stats.StatisticsHeads`), so the tasks do not all begin on the labels' common
    direction; works with or without `region_statistics`; not with differential privacy."""

    peritumoral_profile: bool = False
    """Add the peritumoral profile to those statistics: the image's mean in four distance bands of the
    peritumoral shell and each inner band minus the outermost (7 numbers, `region_stats.peritumoral_profile`).
    It reads enhancement and oedema that fade within millimetres of the tumour, which region means blur
    together. Used by `region_statistics` and `statistics_heads` (no effect without one of them) and only
    by variants that see peritumoral tissue."""

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
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}", f"use one of {', '.join(STEMS)}", where=f"{where}.stem")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}", f"use one of {', '.join(POOLINGS)}",
                              where=f"{where}.pooling")
        if not isinstance(self.task_branches, bool):
            raise ConfigError(f"task_branches must be true or false, got {self.task_branches!r}", "use true or false",
                              where=f"{where}.task_branches")
        if not isinstance(self.statistics_heads, bool):
            raise ConfigError(f"statistics_heads must be true or false, got {self.statistics_heads!r}",
                              "use true or false", where=f"{where}.statistics_heads")
        if not isinstance(self.peritumoral_profile, bool):
            raise ConfigError(f"peritumoral_profile must be true or false, got {self.peritumoral_profile!r}",
                              "use true or false", where=f"{where}.peritumoral_profile")
        if not isinstance(self.region_statistics, bool):
            raise ConfigError(f"region_statistics must be true or false, got {self.region_statistics!r}",
                              "use true or false", where=f"{where}.region_statistics")
        if self.region_mixing not in REGION_MIXINGS:
            raise ConfigError(f"unknown region_mixing {self.region_mixing!r}", f"use one of {', '.join(REGION_MIXINGS)}",
                              where=f"{where}.region_mixing")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "e.g. 0.2", where=f"{where}.dropout")
