"""One breast on a canonical LPS grid: air, skin, fat, textured fibroglandular tissue, vessels,
pectoral muscle, chest wall and lung, as seen in the first post-contrast phase.

Signal units: an enhancing tumour is about 1.0 in a fat-suppressed image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from fedsubtype.phantom.scanner import Grid
from fedsubtype.phantom.texture import smooth_noise

# Tissue signal (fat-suppressed, not fat-suppressed) in the first post-contrast phase.
SIGNAL = {
    "fat": (0.10, 0.78),
    "fgt": (0.28, 0.42),
    "skin": (0.42, 0.62),
    "muscle": (0.26, 0.34),
    "chest": (0.20, 0.30),
    "lung": (0.02, 0.03),
    "vessel": (1.05, 1.15),
    "fluid": (0.36, 0.30),  # oedema / necrotic fluid on T1: above suppressed fat, below unsuppressed fat
}
BPE_GAIN = 0.75  # how much background parenchymal enhancement brightens fibroglandular tissue


def signal(tissue: str, fat_suppression: bool) -> float:
    """Signal of a tissue with or without fat suppression."""
    return SIGNAL[tissue][0 if fat_suppression else 1]


@dataclass
class Breast:
    """The rendered breast and the geometry needed to place a tumour inside it."""

    image: np.ndarray  # float32 signal, canonical (x, y, z)
    body: np.ndarray  # bool, not air
    gland: np.ndarray  # float32 fibroglandular fraction
    centre: np.ndarray  # breast ellipsoid centre (mm), on the chest-wall plane
    semi_axes: np.ndarray  # breast ellipsoid semi-axes (mm)
    chest_y0: float  # chest wall depth at the centre (mm)
    chest_curve: float  # chest wall bends posteriorly by chest_curve * (dx^2 + 0.5 dz^2)

    def chest_y(self, x: np.ndarray | float, z: np.ndarray | float) -> np.ndarray | float:
        """Depth (y, mm) of the chest wall surface at (x, z)."""
        return self.chest_y0 + self.chest_curve * ((x - self.centre[0]) ** 2 + 0.5 * (z - self.centre[2]) ** 2)

    def depth_inside(self, p: np.ndarray) -> np.ndarray:
        """Approximate distance (mm) from points p [n, 3] to the skin; negative outside the breast."""
        d = (p - self.centre) / self.semi_axes
        d[:, 1] = np.minimum(d[:, 1], 0.0)  # behind the centre plane the breast meets the thorax
        f = (d * d).sum(axis=1)
        grad = 2.0 * np.sqrt(((d / self.semi_axes) ** 2).sum(axis=1)) + 1e-6
        return (1.0 - f) / grad


class _Shape(NamedTuple):
    """Breast ellipsoid (centre xc, chest_y0, zc; semi-axes a, b, c) and chest-wall bend drawn for one case, in mm."""

    xc: float
    zc: float
    chest_y0: float
    curve: float
    a: float
    b: float
    c: float


class _Layout(NamedTuple):
    """Where the breast, body and chest wall lie on the grid."""

    chest: np.ndarray  # chest-wall depth (mm) per (x, z), shape (X, 1, Z)
    dx: np.ndarray  # x offset from the centre in semi-axes
    dz: np.ndarray  # z offset from the centre in semi-axes
    skin_depth: np.ndarray  # mm from the skin surface, approximately
    body: np.ndarray  # bool, not air
    breast: np.ndarray  # bool, in front of the chest wall


class _Noise(NamedTuple):
    """Smooth noise fields shared by the gland, its enhancement, the muscle and the ribs."""

    coarse: np.ndarray
    medium: np.ndarray
    fine: np.ndarray


def render_breast(rng: np.random.Generator, grid: Grid, fat_suppression: bool, density: float, bpe: float) -> Breast:
    """Draw a breast: shape, gland distribution at `density` (fraction of breast volume), `bpe` enhancement."""
    x, y, z = grid.coords()
    shape = _draw_shape(rng, [float(e) for e in grid.extent])
    lay = _layout(x, y, z, shape)
    fs = fat_suppression
    img = np.zeros(grid.shape, dtype=np.float32)
    img[lay.body] = signal("fat", fs)

    noise = _Noise(smooth_noise(rng, grid.shape, grid.spacing, 9.0),
                   smooth_noise(rng, grid.shape, grid.spacing, (2.5, 4.5, 2.5)),  # ducts/ligaments run to the nipple
                   smooth_noise(rng, grid.shape, grid.spacing, 1.2))
    gland = _gland(grid, lay, y, noise, density)
    bpe_map = float(bpe) * np.clip(1.0 + 0.6 * noise.coarse, 0.0, None)
    fgt_signal = signal("fgt", fs) * (1.0 + 0.08 * noise.medium + 0.08 * noise.fine) + BPE_GAIN * bpe_map
    img += gland * (fgt_signal - img)
    img = _thorax(rng, img, y, z, lay.chest, noise, fs)

    # Skin: a 1.5 mm shell of the breast.
    skin = lay.breast & (lay.skin_depth < float(rng.uniform(1.2, 2.0)))
    img[skin] = signal("skin", fs)

    centre = np.array([shape.xc, shape.chest_y0, shape.zc])
    vessels = _vessels(rng, grid, lay.breast, centre, shape.chest_y0)
    img += vessels * (signal("vessel", fs) - img)
    semi = np.array([shape.a, shape.b, shape.c])
    return Breast(img.astype(np.float32, copy=False), lay.body, gland, centre, semi,
                  float(shape.chest_y0), float(shape.curve))


def _draw_shape(rng: np.random.Generator, ext: list[float]) -> _Shape:
    """Draw the breast ellipsoid and chest wall within a field of view of extent `ext` (mm)."""
    xc = ext[0] * float(rng.uniform(0.42, 0.58))
    zc = ext[2] * float(rng.uniform(0.45, 0.55))
    chest_y0 = ext[1] * float(rng.uniform(0.70, 0.78))
    curve = float(rng.uniform(6.0, 14.0)) / (0.5 * ext[0]) ** 2
    nipple_y = ext[1] * float(rng.uniform(0.05, 0.12))
    a, b, c = ext[0] * float(rng.uniform(0.62, 0.80)), chest_y0 - nipple_y, ext[2] * float(rng.uniform(0.55, 0.75))
    return _Shape(xc, zc, chest_y0, curve, a, b, c)


def _layout(x: np.ndarray, y: np.ndarray, z: np.ndarray, s: _Shape) -> _Layout:
    """Skin depth, body and breast masks on the grid with coordinates (x, y, z)."""
    # python floats keep every volume float32 (NumPy scalars would promote to float64)
    chest = s.chest_y0 + s.curve * ((x - s.xc) ** 2 + 0.5 * (z - s.zc) ** 2)  # (X, 1, Z)
    dx, dz = (x - s.xc) / s.a, (z - s.zc) / s.c
    dy = np.minimum((y - s.chest_y0) / s.b, 0.0)
    q2 = (dx * dx + dz * dz) + dy * dy  # (X, Y, Z)
    grad = 2.0 * np.sqrt((dx * dx / (s.a * s.a) + dz * dz / (s.c * s.c)) + dy * dy / (s.b * s.b)) + 1e-6
    skin_depth = (1.0 - q2) / grad
    behind = y >= chest - 1.0
    body = (skin_depth > 0) | behind
    return _Layout(chest, dx, dz, skin_depth, body, body & ~behind)


def _gland(grid: Grid, lay: _Layout, y: np.ndarray, noise: _Noise, density: float) -> np.ndarray:
    """Fibroglandular fraction: central, behind the nipple, away from skin and the retromammary fat."""
    radial = np.sqrt(lay.dx * lay.dx + lay.dz * lay.dz)
    prior = (1.2 * np.exp(-2.0 * radial ** 2) + 0.75 * noise.coarse + 0.45 * noise.medium + 0.3 * noise.fine
             - 1.5 * np.exp(-np.clip(lay.chest - y, 0, None) / 5.0)
             - 1.2 * np.exp(-np.clip(lay.skin_depth, 0, None) / 4.0))
    inside = prior[lay.breast]
    level = float(np.quantile(inside, 1.0 - float(np.clip(density, 0.03, 0.9)))) if inside.size else 0.0
    gland = np.zeros(grid.shape, dtype=np.float32)
    gland[lay.breast] = 1.0 / (1.0 + np.exp(-(inside - level) / 0.12))
    return gland


def _thorax(rng: np.random.Generator, img: np.ndarray, y: np.ndarray, z: np.ndarray, chest: np.ndarray,
            noise: _Noise, fs: bool) -> np.ndarray:
    """Paint the thorax behind the chest wall: pectoral muscle, then ribs/intercostal tissue, then lung."""
    muscle_t = float(rng.uniform(6.0, 12.0))
    wall_t = float(rng.uniform(8.0, 14.0))
    behind_depth = y - chest
    muscle = (behind_depth >= -1.0) & (behind_depth < muscle_t)
    wall = (behind_depth >= muscle_t) & (behind_depth < muscle_t + wall_t)
    lung = behind_depth >= muscle_t + wall_t
    muscle_sig = signal("muscle", fs) * (1.0 + 0.05 * noise.medium)
    img = np.where(muscle, muscle_sig, img)
    ribs = 0.5 + 0.5 * np.sin((2 * np.pi / float(rng.uniform(18.0, 26.0))) * (z + 3.0 * noise.coarse))
    img = np.where(wall, signal("chest", fs) * (0.6 + 0.6 * ribs), img)
    return np.where(lung, signal("lung", fs), img)


def _vessels(rng: np.random.Generator, grid: Grid, breast: np.ndarray, centre: np.ndarray, chest_y0: float) -> np.ndarray:
    """Enhancing vessels: a few smooth random curves from the chest wall towards the nipple (fraction 0..1)."""
    sp = np.asarray(grid.spacing)
    ext = grid.extent
    shape = np.asarray(grid.shape)
    radius = float(rng.uniform(0.7, 1.2))
    reach = np.ceil(2.0 * radius / sp).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    vessels = np.zeros(grid.shape, dtype=np.float32)
    for _ in range(int(rng.integers(4, 8))):
        p = np.array([rng.uniform(0.1, 0.9) * ext[0], chest_y0 - 2.0, rng.uniform(0.15, 0.85) * ext[2]])
        d = np.array([rng.normal(0, 0.3), -1.0, rng.normal(0, 0.3)])
        d /= np.linalg.norm(d)
        pts = []
        for _ in range(int(rng.integers(60, 160))):
            d += rng.normal(0, 0.12, 3)
            d[1] = min(d[1], -0.2)
            d /= np.linalg.norm(d)
            p = p + 0.6 * d
            pts.append(p.copy())
        pts = np.array(pts)
        base = np.rint(pts / sp).astype(int)
        vox = base[:, None, :] + offsets[None, :, :]  # (points, stencil, 3)
        dist2 = (((vox * sp) - pts[:, None, :]) ** 2).sum(-1)
        weight = np.exp(-0.5 * dist2 / radius ** 2) * 1.3
        ok = np.all((vox >= 0) & (vox < shape), axis=-1) & (weight > 0.05)
        vox, weight = vox[ok], weight[ok].astype(np.float32)
        np.maximum.at(vessels, (vox[:, 0], vox[:, 1], vox[:, 2]), weight)
    np.minimum(vessels, 1.0, out=vessels)
    return vessels * breast
