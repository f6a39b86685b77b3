"""Region-of-interest weighting: attention-weighted pooling over core, rim and peritumoral tissue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsubtype import REGION_LABELS
from fedsubtype.model.variants import ALL_REGIONS


def region_masks(regions: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Binary masks [B,R,S,S,S] (float) of the named regions from a label map [B,S,S,S]."""
    return torch.stack([(regions == REGION_LABELS[n]) for n in names], dim=1).to(torch.float32)


def region_fractions(masks: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Fraction of each feature voxel covered by each region (soft downsampling keeps thin shells)."""
    return F.adaptive_avg_pool3d(masks, size)


def weighted_moments(feats: torch.Tensor, weights: torch.Tensor, std: bool) -> torch.Tensor:
    """Per-region weighted mean of feats [B,C,s,s,s] under weights [B,R,s,s,s] -> [B,R,C]; with `std`,
    the weighted standard deviation is appended -> [B,R,2C] (how varied a feature is inside a region:
    heterogeneity, which a mean cannot express)."""
    mass = weights.flatten(2).sum(-1).clamp_min(1e-6).unsqueeze(-1)  # [B,R,1]
    mean = torch.einsum("bcxyz,brxyz->brc", feats, weights) / mass
    if not std:
        return mean
    second = torch.einsum("bcxyz,brxyz->brc", feats * feats, weights) / mass
    return torch.cat([mean, torch.sqrt((second - mean * mean).clamp_min(0.0) + 1e-6)], dim=-1)


class RegionWeighting(nn.Module):
    """Pools features per region (weighted mean, weights = attention x region fraction), then weighs the
    regions with input-dependent softmax weights from a small gate and sums them; absent regions get weight 0.
    """

    def __init__(self, dim: int, regions: tuple[str, ...]) -> None:
        super().__init__()
        self.regions = tuple(regions)
        self.index = [ALL_REGIONS.index(r) for r in self.regions]
        self.proj = nn.ModuleDict({r: nn.Linear(dim, dim) for r in self.regions})
        self.gate = nn.Sequential(nn.Linear(len(self.regions) * dim, dim), nn.SiLU(), nn.Linear(dim, len(self.regions)))
        self.act = nn.SiLU()

    def forward(self, feats: torch.Tensor, fractions: torch.Tensor, attention: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B,C,s,s,s], fractions [B,R,s,s,s] (regions of this module), attention [B,1,s,s,s] or None.
        Returns the region-weighted vector [B,C] and the weights [B,3] over ALL_REGIONS (summing to 1)."""
        weights = fractions if attention is None else fractions * attention
        pooled = weighted_moments(feats, weights, std=False)
        projected = torch.stack([self.act(self.proj[r](pooled[:, i])) for i, r in enumerate(self.regions)], dim=1)
        present = fractions.flatten(2).sum(-1) > 0
        none = ~present.any(dim=1, keepdim=True)
        logits = self.gate(pooled.flatten(1))
        logits = torch.where(present, logits, torch.full_like(logits, torch.finfo(logits.dtype).min))
        logits = torch.where(none, torch.zeros_like(logits), logits)  # no region at all: uniform weights
        w = torch.softmax(logits, dim=1)
        vector = (w.unsqueeze(-1) * projected).sum(1)
        full = torch.zeros(w.shape[0], len(ALL_REGIONS), dtype=w.dtype, device=w.device)
        full = full.index_copy(1, torch.tensor(self.index, device=w.device), w)
        return vector, full
