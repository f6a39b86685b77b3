"""Tumour masks as DICOM SEG (3D Slicer, OHIF, vendor tools), read with highdicom.

One segment is chosen (by number or label: the manifest's optional `mask_segment` column), and its frames
are placed on the image's grid by their own geometry (ImagePositionPatient of each frame). A SEG drawn on
another series than the image is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from fedsubtype.data.dicom_scan import frames_of, is_seg, read_header, scan_folder
from fedsubtype.errors import ImageReadError

GRID_ATOL_VOXELS = 0.25
SEGMENT_FIX = "add a 'mask_segment' column with the segment's number or label"


def seg_file(path: str | os.PathLike) -> Path | None:
    """The DICOM SEG that `path` names: the file itself, or the only SEG of a folder without image series."""
    path = Path(path)
    if path.is_file():
        try:
            return path if is_seg(read_header(path)) else None
        except ImageReadError:
            return None
    if not path.is_dir():
        return None
    scan = scan_folder(path)
    if scan.series or not scan.seg_files:
        return None
    if len(scan.seg_files) > 1:
        raise ImageReadError(f"folder holds {len(scan.seg_files)} DICOM SEG files", "name one SEG file in 'mask'",
                             where=str(path))
    return Path(scan.seg_files[0])


def _segments(seg: hd.seg.Segmentation) -> dict[int, str]:
    return {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}


def choose_segment(seg: hd.seg.Segmentation, wanted: str | None, where: str) -> int:
    """The segment number asked for (a number or a label, case-insensitive); the only one when not asked."""
    segments = _segments(seg)
    listing = ", ".join(f"{n} '{label}'" for n, label in segments.items())
    if not wanted:
        if len(segments) == 1:
            return next(iter(segments))
        raise ImageReadError(f"SEG holds {len(segments)} segments ({listing}); which one is the tumour?", SEGMENT_FIX,
                             where=where)
    text = wanted.strip()
    if text.isdigit() and int(text) in segments:
        return int(text)
    matches = [n for n, label in segments.items() if label.casefold() == text.casefold()]
    if len(matches) == 1:
        return matches[0]
    raise ImageReadError(f"SEG has no segment '{text}' (it has {listing})", "fix the 'mask_segment' value",
                         where=where)


def _check_reference(seg: hd.seg.Segmentation, image_series_uid: str | None, where: str) -> None:
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence") or []]
    if image_series_uid and referenced and image_series_uid not in referenced:
        raise ImageReadError(f"SEG was drawn on series {referenced[0]}, not on the image's series {image_series_uid}",
                             f"use the SEG of the image series, or set 'image_series_uid' to {referenced[0]}",
                             where=where)


def _frame_segment(pf) -> int:
    item = pf.SegmentIdentificationSequence[0] if pf is not None and "SegmentIdentificationSequence" in pf else None
    return int(item.ReferencedSegmentNumber) if item is not None else 1


def _binary_frames(seg: hd.seg.Segmentation) -> np.ndarray:
    pixels = seg.pixel_array.reshape((-1, int(seg.Rows), int(seg.Columns)))
    if str(seg.SegmentationType).upper() == "FRACTIONAL":
        return (pixels >= 0.5 * float(seg.get("MaximumFractionalValue", 255))).astype(np.uint8)
    return (pixels != 0).astype(np.uint8)


def _paste(out: np.ndarray, plane: np.ndarray, index: np.ndarray, where: str) -> None:
    x, y, z = (int(v) for v in np.round(index))
    if np.max(np.abs(index - np.round(index))) > GRID_ATOL_VOXELS or not 0 <= z < out.shape[0]:
        raise ImageReadError(f"a SEG frame (voxel index {tuple(round(float(v), 2) for v in index)} of the image) "
                             "does not lie on a slice of the image",
                             "export the SEG from this image series (its frames must fall on the image's slices)",
                             where=where)
    rows, cols = out.shape[1:]
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + plane.shape[0], rows), min(x + plane.shape[1], cols)
    if y1 > y0 and x1 > x0:
        out[z, y0:y1, x0:x1] |= plane[y0 - y:y1 - y, x0 - x:x1 - x]


def _check_frame_grid(frame, image: sitk.Image, where: str) -> None:
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    same_axes = np.allclose(frame.orientation, np.concatenate([d[:, 0], d[:, 1]]), atol=1e-3)
    same_pixels = np.allclose(frame.pixel_spacing[::-1], image.GetSpacing()[:2], rtol=1e-3)
    if not (same_axes and same_pixels):
        raise ImageReadError("SEG frames are not on the image's grid (orientation or pixel spacing differ)",
                             "export the SEG from this image series in 3D Slicer/OHIF", where=where)


def read_seg_mask(path: Path, image: sitk.Image, *, image_series_uid: str | None = None,
                  segment: str | None = None) -> sitk.Image:
    """The chosen segment of a DICOM SEG as a binary uint8 mask on `image`'s grid."""
    where = str(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 — highdicom raises many types for a malformed SEG
        raise ImageReadError(f"cannot read DICOM SEG ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})",
                             "re-export the segmentation as DICOM SEG or NIfTI", where=where) from None
    _check_reference(seg, image_series_uid, where)
    number = choose_segment(seg, segment, where)
    frames = frames_of(where, seg)
    if any(f.position is None or f.orientation is None or f.pixel_spacing is None for f in frames):
        raise ImageReadError("SEG frames have no geometry (plane position / orientation / pixel measures)",
                             "re-export the segmentation with its geometry", where=where)
    pixels = _binary_frames(seg)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or [None] * len(frames)
    out = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    for frame, pf in zip(frames, per_frame):
        if _frame_segment(pf) != number:
            continue
        _check_frame_grid(frame, image, where)
        index = np.asarray(image.TransformPhysicalPointToContinuousIndex(frame.position))
        _paste(out, pixels[frame.frame], index, where)
    mask = sitk.GetImageFromArray(out)
    mask.CopyInformation(image)
    return mask
