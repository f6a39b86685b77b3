"""The tumour: shape (size, elongation, lobulation, spicules), internal enhancement (rim, necrosis,
fine and coarse heterogeneity) and peritumoral changes (oedema, enhancement), rendered from the
latent phenotypes into a local box of the breast image, plus the segmentation a reader would draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from fedsubtype.phantom.anatomy import Breast, signal
from fedsubtype.phantom.scanner import Grid
from fedsubtype.phantom.texture import smooth_noise

PERI_REACH_MM = 10.0  # how far peritumoral changes are drawn (they fade within ~5 mm)
BORDER_MARGIN_MM = 8.0  # free space between the tumour and the volume border


def _radii(diameter_mm: float, elongation: float) -> np.ndarray:
    """Semi-axes of an ellipsoid with the volume of a sphere of `diameter_mm` (prolate by `elongation`)."""
    r = diameter_mm / 2.0
    return np.array([r * elongation ** (2 / 3), r * elongation ** (-1 / 3), r * elongation ** (-1 / 3)])


def _reach(latents: dict[str, float]) -> float:
    """Largest distance (mm) from the centre that the tumour and its spicules may reach."""
    radii = _radii(latents["diameter_mm"], latents["elongation"])
    return float(radii.max() * (1.0 + 2.5 * latents["lobulation"]) + _spicule_length(latents))


def _spicule_length(latents: dict[str, float]) -> float:
    return float(latents["diameter_mm"] / 2.0 * (0.4 + 1.2 * latents["spiculation"]))


def place(rng: np.random.Generator, grid: Grid, breast: Breast, latents: dict[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """A centre (mm) inside the breast, clear of skin, chest wall and volume border, preferring glandular
    tissue; shrinks the tumour when it cannot fit and returns the latents actually rendered."""
    lat = dict(latents)
    ext = grid.extent
    for _ in range(12):
        reach = _reach(lat)
        lo = reach + BORDER_MARGIN_MM
        if np.all(ext - 2 * lo > 1.0):
            cand = rng.uniform(lo, ext - lo, size=(400, 3))
            skin_ok = breast.depth_inside(cand) >= reach + 3.0
            chest_ok = breast.chest_y(cand[:, 0], cand[:, 2]) - cand[:, 1] >= reach + 3.0
            ok = cand[skin_ok & chest_ok]
            if len(ok):
                idx = np.clip(np.rint(ok / np.asarray(grid.spacing)).astype(int), 0, np.asarray(grid.shape) - 1)
                weight = 0.15 + breast.gland[idx[:, 0], idx[:, 1], idx[:, 2]]
                pick = rng.choice(len(ok), p=weight / weight.sum())
                return ok[pick], lat
        lat["diameter_mm"] *= 0.88
        lat["elongation"] = 1.0 + 0.8 * (lat["elongation"] - 1.0)
    raise RuntimeError("no room for the tumour in this breast (grid too small for the phantom)")


@dataclass
class _Shape:
    """Per-voxel geometry of the tumour in its local box."""

    u: np.ndarray  # unit direction in the ellipsoid frame
    rho: np.ndarray  # normalised radius (1 on the unlobulated surface)
    bound: np.ndarray  # lobulated surface radius along u
    ray_mm: np.ndarray  # physical length of a unit normalised radius along u
    inside_mm: np.ndarray  # radial distance to the margin: > 0 inside, < 0 outside


def _local_box(grid: Grid, centre: np.ndarray, reach: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """The voxel box around the tumour and the offsets (mm) of its voxels from the centre, (bx, by, bz, 3)."""
    sp = np.asarray(grid.spacing, dtype=np.float32)
    lo = np.maximum(np.floor((centre - reach) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, np.asarray(grid.shape))
    axes = [(np.arange(a, b, dtype=np.float32) * s - c) for a, b, s, c in zip(lo, hi, sp, centre)]
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _shape(rng: np.random.Generator, offsets: np.ndarray, latents: dict[str, float]) -> _Shape:
    """Randomly oriented prolate ellipsoid with a few broad lobulation bumps on its boundary."""
    radii = _radii(latents["diameter_mm"], latents["elongation"]).astype(np.float32)
    rot = Rotation.random(random_state=rng).as_matrix().astype(np.float32)
    s = (offsets @ rot) / radii
    rho = np.sqrt((s * s).sum(axis=-1)) + 1e-6
    u = s / rho[..., None]
    bound = np.ones(rho.shape, dtype=np.float32)
    kappa = 6.0
    for _ in range(5):
        d = rng.normal(size=3).astype(np.float32)
        d /= np.linalg.norm(d)
        amp = latents["lobulation"] * rng.uniform(0.6, 1.6)
        bound += amp * (np.exp(kappa * (u @ d - 1.0)) - 1.0 / (2 * kappa))
    ray_mm = np.sqrt(((u * radii) ** 2).sum(axis=-1))
    return _Shape(u, rho, bound, ray_mm, (bound - rho) * ray_mm)


def _spicules(rng: np.random.Generator, shape: _Shape, latents: dict[str, float]) -> np.ndarray:
    """Thin tapering strands radiating from the margin (fraction 0..1), evaluated on the shell they can reach."""
    spic = np.zeros(shape.rho.shape, dtype=np.float32)
    n_spic = int(round(60 * latents["spiculation"] ** 1.5))
    r_mean = latents["diameter_mm"] / 2.0
    length = _spicule_length(latents) / r_mean
    shell = np.flatnonzero((shape.rho >= shape.bound - 0.1 * length) & (shape.rho < shape.bound + 1.2 * length))
    if not n_spic or not shell.size:
        return spic
    u_s, rho_s = shape.u.reshape(-1, 3)[shell], shape.rho.ravel()[shell]
    bound_s, ray_s = shape.bound.ravel()[shell], shape.ray_mm.ravel()[shell]
    best = np.zeros(shell.size, dtype=np.float32)
    for _ in range(n_spic):
        d = rng.normal(size=3).astype(np.float32)
        d /= np.linalg.norm(d)
        ang = np.sqrt(np.maximum(2.0 - 2.0 * (u_s @ d), 0.0))  # chord ~ angle for small angles
        frac = (rho_s - bound_s) / (length * float(rng.uniform(0.5, 1.2)))
        half = float(1.1 + 0.6 * rng.random()) * (1.0 - frac) / (rho_s * ray_s)  # half-thickness as an angle
        strand = np.clip((half - ang) / (0.5 * half + 1e-6), 0.0, 1.0) * ((frac >= -0.1) & (frac < 1.0))
        np.maximum(best, strand, out=best)
    spic.ravel()[shell] = best
    return spic


def _tumour_signal(rng: np.random.Generator, grid: Grid, shape: _Shape, latents: dict[str, float], fs: bool) -> np.ndarray:
    """Enhancement inside the tumour: rim vs core, coarse and fine heterogeneity, central necrosis."""
    box_shape = shape.rho.shape
    depth = np.maximum(shape.inside_mm, 0.0)
    solid = shape.inside_mm > 0
    base = (0.85 if fs else 1.3) * latents["enhancement"]
    rim = latents["rim_enhancement"]
    w_rim = np.exp(-depth / 2.0)
    level = (1.0 - 0.55 * rim) * (1.0 - w_rim) + (1.0 + 0.35 * rim) * w_rim
    coarse = smooth_noise(rng, box_shape, grid.spacing, 4.0)
    fine = smooth_noise(rng, box_shape, grid.spacing, 0.9)
    tumour = base * level * np.clip(1.0 + latents["heterogeneity_coarse"] * coarse
                                     + latents["heterogeneity_fine"] * fine, 0.05, None)
    necrosis = latents["necrosis"]
    if necrosis > 0.005 and solid.any():
        score = depth / max(float(depth.max()), 1e-3) + 0.2 * smooth_noise(rng, box_shape, grid.spacing, 3.0)
        cut = float(np.quantile(score[solid], 1.0 - necrosis))
        nec = solid / (1.0 + np.exp(-(score - cut) / 0.04))
        fluid = signal("fluid", fs) * (1.0 + 0.08 * fine)
        tumour = tumour * (1.0 - nec) + fluid * nec
    return tumour


def _peritumoral(rng: np.random.Generator, grid: Grid, tissue: np.ndarray, in_body: np.ndarray, shape: _Shape,
                 latents: dict[str, float], fs: bool) -> np.ndarray:
    """Tissue around the tumour with oedema (towards fluid signal) and enhancement, patchy, fading with distance."""
    outside = np.maximum(-shape.inside_mm, 0.0)
    patchy = np.clip(0.6 + 0.5 * smooth_noise(rng, tissue.shape, grid.spacing, 2.5), 0.0, 1.2)
    patchy_enh = np.clip(0.6 + 0.5 * smooth_noise(rng, tissue.shape, grid.spacing, 2.0), 0.0, 1.2)
    oed = latents["oedema"] * np.exp(-outside / (1.5 + 3.5 * latents["oedema"])) * patchy * in_body
    peri = tissue * (1.0 - 0.8 * oed) + signal("fluid", fs) * 0.8 * oed
    peri += 0.45 * latents["peri_enhancement"] * np.exp(-outside / 2.5) * patchy_enh * in_body
    return peri


def render_tumour(rng: np.random.Generator, grid: Grid, breast: Breast, latents: dict[str, float],
                  centre: np.ndarray, fat_suppression: bool) -> np.ndarray:
    """Draw the tumour into breast.image (in place) and return the segmentation mask (uint8, canonical grid)."""
    box, offsets = _local_box(grid, centre, _reach(latents) + PERI_REACH_MM)
    shape = _shape(rng, offsets, latents)
    spic = _spicules(rng, shape, latents)
    tumour = _tumour_signal(rng, grid, shape, latents, fat_suppression)
    peri = _peritumoral(rng, grid, breast.image[box], breast.body[box], shape, latents, fat_suppression)

    margin_mm = 0.5 + 1.2 * latents["spiculation"]  # spiculated margins are less distinct
    body = np.clip(shape.inside_mm / margin_mm + 0.5, 0.0, 1.0)
    strands = 0.75 * (0.85 if fat_suppression else 1.3) * latents["enhancement"] * spic
    out = peri * (1.0 - body) + tumour * body
    out = out * (1.0 - spic * (1.0 - body)) + strands * (1.0 - body)
    breast.image[box] = out.astype(np.float32)

    # The reader's segmentation: the solid tumour, boundary jittered by a smooth field, no thin spicules.
    jitter = smooth_noise(rng, offsets.shape[:3], grid.spacing, 3.0)
    mask = np.zeros(grid.shape, dtype=np.uint8)
    mask[box] = ((shape.inside_mm + 0.6 * jitter) > 0).astype(np.uint8)
    return mask
