"""Preprocessing: one case (image + tumour mask) -> a cubic, tumour-centred image channel and region map.

Steps (MONAI transforms on MetaTensors, so the physical geometry travels with the arrays):
regions on the original grid (:mod:`fedsubtype.data.regions`) -> generous crop on the original grid ->
Orientation RAS -> Spacing (bilinear image, nearest regions) -> exact cubic field of view around the
tumour -> intensity clip + z-score with statistics of the whole body -> Resize to ``size``³.
``meta`` keeps the model grid's geometry so :func:`to_image_grid` can put a model-grid map back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedsubtype.errors import ConfigError, UserError
from fedsubtype.data.manifest import Case
from fedsubtype.data.regions import body_mask, compute_regions, region_volumes_ml

PREPROCESS_VERSION = 1
"""Bump when the output of :func:`preprocess_case` changes for the same input and config (invalidates caches)."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class PreprocessConfig:
    """How a case becomes the model's input; part of every cache key and of every model.pt."""

    spacing_mm: float = 1.0
    """Isotropic spacing the crop is resampled to before resizing."""
    size: int = 64
    """Edge of the cubic model input, in voxels."""
    rim_mm: float = 2.0
    """Thickness of the inner tumour rim."""
    peri_mm: float = 5.0
    """Thickness of the peritumoral shell (outside the tumour, inside the body)."""
    margin_mm: float = 5.0
    """Context kept beyond the peritumoral shell on every side."""
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    """Intensity percentiles (inside the body) clipped before the z-score."""
    keep_tumour_range: bool = True
    """Raise the upper clip limit to the tumour's own upper percentile. The enhancing tumour is the
    brightest tissue and well under 1 % of the body, so the body's 99.5th percentile alone flattens a
    median 18 % of its core (the enhancement and texture the model must read). False: the body's only."""
    min_fov_mm: float = 0.0
    """Smallest field of view (edge of the cube); stops tiny tumours being magnified without bound."""
    air_fraction: float = 0.1
    """Body mask: air is below this fraction of the body's intensity range."""

    def validate(self, where: str = "preprocess") -> None:
        """Reject values that cannot work, one line each (called by configio.from_dict)."""
        def bad(key: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"{key}={getattr(self, key)!r} {why}", fix, where=f"{where}.{key}")

        for key in ("spacing_mm", "rim_mm"):
            if not (isinstance(getattr(self, key), (int, float)) and 0 < getattr(self, key) <= 20):
                raise bad(key, "is out of range", "use a value in (0, 20] millimetres")
        for key in ("peri_mm", "margin_mm"):
            if not (isinstance(getattr(self, key), (int, float)) and 0 <= getattr(self, key) <= 50):
                raise bad(key, "is out of range", "use a value in [0, 50] millimetres")
        if not (isinstance(self.size, int) and 8 <= self.size <= 512):
            raise bad("size", "is out of range", "use a whole number of voxels in [8, 512] (e.g. 64)")
        lo, hi = self.clip_percentiles
        if not (0 <= lo < hi <= 100):
            raise bad("clip_percentiles", "must be two increasing percentiles", "use e.g. [0.5, 99.5]")
        if not (0 <= self.min_fov_mm <= 500):
            raise bad("min_fov_mm", "is out of range", "use a value in [0, 500] millimetres")
        if not (0 < self.air_fraction < 1):
            raise bad("air_fraction", "must lie in (0, 1)", "use e.g. 0.1")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe form (tuples as lists)."""
        data = asdict(self)
        data["clip_percentiles"] = list(self.clip_percentiles)
        return data


@dataclass
class PreprocessedCase:
    """The model-grid arrays of one case plus the geometry to map results back."""

    image: np.ndarray
    """float32 (S, S, S), z-scored inside the body; axes follow the RAS model grid in ``meta``."""
    regions: np.ndarray
    """uint8 (S, S, S): 0 background, 1 core, 2 rim, 3 peritumoral."""
    meta: dict[str, Any]

    @property
    def voxel_mm(self) -> float:
        """Edge of one model-grid voxel in mm (the crop's field of view over S); NaN if not recorded."""
        return float(self.meta.get("fov_mm", math.nan)) / self.image.shape[-1]


# ---------------------------------------------------------------- geometry helpers


def _geometry(image: sitk.Image) -> dict[str, list]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}


def _ras_affine(image: sitk.Image, start: list[int]) -> np.ndarray:
    """RAS affine (MONAI's convention) of the sub-volume of `image` starting at index `start`."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    lps[:3, 3] = image.TransformIndexToPhysicalPoint([int(s) for s in start])
    return _LPS_TO_RAS @ lps


def affine_to_geometry(affine_ras: np.ndarray, size: list[int]) -> dict[str, list]:
    """An RAS affine as ITK geometry (LPS origin, spacing, direction) for a grid of `size`."""
    lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return {"size": [int(s) for s in size], "spacing": spacing.tolist(),
            "origin": lps[:3, 3].tolist(), "direction": direction.ravel().tolist()}


def _tumour_world_box(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Centre (LPS mm) and extent (mm per world axis) of the tumour's bounding box."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise UserError("the tumour mask is empty", "check the segmentation file (every case needs a tumour)")
    bbox = stats.GetBoundingBox(1)
    lo, size = np.array(bbox[:3], float) - 0.5, np.array(bbox[3:], float)
    corners = np.array([[lo[a] + size[a] * ((c >> a) & 1) for a in range(3)] for c in range(8)])
    points = np.array([mask.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return (points.min(0) + points.max(0)) / 2, points.max(0) - points.min(0)


def _crop_box(image: sitk.Image, centre: np.ndarray, half_mm: float) -> tuple[list[int], list[int]]:
    """Index box on the original grid covering the cube centre ± half_mm (+1 voxel), clamped to the image."""
    offsets = np.array([[(1 if (c >> a) & 1 else -1) * half_mm for a in range(3)] for c in range(8)])
    idx = np.array([image.TransformPhysicalPointToContinuousIndex((centre + o).tolist()) for o in offsets])
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, np.array(image.GetSize()) - 1)
    if np.any(hi < lo):
        raise UserError("the tumour lies outside the image", "check that mask and image share a physical space")
    return lo.tolist(), (hi - lo + 1).tolist()


def body_intensity_stats(image: sitk.Image, body: sitk.Image, clip_percentiles: tuple[float, float],
                         tumour: sitk.Image | None = None) -> dict[str, float]:
    """Clip limits (percentiles inside the body) and mean/std of the clipped body intensities.

    With `tumour`, the upper limit is at least the tumour's own upper percentile, so the lesion is not clipped.
    """
    array = sitk.GetArrayViewFromImage(image)
    values = array[sitk.GetArrayViewFromImage(body) > 0].astype(np.float64)
    if values.size < 10:
        raise UserError("the body mask is (nearly) empty", "check the image: it looks like air only")
    lo, hi = np.percentile(values, clip_percentiles)
    if tumour is not None:
        lesion = array[sitk.GetArrayViewFromImage(tumour) > 0]
        if lesion.size:
            hi = max(float(hi), float(np.percentile(lesion, clip_percentiles[1])))
    clipped = np.clip(values, lo, hi)
    std = float(clipped.std())
    if not math.isfinite(std) or std <= 1e-6 * max(1.0, abs(float(hi))):
        raise UserError("the image is constant inside the body", "check the image file (wrong series or empty volume?)")
    return {"clip_low": float(lo), "clip_high": float(hi), "mean": float(clipped.mean()), "std": std}


# ---------------------------------------------------------------- the pipeline


def preprocess_images(image: sitk.Image, mask: sitk.Image, cfg: PreprocessConfig) -> PreprocessedCase:
    """Preprocess an image and its tumour mask (already on the image grid); see the module docstring."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    body = body_mask(image, air_fraction=cfg.air_fraction)
    regions = compute_regions(image, mask, rim_mm=cfg.rim_mm, peri_mm=cfg.peri_mm, body=body)
    stats = body_intensity_stats(image, body, tuple(cfg.clip_percentiles),
                                 tumour=mask if cfg.keep_tumour_range else None)
    centre, extent = _tumour_world_box(mask)
    fov = max(float(extent.max()) + 2.0 * (cfg.peri_mm + cfg.margin_mm), cfg.min_fov_mm)
    n = max(2, int(math.ceil(fov / cfg.spacing_mm - 1e-6)))
    start, size = _crop_box(image, centre, 0.5 * n * cfg.spacing_mm + cfg.spacing_mm)
    data = _resampled_crop(image, regions, start, size, cfg.spacing_mm)
    data = _tumour_cube(data, centre, n, stats, cfg.size)

    out_image = data["image"].as_tensor()[0].numpy().astype(np.float32)
    out_regions = np.rint(data["regions"].as_tensor()[0].numpy()).astype(np.uint8)
    meta = {
        "preprocess_version": PREPROCESS_VERSION,
        "source": _geometry(image),
        "crop": {"start": [int(s) for s in start], "size": [int(s) for s in size]},
        "tumour_centre_lps": centre.tolist(),
        "tumour_extent_mm": extent.tolist(),
        "fov_mm": n * cfg.spacing_mm,
        "model_grid": affine_to_geometry(data["image"].affine.numpy(), [cfg.size] * 3),
        "intensity": stats,
        "region_volumes_ml": region_volumes_ml(regions),
    }
    return PreprocessedCase(out_image, out_regions, meta)


def _resampled_crop(image: sitk.Image, regions: sitk.Image, start: list[int], size: list[int],
                    spacing_mm: float) -> dict[str, Any]:
    """The crop box of image and regions as MONAI MetaTensors, reoriented to RAS and resampled to `spacing_mm`."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, Spacingd

    def crop(img: sitk.Image) -> np.ndarray:  # sitk arrays are (z, y, x); MONAI wants (x, y, z)
        arr = sitk.GetArrayViewFromImage(img)
        return np.ascontiguousarray(arr[start[2]:start[2] + size[2], start[1]:start[1] + size[1],
                                        start[0]:start[0] + size[0]].transpose(2, 1, 0))

    affine = torch.as_tensor(_ras_affine(image, start))
    data = {"image": MetaTensor(torch.from_numpy(crop(image))[None], affine=affine),
            "regions": MetaTensor(torch.from_numpy(crop(regions).astype(np.float32))[None], affine=affine)}
    keys = ["image", "regions"]
    return Compose([Orientationd(keys=keys, axcodes="RAS", labels=None),
                    Spacingd(keys=keys, pixdim=spacing_mm, mode=("bilinear", "nearest"), padding_mode="border")])(data)


def _tumour_cube(data: dict[str, Any], centre: np.ndarray, n: int, stats: dict[str, float],
                 size: int) -> dict[str, Any]:
    """Exact cube of `n` voxels around the tumour centre on the resampled grid (padded where the image ends),
    intensity clipped and z-scored with the body `stats`, resized to `size`³."""
    from monai.transforms import (BorderPadd, Compose, NormalizeIntensityd, Resized, ScaleIntensityRanged,
                                  SpatialCropd)

    keys = ["image", "regions"]
    grid_affine = data["image"].affine.numpy()
    centre_ras = (_LPS_TO_RAS @ np.append(centre, 1.0))[:3]
    centre_idx = np.linalg.solve(grid_affine[:3, :3], centre_ras - grid_affine[:3, 3])
    lo = np.floor(centre_idx - (n - 1) / 2.0 + 0.5).astype(int)
    hi = lo + n
    shape = np.array(data["image"].shape[1:])
    border = [int(v) for a in range(3) for v in (max(0, -lo[a]), max(0, hi[a] - shape[a]))]
    return Compose([
        SpatialCropd(keys=keys, roi_start=np.maximum(lo, 0).tolist(), roi_end=np.minimum(hi, shape).tolist()),
        BorderPadd(keys="image", spatial_border=border, mode="constant", value=stats["clip_low"]),
        BorderPadd(keys="regions", spatial_border=border, mode="constant", value=0),
        ScaleIntensityRanged(keys="image", a_min=stats["clip_low"], a_max=stats["clip_high"],
                             b_min=stats["clip_low"], b_max=stats["clip_high"], clip=True),
        NormalizeIntensityd(keys="image", subtrahend=stats["mean"], divisor=stats["std"]),
        Resized(keys=keys, spatial_size=(size,) * 3, mode=("trilinear", "nearest")),
    ])(data)


def preprocess_case(case: Case, cfg: PreprocessConfig) -> PreprocessedCase:
    """Read a case's image and mask and preprocess them; user mistakes become one-line UserErrors naming the case."""
    from fedsubtype.data.imageio import load_case_images

    image, mask = load_case_images(case)
    try:
        return preprocess_images(image, mask, cfg)
    except UserError as exc:
        raise UserError(exc.what, exc.fix, where=f"{case.case_id}" + (f": {exc.where}" if exc.where else "")) from None


# ---------------------------------------------------------------- back to the image


def model_grid_image(array: np.ndarray, meta: dict[str, Any]) -> sitk.Image:
    """A model-grid array (S, S, S) — or a tensor, leading singleton axes allowed — as a SimpleITK image
    with the model grid's physical geometry."""
    grid = meta["model_grid"]
    if hasattr(array, "detach"):  # a torch tensor, e.g. an attention map straight from the model
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    while arr.ndim > 3 and arr.shape[0] == 1:  # [1,S,S,S] or [1,1,S,S,S]
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.shape != tuple(grid["size"]):
        raise UserError(f"array shape {arr.shape} does not match the model grid {tuple(grid['size'])}",
                        "pass a map produced for this preprocessed case")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(grid["spacing"])
    img.SetOrigin(grid["origin"])
    img.SetDirection(grid["direction"])
    return img


def to_image_grid(array: np.ndarray, meta: dict[str, Any], reference: sitk.Image, *,
                  interpolator: str = "linear") -> sitk.Image:
    """Put a model-grid map (e.g. an attention map) back on the original image grid (zeros outside the crop)."""
    methods = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    if interpolator not in methods:
        raise UserError(f"interpolator {interpolator!r} is unknown", f"use one of {', '.join(methods)}")
    moving = model_grid_image(array, meta)
    if interpolator != "nearest":
        moving = sitk.Cast(moving, sitk.sitkFloat32)
    return sitk.Resample(moving, reference, sitk.Transform(), methods[interpolator], 0.0, moving.GetPixelID())
