"""Random smooth fields at a chosen physical scale: the building block of tissue texture.

A field is coarse white noise mapped through a separable Gaussian kernel matrix per axis
(three small matrix products), which is much faster than filtering and zooming a full volume.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=256)
def _kernel(n_out: int, spacing: float, sigma_mm: float) -> np.ndarray:
    """[n_out, n_in] Gaussian weights from coarse nodes (spaced ≤ sigma) to output voxels, rows of unit norm."""
    step = max(spacing, sigma_mm)
    length = n_out * spacing
    n_in = int(np.ceil(length / step)) + 5
    nodes = (np.arange(n_in, dtype=np.float32) - 2.0) * step
    pos = np.arange(n_out, dtype=np.float32) * spacing
    w = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / sigma_mm) ** 2).astype(np.float32)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    return w


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 scale_mm: float | tuple[float, float, float]) -> np.ndarray:
    """Gaussian random field, zero mean and unit SD at every voxel, correlation length about `scale_mm`
    (one value, or one per axis for oriented texture)."""
    scales = (scale_mm,) * 3 if np.isscalar(scale_mm) else tuple(scale_mm)
    kx, ky, kz = (_kernel(int(n), float(s), round(max(float(sc), 0.3 * s), 3)) for n, s, sc in zip(shape, spacing, scales))
    field = rng.standard_normal((kx.shape[1], ky.shape[1], kz.shape[1]), dtype=np.float32)
    field = np.tensordot(kx, field, axes=(1, 0))  # (X, ny, nz)
    field = np.tensordot(field, ky, axes=(1, 1))  # (X, nz, Y)
    field = np.tensordot(field, kz, axes=(1, 1))  # (X, Y, Z)
    return np.ascontiguousarray(field, dtype=np.float32)
