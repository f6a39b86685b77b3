"""DICOM images read through pydicom: classic series folders, single files, enhanced multi-frame files and
compressed transfer syntaxes (JPEG-LS, JPEG 2000, RLE, JPEG lossless via pylibjpeg / pyjpegls).

The geometry comes from the headers (checked by :mod:`fedsubtype.data.dicom_geometry`), the voxels from
pydicom's decoders with the modality rescale (slope / intercept) applied, per frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from fedsubtype.data.dicom_geometry import StackPlan, plan_stack
from fedsubtype.data.dicom_scan import (DicomFrame, FolderScan, ReadNote, frames_of, is_seg, read_header,
                                        scan_folder)
from fedsubtype.errors import ImageReadError

REEXPORT_FIX = "re-export the series uncompressed (Explicit VR Little Endian) or as JPEG-LS, JPEG 2000 or RLE lossless"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder: its SeriesInstanceUID and its files."""

    uid: str
    files: tuple[str, ...]


@dataclass
class DicomImage:
    """A DICOM volume, which series it came from, and what the read found (one-line notes)."""

    image: sitk.Image
    series_uid: str
    summary: str
    notes: list[ReadNote] = field(default_factory=list)
    frame_of_reference: str = ""


def _series_list(scan: FolderScan) -> list[DicomSeries]:
    found = [DicomSeries(uid, tuple(dict.fromkeys(f.path for f in frames))) for uid, frames in scan.series.items()]
    return sorted(found, key=lambda s: (-len(s.files), s.uid))


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM image series in `folder` (not recursive), largest first, then by UID."""
    return _series_list(scan_folder(folder))


def _no_series_error(folder: Path, scan: FolderScan) -> ImageReadError:
    if scan.seg_files:
        return ImageReadError("folder holds a DICOM SEG (a segmentation) but no image series",
                              "name the SEG file in the 'mask' column and the image series folder in 'image'",
                              where=str(folder))
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    fix = (f"point at the subfolder that holds the slices (it has: {', '.join(subfolders[:5])})" if subfolders
           else "point the manifest at a NIfTI/NRRD/MHA file or at a folder of DICOM slices")
    return ImageReadError("folder holds no DICOM series", fix, where=str(folder))


def _choose(folder: Path, scan: FolderScan, series_uid: str | None) -> tuple[DicomSeries, str]:
    series = _series_list(scan)
    if not series:
        raise _no_series_error(folder, scan)
    if series_uid:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise ImageReadError(f"no DICOM series with UID {series_uid}",
                                 f"use one of: {', '.join(s.uid for s in series)}", where=str(folder))
        return chosen[0], f"DICOM series {chosen[0].uid} ({len(chosen[0].files)} slices) as requested"
    pick = series[0]
    note = f"DICOM series {pick.uid} ({len(pick.files)} slices)"
    if len(series) > 1:
        others = ", ".join(f"{s.uid} ({len(s.files)})" for s in series[1:])
        note += f", the largest of {len(series)} series; others: {others}"
    return pick, note


def choose_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> tuple[DicomSeries, str]:
    """Pick a series of a DICOM folder: the given UID, else the one with most slices; return it and a note."""
    folder = Path(folder)
    return _choose(folder, scan_folder(folder), series_uid)


def check_decodable(transfer_syntax: str, where: str) -> None:
    """One ImageReadError line naming a transfer syntax that no installed decoder reads."""
    if not transfer_syntax:
        return
    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageReadError(f"transfer syntax {uid.name} ({uid}) is not supported", REEXPORT_FIX, where=where) from None
    if not decoder.is_available:
        raise ImageReadError(f"transfer syntax {uid.name} ({uid}) needs a decoder that is not installed",
                             "reinstall fedsubtype (pip install fedsubtype) to get pylibjpeg and pyjpegls, "
                             f"or {REEXPORT_FIX[0].lower()}{REEXPORT_FIX[1:]}", where=where)


def _rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: classic attributes, else the Pixel Value Transformation group."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    groups = [g for g in (ds.get("PerFrameFunctionalGroupsSequence") or [None])[frame:frame + 1]]
    groups += list(ds.get("SharedFunctionalGroupsSequence") or [])
    for g in groups:
        item = g.get("PixelValueTransformationSequence") if g is not None else None
        if item:
            return float(item[0].get("RescaleSlope", 1) or 1), float(item[0].get("RescaleIntercept", 0) or 0)
    return 1.0, 0.0


def _decode_file(path: str, where: str) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    check_decodable(str(ds.file_meta.get("TransferSyntaxUID", "")), where)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageReadError(f"is a colour image ({ds.SamplesPerPixel} samples per pixel)",
                             "export a single-channel (grey-level) series", where=where)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 — decoders raise many types; one line names the failure
        uid = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        raise ImageReadError(f"cannot decode pixel data ({uid.name}: {str(exc).splitlines()[0][:160]})",
                             REEXPORT_FIX, where=f"{where} ({Path(path).name})") from None
    return ds, arr.reshape((-1, *arr.shape[-2:]))


def _voxels(plan: StackPlan, where: str) -> np.ndarray:
    """The frames' pixels stacked in plan order (z, rows, columns), rescaled where the headers say so."""
    decoded: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}
    planes, transforms = [], []
    for f in plan.frames:
        if f.path not in decoded:
            decoded[f.path] = _decode_file(f.path, where)
        ds, arr = decoded[f.path]
        planes.append(arr[f.frame])
        transforms.append(_rescale(ds, f.frame))
    volume = np.stack(planes)
    if all(t == (1.0, 0.0) for t in transforms):
        return volume
    slopes, intercepts = (np.array(v, dtype=np.float64)[:, None, None] for v in zip(*transforms))
    return (volume * slopes + intercepts).astype(np.float32)


def _resample_uniform(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation along z from uneven slice positions onto as many evenly spaced ones."""
    targets = np.linspace(positions[0], positions[-1], len(positions))
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    w = ((targets - positions[lower]) / (positions[upper] - positions[lower]))[:, None, None]
    vol = volume.astype(np.float32)
    return ((1 - w) * vol[lower] + w * vol[upper]).astype(np.float32)


def volume_from_frames(frames: list[DicomFrame], where: str) -> tuple[sitk.Image, list[ReadNote]]:
    """Check the frames' geometry, decode them, and return the volume with its notes."""
    for ts in sorted({f.transfer_syntax for f in frames}):
        check_decodable(ts, where)
    plan = plan_stack(frames, where)
    volume = _voxels(plan, where)
    if plan.resample:
        volume = _resample_uniform(volume, plan.positions)
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(plan.origin)
    image.SetSpacing(plan.spacing)
    image.SetDirection(plan.direction)
    return image, plan.notes


def _unique_instances(frames: list[DicomFrame], prefer: str | None) -> tuple[list[DicomFrame], list[ReadNote]]:
    """One frame per (SOPInstanceUID, frame): copies of a slice (e.g. in other transfer syntaxes) are left out,
    keeping the `prefer` file's copy."""
    ordered = sorted(frames, key=lambda f: f.path != prefer)
    seen: dict[tuple[str, int], DicomFrame] = {}
    for f in ordered:
        seen.setdefault((f.sop_instance or f.path, f.frame), f)
    unique = [f for f in frames if seen[(f.sop_instance or f.path, f.frame)] is f]
    copies = len({f.path for f in frames}) - len({f.path for f in unique})
    notes = [ReadNote("warning", f"{copies} file(s) repeat slices of the series (same SOPInstanceUID); read one copy",
                      "keep one copy of each slice in the folder to silence this")] if copies else []
    return unique, notes


def read_dicom_folder(folder: Path, series_uid: str | None = None, scan: FolderScan | None = None,
                      prefer: str | None = None) -> DicomImage:
    """The chosen series of a folder (see :func:`choose_dicom_series`) as a volume."""
    scan = scan or scan_folder(folder)
    pick, summary = _choose(folder, scan, series_uid)
    frames, notes = _unique_instances(scan.series[pick.uid], prefer)
    try:
        image, geometry_notes = volume_from_frames(frames, str(folder))
    except ImageReadError as exc:
        others = [s for s in _series_list(scan) if s.uid != pick.uid]
        if not others:
            raise
        listing = ", ".join(f"{s.uid} ({len(s.files)})" for s in others[:4])
        raise ImageReadError(f"series {pick.uid}: {exc.what}",
                             f"{exc.fix}; this folder also holds {listing}", where=exc.where) from None
    return DicomImage(image, pick.uid, summary, notes + geometry_notes, _frame_of_reference(pick.files[0]))


def _frame_of_reference(path: str) -> str:
    return str(read_header(path).get("FrameOfReferenceUID", ""))


def read_dicom_file(path: Path, series_uid: str | None = None) -> DicomImage:
    """One DICOM file: an enhanced multi-frame file is a volume by itself; a classic slice reads its series."""
    header = read_header(path)
    if is_seg(header):
        raise ImageReadError("is a DICOM SEG (a segmentation), not an image",
                             "name it in the 'mask' column; 'image' names the series it was drawn on", where=str(path))
    uid = str(header.get("SeriesInstanceUID", ""))
    frames = frames_of(str(path), header)
    if frames[0].multiframe:
        image, notes = volume_from_frames(frames, str(path))
        return DicomImage(image, uid, f"DICOM multi-frame file ({len(frames)} frames)", notes,
                          str(header.get("FrameOfReferenceUID", "")))
    scan = scan_folder(path.parent)
    read = read_dicom_folder(path.parent, series_uid or uid, scan, prefer=str(path))
    n_files = len({f.sop_instance or f.path for f in scan.series.get(read.series_uid, [])})
    if n_files > 1:
        read.notes.insert(0, ReadNote("warning", f"names one file of a {n_files}-slice DICOM series; read the whole "
                                                 "series from its folder",
                                      f"put the folder {path.parent} in the manifest instead of one of its files"))
    return read
