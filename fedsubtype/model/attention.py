"""Multi-scale feature fusion and multi-scale spatial attention fused into one map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsubtype.model.extractor import group_norm


def resample(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resize of a [B,C,D,H,W] map (average pooling when shrinking by an integer factor)."""
    if tuple(x.shape[-3:]) == tuple(size):
        return x
    if all(s % t == 0 for s, t in zip(x.shape[-3:], size)):
        return F.adaptive_avg_pool3d(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class MultiScaleFusion(nn.Module):
    """Projects the three feature scales to `dim` channels at the middle scale and sums them."""

    def __init__(self, channels: tuple[int, ...], dim: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Conv3d(c, dim, 1, bias=False) for c in channels])
        self.norm = group_norm(dim, groups)
        self.act = nn.SiLU()

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = tuple(feats[1].shape[-3:])
        total = 0
        for proj, f in zip(self.proj, feats):
            # a 1x1x1 conv commutes with resampling: run it at the coarser of the two resolutions
            total = total + (proj(resample(f, size)) if f.shape[-1] >= size[-1] else resample(proj(f), size))
        return self.act(self.norm(total))


class MultiScaleSpatialAttention(nn.Module):
    """One attention map per chosen scale (1x1x1 conv scorer); a learned 1x1x1 conv fuses their logits."""

    def __init__(self, channels: tuple[int, ...], scales: tuple[int, ...]) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.scorers = nn.ModuleDict({
            f"scale_{k}": nn.Sequential(nn.Conv3d(channels[k - 1], max(channels[k - 1] // 2, 1), 1), nn.SiLU(),
                                        nn.Conv3d(max(channels[k - 1] // 2, 1), 1, 1))
            for k in self.scales
        })
        self.fuse = nn.Conv3d(len(self.scales), 1, 1)
        with torch.no_grad():
            self.fuse.weight.fill_(1.0 / len(self.scales))
            self.fuse.bias.zero_()

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int, int]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fused attention in (0,1) at `size`, and each scale's map at its own resolution."""
        logits = {name: scorer(feats[int(name.split("_")[1]) - 1]) for name, scorer in self.scorers.items()}
        stacked = torch.cat([resample(v, size) for v in logits.values()], dim=1)
        fused = torch.sigmoid(self.fuse(stacked))
        return fused, {name: torch.sigmoid(v) for name, v in logits.items()}
