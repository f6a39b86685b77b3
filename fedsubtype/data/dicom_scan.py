"""DICOM headers without pixels (pydicom, stop_before_pixels): one `DicomFrame` per 2D frame.

A classic series gives one frame a file; an enhanced multi-frame file gives one frame per entry of its
PerFrameFunctionalGroupsSequence. Geometry checks (:mod:`fedsubtype.data.dicom_geometry`) and reads
(:mod:`fedsubtype.data.dicom`) work on these frames alike.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fedsubtype.errors import ImageReadError

# pydicom warns (raw, to stderr) about header quirks it reads anyway; what matters is reported by fedsubtype.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NON_IMAGE_MODALITIES = ("SEG", "SR", "RTSTRUCT", "PR", "KO", "REG", "RTPLAN", "RTDOSE")


@dataclass(frozen=True)
class ReadNote:
    """Something a read did or found that the user should hear about, in fedsubtype's one-line form."""

    severity: str  # "error" or "warning"
    what: str
    fix: str = ""


@dataclass(frozen=True)
class DicomFrame:
    """One 2D frame of a DICOM image: where its pixels are and where it lies in patient space (mm, LPS)."""

    path: str
    frame: int  # index in a multi-frame file; 0 for a classic slice
    series_uid: str
    position: tuple[float, ...] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    rows: int
    columns: int
    localizer: bool
    acquisition: str  # AcquisitionNumber / temporal position: tells acquisitions apart at one position
    transfer_syntax: str
    multiframe: bool
    instance: int = 0
    sop_instance: str = ""

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=float)
        return np.cross(o[:3], o[3:])


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble (PACS exports often have no file extension)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> Dataset:
    """The file's header without pixel data; an ImageReadError when it is no DICOM file."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise ImageReadError(f"cannot read DICOM header ({exc.__class__.__name__}: {str(exc)[:120]})",
                             "check the file is a complete DICOM file", where=str(path)) from None


def is_seg(header: Dataset) -> bool:
    """True for a DICOM Segmentation object (a mask, not an image)."""
    return str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS or header.get("Modality") == "SEG"


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and np.all(np.isfinite(values)) else None


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, seq: str, attr: str):
    """An attribute of a functional group, per-frame first, then shared."""
    for group in (per_frame, shared):
        item = _item(group, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _is_localizer(ds: Dataset) -> bool:
    kinds = [str(v).upper() for v in (ds.get("ImageType") or ())]
    return "LOCALIZER" in kinds or "SCOUT" in kinds


def frames_of(path: str, ds: Dataset) -> list[DicomFrame]:
    """Every frame of one file with its geometry (classic single-frame or enhanced multi-frame)."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    common = dict(path=path, series_uid=str(ds.get("SeriesInstanceUID", "")), rows=int(ds.get("Rows", 0) or 0),
                  columns=int(ds.get("Columns", 0) or 0), localizer=_is_localizer(ds), transfer_syntax=ts,
                  instance=int(ds.get("InstanceNumber", 0) or 0), sop_instance=str(ds.get("SOPInstanceUID", "")))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames == 1 and not per_frame_groups:
        return [DicomFrame(frame=0, position=_floats(ds.get("ImagePositionPatient"), 3),
                           orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                           pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
                           acquisition=str(ds.get("AcquisitionNumber", "")), multiframe=False, **common)]
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    frames = []
    for i in range(n_frames):
        pf = per_frame_groups[i] if per_frame_groups and i < len(per_frame_groups) else None
        temporal = _functional(pf, None, "FrameContentSequence", "TemporalPositionIndex")
        stack = _functional(pf, None, "FrameContentSequence", "StackID")
        frames.append(DicomFrame(
            frame=i, multiframe=True,
            position=_floats(_functional(pf, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_functional(pf, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(_functional(pf, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
            acquisition="/".join(str(v) for v in (temporal, stack) if v not in (None, "")), **common))
    return frames


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds: image frames by series UID, and the SEG files found beside them."""

    series: dict[str, list[DicomFrame]]
    seg_files: tuple[str, ...]
    unreadable: int


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """Read the header of every DICOM file of a folder (not recursive); non-DICOM files are skipped."""
    series: dict[str, list[DicomFrame]] = {}
    segs: list[str] = []
    unreadable = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.upper() == "DICOMDIR":
            continue
        if not (entry.name.lower().endswith(".dcm") or is_dicom_file(Path(entry.path))):
            continue
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 — a broken file beside the series is counted, not fatal
            unreadable += 1
            continue
        if is_seg(ds):
            segs.append(entry.path)
        elif "Rows" in ds and ds.get("Modality") not in NON_IMAGE_MODALITIES:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).extend(frames_of(entry.path, ds))
    return FolderScan(series, tuple(segs), unreadable)
