"""Per-site scanner profiles and patient mix, and what the scanner does to an ideal image.

Sites differ the way real institutions do: field strength, vendor intensity scale and offset,
noise level, bias field, fat suppression, anisotropic voxel spacing, stored orientation, case count
and subtype prevalence (screening-like vs neoadjuvant-trial-like).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedsubtype.phantom.biology import TRIAL_GROUP_PREVALENCE, SiteBiology

EXTERNAL_FRACTION = 74 / 960
"""The paper's external cohort: 74 of 960 cases; the last site gets this share."""


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner acquires and stores the first post-contrast phase."""

    manufacturer: str
    model: str
    field_strength: float
    spacing: tuple[float, float, float]  # mm, canonical (x, y, z) = (left, posterior, superior)
    shape: tuple[int, int, int]  # voxels, canonical (x, y, z)
    intensity_scale: float  # stored value of a unit-signal voxel
    intensity_offset: float
    noise: float  # Rician noise SD relative to unit signal
    bias: float  # peak-to-peak amplitude of the smooth multiplicative bias field (log scale)
    fat_suppression: bool
    axes: tuple[int, int, int] = (0, 1, 2)  # stored array axis i holds canonical axis axes[i]
    flips: tuple[bool, bool, bool] = (False, False, False)  # stored axis i runs against the canonical one


@dataclass(frozen=True)
class SiteProfile:
    """A phantom institution: name, relative size, patient mix and scanner."""

    name: str
    weight: float
    biology: SiteBiology
    scanner: ScannerProfile
    kind: str = "screening"  # "screening" or "trial" (patient mix)


_SCREENING = SiteBiology()
_TRIAL = SiteBiology(group_prevalence=TRIAL_GROUP_PREVALENCE, missing_ki67=1.0, missing_pr=0.06, missing_her2=0.08)

BASE_SITES: tuple[SiteProfile, ...] = (
    SiteProfile("site1", 0.34, _SCREENING, ScannerProfile(
        "SIEMENS", "MAGNETOM Skyra", 3.0, (0.8, 0.8, 2.0), (128, 128, 48), 900.0, 0.0, 0.035, 0.30, True)),
    SiteProfile("site2", 0.27, _TRIAL, ScannerProfile(
        "GE MEDICAL SYSTEMS", "SIGNA HDxt", 1.5, (0.9, 0.9, 1.5), (120, 120, 60), 700.0, 0.0, 0.050, 0.15, False,
        axes=(0, 1, 2), flips=(True, True, False)), kind="trial"),
    SiteProfile("site3", 0.22, SiteBiology(missing_ki67=0.25), ScannerProfile(
        "Philips Medical Systems", "Achieva", 1.5, (0.85, 0.85, 2.2), (120, 120, 44), 700.0, 40.0, 0.045, 0.20, True,
        axes=(2, 0, 1))),
    SiteProfile("site4", 0.17, SiteBiology(group_prevalence=(0.70, 0.12, 0.05, 0.13)), ScannerProfile(
        "SIEMENS", "MAGNETOM Vida", 3.0, (0.75, 0.75, 2.0), (128, 128, 48), 1000.0, 0.0, 0.030, 0.35, True,
        flips=(False, False, True))),
    SiteProfile("site5", 0.0, SiteBiology(group_prevalence=(0.66, 0.12, 0.06, 0.16), missing_ki67=0.05), ScannerProfile(
        "GE MEDICAL SYSTEMS", "DISCOVERY MR750", 3.0, (1.0, 1.0, 2.0), (112, 112, 48), 900.0, 100.0, 0.040, 0.25, False,
        axes=(1, 0, 2), flips=(False, True, False))),
)


def site_profiles(n_sites: int) -> list[SiteProfile]:
    """Profiles of `n_sites` sites: one site is the screening-like site1; otherwise the last one is the small
    external site, and beyond five the internal profiles repeat with other intensity scales and noise."""
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    if n_sites == 1:
        return [BASE_SITES[0]]
    internal = BASE_SITES[:-1]
    sites: list[SiteProfile] = []
    for i in range(n_sites - 1):
        base = internal[i % len(internal)]
        cycle = i // len(internal)
        scanner = base.scanner if cycle == 0 else replace(
            base.scanner, intensity_scale=base.scanner.intensity_scale * (1.0 + 0.15 * cycle),
            noise=base.scanner.noise * (1.0 + 0.1 * cycle))
        sites.append(replace(base, name=f"site{i + 1}", weight=base.weight / (1.0 + 0.3 * cycle), scanner=scanner))
    external = BASE_SITES[-1]
    sites.append(replace(external, name=f"site{n_sites}"))
    return sites


def site_sizes(cases: int, sites: list[SiteProfile]) -> list[int]:
    """Case count per site: unequal (non-IID); the last (external) site holds 74/960 of the cases."""
    if len(sites) == 1:
        return [cases]
    n_ext = max(4, int(round(cases * EXTERNAL_FRACTION)))
    rest = cases - n_ext
    w = np.array([s.weight for s in sites[:-1]], dtype=float)
    raw = rest * w / w.sum()
    sizes = np.maximum(np.floor(raw).astype(int), 4)
    # hand out the remainder by largest fractional part (deterministic)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while sizes.sum() < rest:
        sizes[order[i % len(order)]] += 1
        i += 1
    while sizes.sum() > rest:
        j = int(np.argmax(sizes))
        sizes[j] -= 1
    return [int(s) for s in sizes] + [n_ext]


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative field (exp of a random quadratic polynomial), peak-to-peak about `amplitude`."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    c = rng.normal(0.0, 1.0, 9).astype(np.float32)
    poly = c[0] * x + c[1] * y + c[2] * z + 0.5 * (c[3] * x * x + c[4] * y * y + c[5] * z * z) \
        + 0.5 * (c[6] * x * y + c[7] * y * z + c[8] * x * z)
    span = float(poly.max() - poly.min()) or 1.0
    return np.exp(poly * (amplitude / span)).astype(np.float32)


def acquire(rng: np.random.Generator, ideal: np.ndarray, scanner: ScannerProfile) -> np.ndarray:
    """Bias field, Rician magnitude noise and the vendor's intensity scale; returns stored int16 values."""
    signal = ideal * bias_field(rng, ideal.shape, scanner.bias)
    n1 = rng.standard_normal(ideal.shape, dtype=np.float32)
    n1 *= scanner.noise
    n1 += signal
    n2 = rng.standard_normal(ideal.shape, dtype=np.float32)
    n2 *= scanner.noise
    magnitude = np.sqrt(n1 * n1 + n2 * n2)
    stored = magnitude * scanner.intensity_scale + scanner.intensity_offset
    return np.clip(np.rint(stored), 0, 32767).astype(np.int16)


def reorient(array: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray,
             scanner: ScannerProfile) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Store a canonical (x, y, z) LPS array the site's way: permuted/flipped axes with a matching
    direction matrix and origin, so every voxel keeps its physical position."""
    out = np.transpose(array, scanner.axes)
    direction = np.zeros((3, 3))
    new_origin = np.asarray(origin, dtype=float).copy()
    for i, (ax, flip) in enumerate(zip(scanner.axes, scanner.flips)):
        direction[ax, i] = -1.0 if flip else 1.0
        if flip:
            out = np.flip(out, axis=i)
            new_origin[ax] += (array.shape[ax] - 1) * spacing[ax]
    new_spacing = tuple(float(spacing[ax]) for ax in scanner.axes)
    return np.ascontiguousarray(out), new_spacing, tuple(new_origin.tolist()), tuple(direction.flatten().tolist())


@dataclass
class Grid:
    """The canonical voxel grid of one case (x: left, y: posterior, z: superior; LPS)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def extent(self) -> np.ndarray:
        return np.asarray(self.shape) * np.asarray(self.spacing)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable physical coordinates (mm, relative to the grid's first voxel)."""
        x, y, z = (np.arange(n, dtype=np.float32) * s for n, s in zip(self.shape, self.spacing))
        return x[:, None, None], y[None, :, None], z[None, None, :]
