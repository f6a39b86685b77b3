"""Is a set of DICOM frames one volume? Checked from the geometry itself: ImagePositionPatient projected
on the slice normal (from ImageOrientationPatient). Each defect is one line with its fix.

Slice spacing that varies by at most `UNIFORM_RTOL` of the mean is uniform (rounding in the headers);
up to `RESAMPLE_RTOL` the stack is resampled (linear, along the slice normal) onto a uniform grid and a
warning says so; beyond that, or with missing slices, the series is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedsubtype.data.dicom_scan import DicomFrame, ReadNote
from fedsubtype.errors import ImageReadError

ORIENTATION_ATOL = 1e-3
UNIFORM_RTOL = 0.01
RESAMPLE_RTOL = 0.10
SERIES_FIX = "point the manifest at the series of the post-contrast volume (an 'image_series_uid' column chooses one)"


@dataclass
class StackPlan:
    """Frames of one volume sorted along the slice normal, with the grid they are read onto."""

    frames: list[DicomFrame]
    positions: np.ndarray  # mm along the normal, ascending, one per frame
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, columns = row cosines, column cosines, normal
    resample: bool = False
    notes: list[ReadNote] = field(default_factory=list)


def _orientation_groups(frames: list[DicomFrame]) -> list[list[DicomFrame]]:
    groups: list[list[DicomFrame]] = []
    for f in frames:
        for g in groups:
            if np.allclose(g[0].orientation, f.orientation, atol=ORIENTATION_ATOL):
                g.append(f)
                break
        else:
            groups.append([f])
    return sorted(groups, key=len, reverse=True)


def _main_orientation(frames: list[DicomFrame], where: str, notes: list[ReadNote]) -> list[DicomFrame]:
    """The frames of the stack, localizers (by ImageType or by a minority orientation) left out."""
    stack = [f for f in frames if not f.localizer]
    if not stack:
        raise ImageReadError(f"every one of the {len(frames)} slices is a localizer (scout)", SERIES_FIX, where=where)
    groups = _orientation_groups(stack)
    main = groups[0]
    if len(groups) > 1 and (len(main) < 3 or len(main) <= len(groups[1])):
        raise ImageReadError(f"slices lie in {len(groups)} different orientations ({len(stack)} slices: localizer or "
                             "projection images, not one volume)", SERIES_FIX, where=where)
    dropped = len(frames) - len(main)
    if dropped:
        notes.append(ReadNote("warning", f"{dropped} localizer slice(s) (ImageType LOCALIZER or another orientation) "
                                         f"left out; read the {len(main)} slices of the main stack",
                              "re-export the series without localizers to silence this"))
    return main


def _check_same_raster(frames: list[DicomFrame], where: str) -> None:
    sizes = Counter((f.rows, f.columns) for f in frames)
    spacings = {tuple(round(v, 4) for v in f.pixel_spacing) for f in frames}
    if len(sizes) > 1 or len(spacings) > 1:
        raise ImageReadError(f"slices differ in size or pixel spacing ({len(sizes)} sizes, {len(spacings)} spacings)",
                             "re-export the series; its slices do not form one grid", where=where)


def _check_duplicates(frames: list[DicomFrame], d: np.ndarray, where: str) -> None:
    dup = np.flatnonzero(np.diff(d) < 1e-3)
    if not len(dup):
        return
    acquisitions = sorted({f.acquisition for f in frames if f.acquisition})
    if len(acquisitions) > 1:
        raise ImageReadError(f"holds {len(acquisitions)} acquisitions at the same slice positions (acquisition "
                             f"{', '.join(acquisitions[:4])}: several phases or repeats in one series)",
                             "export each acquisition (one post-contrast phase) as its own series and name it "
                             "with 'image_series_uid'", where=where)
    raise ImageReadError(f"{len(dup)} slice(s) share a position with another slice",
                         "re-export the series; duplicated slices cannot be stacked", where=where)


def _spacing_notes(d: np.ndarray, where: str) -> tuple[float, bool, list[ReadNote]]:
    """Slice spacing (mean), whether to resample, and the warning when the spacing is uneven but tolerable."""
    gaps = np.diff(d)
    if not len(gaps):
        return 1.0, False, []
    typical = float(np.median(gaps))
    mean = float((d[-1] - d[0]) / (len(d) - 1))
    big = gaps > 1.5 * typical
    if big.any():
        missing = int(sum(round(g / typical) - 1 for g in gaps[big]))
        at = ", ".join(f"{d[i]:.1f}–{d[i + 1]:.1f}" for i in np.flatnonzero(big)[:3])
        raise ImageReadError(f"about {missing} slice(s) missing (gap at {at} mm along the slice normal; slices are "
                             f"{typical:.3g} mm apart elsewhere)",
                             "re-export the complete series from the PACS, or choose another series with "
                             "'image_series_uid'", where=where)
    deviation = float(np.max(np.abs(gaps - mean)) / mean)
    if deviation <= UNIFORM_RTOL:
        return mean, False, []
    span = f"{gaps.min():.3g}–{gaps.max():.3g} mm"
    if deviation > RESAMPLE_RTOL:
        raise ImageReadError(f"slice spacing is uneven ({span}, {deviation:.0%} off the mean {mean:.3g} mm; "
                             f"fedsubtype resamples up to {RESAMPLE_RTOL:.0%})",
                             "re-export the series with even slice spacing (or resample it to a uniform grid)",
                             where=where)
    note = ReadNote("warning", f"slice spacing is uneven ({span}, up to {deviation:.0%} off the mean; tolerance "
                               f"{RESAMPLE_RTOL:.0%}); resampled linearly onto a uniform {mean:.3g} mm grid",
                    "re-export the series with even slice spacing to silence this")
    return mean, True, [note]


def plan_stack(frames: list[DicomFrame], where: str) -> StackPlan:
    """Check that `frames` form one volume and say how to read it; every defect raises one ImageReadError line."""
    kind = "multi-frame file" if frames and frames[0].multiframe else "series"
    missing = sum(f.position is None or f.orientation is None or f.pixel_spacing is None for f in frames)
    if missing:
        where_tags = ("per-frame functional groups" if kind == "multi-frame file"
                      else "ImagePositionPatient / ImageOrientationPatient / PixelSpacing")
        raise ImageReadError(f"{kind} has no slice geometry in {missing} of {len(frames)} frames ({where_tags} missing)",
                             "re-export it from the PACS with its geometry (without it the voxels cannot be placed)",
                             where=where)
    notes: list[ReadNote] = []
    stack = _main_orientation(frames, where, notes)
    _check_same_raster(stack, where)
    normal = stack[0].normal
    order = np.argsort([float(np.dot(normal, f.position)) for f in stack], kind="stable")
    stack = [stack[i] for i in order]
    d = np.array([float(np.dot(normal, f.position)) for f in stack])
    _check_duplicates(stack, d, where)
    z, resample, spacing_notes = _spacing_notes(d, where)
    o = np.asarray(stack[0].orientation, dtype=float)
    direction = np.column_stack([o[:3], o[3:], normal]).ravel()
    row_mm, col_mm = stack[0].pixel_spacing
    return StackPlan(stack, d, tuple(stack[0].position), (col_mm, row_mm, z), tuple(direction), resample,
                     notes + spacing_notes)
