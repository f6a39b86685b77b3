"""Region volumes against analytic values on spheres and ellipsoids at anisotropic spacings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from fedsubtype.errors import UserError
from fedsubtype.data.regions import body_mask, compute_regions, region_volumes_ml


def synthetic_volume(spacing, semi_axes, *, size_mm=64.0, centre_mm=None, air_beyond_x_mm=None, seed=0):
    """A body (value 100, noisy) with a bright ellipsoidal tumour; optional air for x > air_beyond_x_mm."""
    size = [int(round(size_mm / s)) for s in spacing]
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    centre = centre_mm if centre_mm is not None else [size_mm / 2 + 0.13, size_mm / 2 + 0.27, size_mm / 2 + 0.41]
    r2 = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), centre, semi_axes))
    tumour = (r2 <= 1.0).astype(np.uint8)
    arr = 100.0 + 5.0 * rng.standard_normal(z.shape) + 100.0 * tumour
    if air_beyond_x_mm is not None:
        arr[x > air_beyond_x_mm] = 2.0 * np.abs(rng.standard_normal(np.count_nonzero(x > air_beyond_x_mm)))
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    mask = sitk.GetImageFromArray(tumour)
    for im in (image, mask):
        im.SetSpacing(spacing)
    return image, mask


def ellipsoid_steiner(a, b, c, n_theta=600, n_phi=1200):
    """Volume V, surface area S and integrated mean curvature M of an ellipsoid (numeric quadrature)."""
    th = (np.arange(n_theta) + 0.5) * math.pi / n_theta
    ph = (np.arange(n_phi) + 0.5) * 2 * math.pi / n_phi
    th, ph = np.meshgrid(th, ph, indexing="ij")
    x, y, z = a * np.sin(th) * np.cos(ph), b * np.sin(th) * np.sin(ph), c * np.cos(th)
    r_th = np.stack([a * np.cos(th) * np.cos(ph), b * np.cos(th) * np.sin(ph), -c * np.sin(th)])
    r_ph = np.stack([-a * np.sin(th) * np.sin(ph), b * np.sin(th) * np.cos(ph), np.zeros_like(th)])
    dA = np.linalg.norm(np.cross(r_th, r_ph, axis=0), axis=0) * (math.pi / n_theta) * (2 * math.pi / n_phi)
    q = x**2 / a**4 + y**2 / b**4 + z**2 / c**4
    H = (a * a + b * b + c * c - (x * x + y * y + z * z)) / (2 * (a * b * c) ** 2 * q**1.5)
    return 4 / 3 * math.pi * a * b * c, float(dA.sum()), float((H * dA).sum())


def analytic_regions_ml(semi_axes, rim, peri):
    """Steiner's formula for the inner and outer parallel bodies (valid while rim < the smallest curvature radius)."""
    V, S, M = ellipsoid_steiner(*semi_axes)
    core = V - S * rim + M * rim**2 - 4 / 3 * math.pi * rim**3
    outer = S * peri + M * peri**2 + 4 / 3 * math.pi * peri**3
    return {"core": core / 1000, "rim": (V - core) / 1000, "peritumoral": outer / 1000}


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 2.0), (0.5, 1.0, 1.5)])
@pytest.mark.parametrize("semi_axes", [(14.0, 14.0, 14.0), (16.0, 12.0, 10.0)])
def test_region_volumes_match_analytic(spacing, semi_axes):
    image, mask = synthetic_volume(spacing, semi_axes)
    regions = compute_regions(image, mask, rim_mm=2.0, peri_mm=5.0)
    measured = region_volumes_ml(regions)
    expected = analytic_regions_ml(semi_axes, 2.0, 5.0)
    for name in ("core", "rim", "peritumoral"):
        assert measured[name] == pytest.approx(expected[name], rel=0.05), (name, measured, expected)
    tumour = sitk.GetArrayFromImage(mask) > 0
    labels = sitk.GetArrayFromImage(regions)
    assert np.array_equal(np.isin(labels, (1, 2)), tumour), "core ∪ rim must be exactly the tumour"


def test_sphere_formula_agrees_with_closed_form():
    got = analytic_regions_ml((12.0, 12.0, 12.0), 2.0, 5.0)
    assert got["core"] == pytest.approx(4 / 3 * math.pi * 10**3 / 1000, rel=1e-4)
    assert got["peritumoral"] == pytest.approx(4 / 3 * math.pi * (17**3 - 12**3) / 1000, rel=1e-4)


def test_peritumoral_shell_is_clipped_by_air():
    spacing, R, peri = (0.7, 0.7, 2.0), 10.0, 5.0
    # air plane between voxel centres, 12 mm from the tumour centre: the outer shell is cut by a cap
    centre = [30.1, 32.27, 32.41]
    plane = 30.1 + 12.0
    plane = (math.floor(plane / spacing[0]) + 0.5) * spacing[0]
    image, mask = synthetic_volume(spacing, (R, R, R), centre_mm=centre, air_beyond_x_mm=plane)
    body = body_mask(image)
    body_x = sitk.GetArrayFromImage(body).any(axis=(0, 1))
    assert body_x.sum() == int(plane / spacing[0]) + 1, "body must stop at the air plane"
    regions = compute_regions(image, mask, rim_mm=2.0, peri_mm=peri, body=body)
    h = plane - centre[0]
    cap_height = R + peri - h
    expected = 4 / 3 * math.pi * ((R + peri) ** 3 - R**3) - math.pi * cap_height**2 * (3 * (R + peri) - cap_height) / 3
    assert region_volumes_ml(regions)["peritumoral"] == pytest.approx(expected / 1000, rel=0.05)
    labels = sitk.GetArrayFromImage(regions)
    x_mm = np.arange(labels.shape[2]) * spacing[0]
    assert not (labels[..., x_mm > plane] == 3).any(), "peritumoral voxels must never be in the air"
    # the same call without a body argument computes the body itself
    assert np.array_equal(sitk.GetArrayFromImage(compute_regions(image, mask, rim_mm=2.0, peri_mm=peri)), labels)


def test_body_mask_ignores_global_scale_and_offset():
    image, _ = synthetic_volume((1.0, 1.0, 2.0), (8.0, 8.0, 8.0), size_mm=48, air_beyond_x_mm=30.5)
    a = sitk.GetArrayFromImage(body_mask(image))
    b = sitk.GetArrayFromImage(body_mask(image * 3.0 + 250.0))
    assert np.array_equal(a, b)
    assert 0.5 < a.mean() < 0.75


def test_regions_do_not_depend_on_the_direction_matrix():
    spacing = (0.7, 0.7, 2.0)
    image, mask = synthetic_volume(spacing, (12.0, 10.0, 9.0), size_mm=48)
    reference = region_volumes_ml(compute_regions(image, mask))
    # the same voxels stored with the first two axes swapped and the third flipped (a different scanner layout)
    flip = [sitk.PermuteAxes(sitk.Flip(im, [False, False, True]), [1, 0, 2]) for im in (image, mask)]
    for im in flip:
        im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    other = region_volumes_ml(compute_regions(*flip))
    for name in reference:
        assert other[name] == pytest.approx(reference[name], rel=1e-6)


def test_empty_or_misaligned_mask_is_a_user_error():
    image, mask = synthetic_volume((1.0, 1.0, 1.0), (5.0, 5.0, 5.0), size_mm=24)
    with pytest.raises(UserError, match="empty"):
        compute_regions(image, mask * 0)
    moved = sitk.Image(mask)
    moved.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(UserError, match="not on the image grid"):
        compute_regions(image, moved)
