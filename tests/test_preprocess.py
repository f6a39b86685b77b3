"""Preprocessing: shapes, geometry round trip, orientation and intensity invariance, config validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fedsubtype.configio import from_dict
from fedsubtype.errors import ConfigError, UserError
from fedsubtype.data.manifest import Case
from fedsubtype.data.preprocess import PreprocessConfig, preprocess_case, preprocess_images, to_image_grid
from fedsubtype.data.regions import compute_regions

SMALL = PreprocessConfig(size=24)


def breast_like(spacing=(0.7, 0.7, 2.0), size_mm=(56.0, 48.0, 40.0), seed=0):
    """Body with air on one side, a smooth bias, an ellipsoidal tumour with a dark centre, as (z, y, x) arrays."""
    rng = np.random.default_rng(seed)
    shape = [int(round(s / h)) for s, h in zip(size_mm[::-1], spacing[::-1])]
    z, y, x = np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing[::-1])], indexing="ij")
    centre = (27.3, 23.9, 19.6)
    r2 = ((x - centre[0]) / 9.0) ** 2 + ((y - centre[1]) / 7.0) ** 2 + ((z - centre[2]) / 6.0) ** 2
    tumour = (r2 <= 1.0).astype(np.uint8)
    arr = 80.0 + 0.3 * x + 4.0 * rng.standard_normal(shape) + 120.0 * tumour * (0.5 + 0.5 * np.sqrt(np.clip(r2, 0, 1)))
    arr[y > 44.0] = np.abs(2.0 * rng.standard_normal(np.count_nonzero(y > 44.0)))  # air in front of the breast
    return arr.astype(np.float32), tumour


def as_images(arr, tumour, spacing=(0.7, 0.7, 2.0), origin=(-20.0, 10.0, 5.0)):
    image, mask = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(tumour)
    for im in (image, mask):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
    return image, mask


def write_case(folder: Path, case_id: str, image: sitk.Image, mask: sitk.Image, **labels) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{case_id}.nii.gz"))
    sitk.WriteImage(mask, str(folder / f"{case_id}_mask.nii.gz"))
    full = {t: labels.get(t) for t in ("er", "pr", "her2", "ki67")}
    return Case(case_id, folder / f"{case_id}.nii.gz", folder / f"{case_id}_mask.nii.gz", labels.get("site", "A"), full)


def test_output_shapes_dtypes_and_meta(tmp_path):
    case = write_case(tmp_path, "c1", *as_images(*breast_like()), er=1)
    out = preprocess_case(case, SMALL)
    assert out.image.shape == (24, 24, 24) and out.image.dtype == np.float32
    assert out.regions.shape == (24, 24, 24) and out.regions.dtype == np.uint8
    assert set(np.unique(out.regions)) == {0, 1, 2, 3}
    assert np.isfinite(out.image).all()
    json.dumps(out.meta)  # JSON-safe
    grid = out.meta["model_grid"]
    assert grid["size"] == [24, 24, 24]
    # the cube covers the tumour (18 mm wide) plus both shells and margins
    assert out.meta["fov_mm"] >= 18.0 + 2 * (SMALL.peri_mm + SMALL.margin_mm)
    assert grid["spacing"][0] == pytest.approx(out.meta["fov_mm"] / 24)
    # the tumour sits at the centre of the cube
    tumour = np.argwhere(np.isin(out.regions, (1, 2)))
    assert np.allclose(tumour.mean(0), 11.5, atol=1.0)


def test_forward_and_back_recovers_the_regions():
    image, mask = as_images(*breast_like())
    cfg = PreprocessConfig(size=64)
    out = preprocess_images(image, mask, cfg)
    back = to_image_grid(out.regions, out.meta, image, interpolator="nearest")
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, attr)() == getattr(image, attr)()
    original = sitk.GetArrayFromImage(compute_regions(image, mask, rim_mm=cfg.rim_mm, peri_mm=cfg.peri_mm))
    returned = sitk.GetArrayFromImage(back)

    def dice(a, b):
        return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())

    assert dice(np.isin(original, (1, 2)), np.isin(returned, (1, 2))) > 0.9
    assert dice(original > 0, returned > 0) > 0.9
    for label in (1, 3):
        assert dice(original == label, returned == label) > 0.9, label
    # a continuous map goes back with linear interpolation, zero outside the crop
    import torch

    ramp = to_image_grid(torch.ones((1, 1, 64, 64, 64), requires_grad=True), out.meta, image)  # straight from a model
    inside = sitk.GetArrayFromImage(ramp)
    assert inside.max() == pytest.approx(1.0) and inside.min() == 0.0


def test_same_volume_in_another_orientation_gives_the_same_arrays():
    arr, tumour = breast_like()
    spacing, origin = (0.7, 0.7, 2.0), (-20.0, 10.0, 5.0)
    image, mask = as_images(arr, tumour, spacing, origin)
    # store it flipped along z and with x/y swapped: index (i, j, k) -> old (y, x, z flipped)
    nz = arr.shape[0]

    def relayout(a):
        b = sitk.GetImageFromArray(np.ascontiguousarray(a[::-1].transpose(0, 2, 1)))
        b.SetSpacing((spacing[1], spacing[0], spacing[2]))
        b.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
        b.SetOrigin((origin[0], origin[1], origin[2] + (nz - 1) * spacing[2]))
        return b

    image2, mask2 = relayout(arr), relayout(tumour)
    for idx in [(3, 5, 7), (10, 2, 1)]:  # same voxel, same place
        other = (idx[1], idx[0], nz - 1 - idx[2])
        assert np.allclose(image.TransformIndexToPhysicalPoint(idx), image2.TransformIndexToPhysicalPoint(other))
        assert image[idx] == image2[other]
    a, b = preprocess_images(image, mask, SMALL), preprocess_images(image2, mask2, SMALL)
    assert np.array_equal(a.regions, b.regions)
    assert np.allclose(a.image, b.image, atol=1e-4)
    assert np.allclose(a.meta["model_grid"]["origin"], b.meta["model_grid"]["origin"])


def test_intensity_normalisation_survives_scale_and_offset():
    arr, tumour = breast_like()
    a = preprocess_images(*as_images(arr, tumour), SMALL)
    b = preprocess_images(*as_images(arr * 3.0 + 40.0, tumour), SMALL)
    assert np.allclose(a.image, b.image, atol=1e-3)
    assert np.array_equal(a.regions, b.regions)
    # z-scored: the body (not the air-dominated crop) is centred near 0 with unit spread
    assert abs(float(np.median(a.image[a.regions == 0]))) < 2.0


def test_tumour_at_the_image_border_is_padded_not_shifted():
    arr, tumour = breast_like()
    image, mask = as_images(arr[:, :, 20:], tumour[:, :, 20:])  # cut the volume through the tumour
    out = preprocess_images(image, mask, SMALL)
    assert out.image.shape == (24, 24, 24)
    tumour_vox = np.argwhere(np.isin(out.regions, (1, 2)))
    assert tumour_vox[:, 0].max() > 11  # the tumour keeps its place on the cut side


def test_empty_mask_names_the_case(tmp_path):
    arr, tumour = breast_like()
    case = write_case(tmp_path, "empty", *as_images(arr, tumour * 0))
    with pytest.raises(UserError, match=r"^empty: the tumour mask is empty"):
        preprocess_case(case, SMALL)


def test_config_validation_is_one_line():
    cfg = from_dict(PreprocessConfig, {"size": 32, "clip_percentiles": [1, 99]})
    assert cfg.clip_percentiles == (1.0, 99.0) and cfg.size == 32
    for bad, key in [({"size": 4}, "size"), ({"spacing_mm": 0}, "spacing_mm"),
                     ({"clip_percentiles": [99, 1]}, "clip_percentiles"), ({"peri_mm": -1}, "peri_mm")]:
        with pytest.raises(ConfigError) as err:
            from_dict(PreprocessConfig, bad, "preprocess")
        assert f"preprocess.{key}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'sise'"):
        from_dict(PreprocessConfig, {"sise": 32})


def test_oblique_acquisition_maps_back_onto_itself():
    image, mask = as_images(*breast_like())
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    for im in (image, mask):
        im.SetDirection(rot.ravel().tolist())
    out = preprocess_images(image, mask, SMALL)
    assert np.isin(out.regions, (1, 2)).any()
    back = sitk.GetArrayFromImage(to_image_grid(out.regions, out.meta, image, interpolator="nearest"))
    tumour = sitk.GetArrayFromImage(mask) > 0
    returned = np.isin(back, (1, 2))
    assert 2 * (tumour & returned).sum() / (tumour.sum() + returned.sum()) > 0.85


def test_the_enhancing_tumour_is_not_clipped():
    """A uniformly enhancing tumour of 1.5 % of the volume: the body's 99.5th percentile falls inside it."""
    arr, tumour = breast_like()
    arr = np.where(tumour > 0, 200.0 + 4.0 * np.random.default_rng(1).standard_normal(arr.shape), arr).astype(np.float32)
    lesion = arr[tumour > 0]

    def clipped_share(keep: bool) -> float:
        out = preprocess_images(*as_images(arr, tumour), PreprocessConfig(size=24, keep_tumour_range=keep))
        return float(np.mean(lesion > out.meta["intensity"]["clip_high"]))

    assert clipped_share(False) > 0.1  # the body's limit flattens the top of the lesion
    assert clipped_share(True) <= 0.006  # only the lesion's own top 0.5 %
    assert PreprocessConfig().keep_tumour_range is True
