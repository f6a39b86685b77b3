"""Shared 3D residual feature extractor (GroupNorm only, so it works with Opacus and FedAvg)."""

from __future__ import annotations

import torch
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with at most `groups` groups that divide `channels` (batch-size independent)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with GroupNorm and SiLU, plus a (projected) identity path."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_ch, groups)
        self.act = nn.SiLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.skip = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), group_norm(out_ch, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act(h + self.skip(x))


def _stage(in_ch: int, out_ch: int, n_blocks: int, stride: int, groups: int) -> nn.Sequential:
    blocks = [ResidualBlock3d(in_ch, out_ch, stride, groups)]
    blocks += [ResidualBlock3d(out_ch, out_ch, 1, groups) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class FeatureExtractor(nn.Module):
    """Stride-2 stem then three residual stages; returns features at 1/2, 1/4 and 1/8 of the input."""

    def __init__(self, in_ch: int, width: int, blocks: tuple[int, int, int], groups: int) -> None:
        super().__init__()
        self.channels = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv3d(in_ch, width, 3, stride=2, padding=1, bias=False),
                                  group_norm(width, groups), nn.SiLU())
        self.stages = nn.ModuleList([
            _stage(width, self.channels[0], blocks[0], 1, groups),
            _stage(self.channels[0], self.channels[1], blocks[1], 2, groups),
            _stage(self.channels[1], self.channels[2], blocks[2], 2, groups),
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        # channels-last makes oneDNN's 3D weight-gradient kernels several times faster on CPU
        h = self.stem(x.contiguous(memory_format=torch.channels_last_3d))
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats
