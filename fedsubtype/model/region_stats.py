"""Intensity statistics of the input per region: what a linear reader of the image sees, given to the network.

Trained on a few hundred cases, the convolutional features settle on the tumour's size and encode the
enhancement level, its spread and the peritumoral signal worse than plain region means and standard
deviations of the input do (docs/paper-benchmark.md). These statistics have no parameters; they join
the region-pooled features before the shared representation, which learns what to make of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .regions_pool import weighted_moments

SMOOTH_SIGMA_VOXELS = 1.0
"""Gaussian width of the smoothed image; the residual (image − smoothed) is the fine texture."""

STATS_PER_REGION = 7
"""Mean and standard deviation of the image, the smoothed image and the residual, and log volume fraction."""


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(int(math.ceil(2 * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(image: torch.Tensor, sigma: float = SMOOTH_SIGMA_VOXELS) -> torch.Tensor:
    """Separable Gaussian blur of [B,1,D,H,W] (edges replicated, so borders are not darkened)."""
    k = _gaussian_kernel(sigma, image.dtype, image.device)
    r = k.numel() // 2
    out = image
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out


def region_statistics(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, R·7] statistics of `image` [B,1,S,S,S] over each region of `masks` [B,R,S,S,S] (region-major):
    mean and sd of the image, of its smoothed version and of the residual, then log of the region's
    fraction of the volume. An empty region gives zeros and the log of a tiny fraction.

    The smoothing is normalised to the union of the masks (voxels outside them take no part), so a
    variant that does not see a region cannot read it through the blur either."""
    image = image[:, :1].to(torch.float32)
    seen = masks.sum(1, keepdim=True).clamp(max=1.0).to(torch.float32)
    blurred = smooth(image * seen) / smooth(seen).clamp_min(1e-6) * seen
    moments = [weighted_moments(a, masks, std=True) for a in (image, blurred, image - blurred)]  # each [B,R,2]
    fraction = masks.flatten(2).mean(-1).clamp_min(1e-4).log().unsqueeze(-1)  # [B,R,1]
    return torch.cat([*moments, fraction], dim=-1).flatten(1)
