"""Image I/O: NIfTI, NRRD, MHA/MHD through SimpleITK; DICOM series folders, single and multi-frame files
and DICOM SEG masks through pydicom/highdicom (:mod:`fedsubtype.data.dicom`, :mod:`fedsubtype.data.dicom_seg`).

Geometry (origin, spacing, direction) is always taken from the file, never assumed.
Mask rule used everywhere (validation, preprocessing): every non-zero label is tumour;
a fractional (probability) mask is tumour where it is >= 0.5.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import SimpleITK as sitk

from fedsubtype.data.dicom import DicomImage, read_dicom_file, read_dicom_folder
from fedsubtype.data.dicom_scan import ReadNote, is_dicom_file
from fedsubtype.data.dicom_seg import read_seg_mask, seg_file
from fedsubtype.data.itk_log import captured, install as install_itk_logger
from fedsubtype.errors import ImageReadError
from fedsubtype.data.manifest import Case

log = logging.getLogger(__name__)
install_itk_logger()  # ITK/GDCM messages go through fedsubtype, never raw to the terminal

FILE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Single-file formats read directly; anything else must be a DICOM series folder or a .dcm file."""

SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in FILE_SUFFIXES + (".dcm",):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


@dataclass
class ImageRead:
    """An image, which DICOM series it came from (None for other formats) and what the read found."""

    image: sitk.Image
    summary: str | None = None
    notes: list[ReadNote] = field(default_factory=list)
    series_uid: str | None = None
    dicom: bool = False


def read_image(path: str | os.PathLike, *, series_uid: str | None = None) -> sitk.Image:
    """Read one image with its geometry. A folder (or a DICOM file) is read as a DICOM series.

    When a folder holds several series, `series_uid` picks one; otherwise the series with the
    most slices is taken and the choice is logged (see :func:`choose_dicom_series`).
    """
    return read_image_noted(path, series_uid=series_uid)[0]


def read_image_noted(path: str | os.PathLike, *, series_uid: str | None = None) -> tuple[sitk.Image, str | None]:
    """:func:`read_image` plus a note saying which DICOM series was read (None for single files)."""
    read = read_image_checked(path, series_uid=series_uid)
    return read.image, read.summary


def read_image_checked(path: str | os.PathLike, *, series_uid: str | None = None) -> ImageRead:
    """Read one image and say what the read found: the DICOM series chosen, geometry or ITK warnings."""
    read = _read(Path(path), series_uid)
    if read.summary:
        (log.warning if "others:" in read.summary else log.info)("%s: reading %s", path, read.summary)
    for note in read.notes:
        log.warning("%s: %s", path, note.what)
    return read


def _read(path: Path, series_uid: str | None) -> ImageRead:
    if path.is_dir():
        return _from_dicom(read_dicom_folder(path, series_uid))
    if not path.exists():
        raise ImageReadError("file not found", "check the path (relative paths start at the manifest's folder)", where=str(path))
    suffix = _suffix(path)
    if suffix == ".dcm" or (suffix not in FILE_SUFFIXES and is_dicom_file(path)):
        return _from_dicom(read_dicom_file(path, series_uid))
    if suffix not in FILE_SUFFIXES:
        raise ImageReadError(f"unsupported file type '{suffix or path.name}'",
                             "use NIfTI (.nii/.nii.gz), NRRD, MHA/MHD or a DICOM series folder", where=str(path))
    with captured() as itk_said:
        image = _read_file(path, suffix)
    return ImageRead(image, notes=[ReadNote("warning", f"ITK: {text}") for text in itk_said])


def _from_dicom(read: DicomImage) -> ImageRead:
    return ImageRead(read.image, read.summary, read.notes, read.series_uid, dicom=True)


def _read_file(path: Path, suffix: str) -> sitk.Image:
    try:
        if suffix == ".nii.gz":
            return _read_nifti_gz(path)
        if suffix == ".nii":
            check_nifti_file(path)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read image ({_first_line(exc)})",
                             "the file is truncated or corrupt: re-export or re-download it", where=str(path)) from None


def _scratch_dir() -> str | None:
    """RAM-backed /dev/shm where available (the system temp folder otherwise)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _read_nifti_gz(path: Path) -> sitk.Image:
    """Decompress once while checking (CRC, length, NaN/Inf), then let ITK read the verified bytes:
    faster than ITK's own gzip reader and immune to the file changing between check and read."""
    with tempfile.NamedTemporaryFile(suffix=".nii", dir=_scratch_dir()) as tmp:
        check_nifti_file(path, sink=tmp)
        tmp.flush()
        return sitk.ReadImage(tmp.name)


def _first_line(exc: BaseException) -> str:
    """The informative part of an ITK exception (they span several lines with source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msgs = [ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln]
    msgs = [re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", m) for m in msgs]
    if lines and lines[-1] not in msgs and "ERROR:" not in lines[-1] and not lines[-1].startswith("Exception thrown"):
        msgs.append(lines[-1])
    text = "; ".join(m for m in msgs if m) or (lines[-1] if lines else exc.__class__.__name__)
    return text[:240]


@dataclass(frozen=True)
class _NiftiLayout:
    data_offset: int
    data_bytes: int
    float_dtype: np.dtype | None  # set for float32/float64 data, whose NaN/Inf ITK reads as 0


_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Where the voxels are and how many bytes they take, from a NIfTI-1/-2 header (None if not NIfTI)."""
    if len(header) < 4:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348 and len(header) >= 112:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif sizeof_hdr == 540 and len(header) >= 176:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        ndim = max(0, min(int(dims[0]), 7))
        nvox = int(np.prod([max(1, int(d)) for d in dims[1:1 + ndim]], dtype=np.int64))
        code = _NIFTI_FLOATS.get(int(datatype))
        return _NiftiLayout(vox_offset, nvox * max(1, bitpix // 8), np.dtype(endian + code) if code else None)
    return None


def _decompressed_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, gunzipped when it is gzip; zlib checks every member's CRC and length."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":  # not gzip, whatever the name says (ITK reads such .nii.gz too)
            fh.seek(0)
            while chunk := fh.read(1 << 20):
                yield chunk
            return
        fh.seek(0)
        inflater = zlib.decompressobj(wbits=31)
        while chunk := fh.read(1 << 20):
            while chunk:
                yield inflater.decompress(chunk)
                chunk = b""
                if inflater.eof:
                    chunk = inflater.unused_data
                    if not chunk.strip(b"\0"):
                        return  # trailing zero padding after the last member is tolerated
                    inflater = zlib.decompressobj(wbits=31)
        if not inflater.eof:
            raise EOFError("compressed data ends before the end-of-stream marker")


def check_nifti_file(path: Path, sink: BinaryIO | None = None) -> None:
    """What ITK lets through silently: a truncated file (read zero-padded), a bad gzip CRC, NaN/Inf voxels
    (read as 0). Each is an ImageReadError here, so a case never trains on invented voxels.
    The (decompressed) bytes are also written to `sink` when given."""
    head, layout, total, nonfinite, pending = b"", None, 0, 0, b""
    try:
        for chunk in _decompressed_chunks(path):
            if sink is not None:
                sink.write(chunk)
            start = total
            total += len(chunk)
            if layout is None:
                head += chunk[: 540 - len(head)]
                if len(head) < 540 and total < 540:
                    continue
                layout = _nifti_layout(head)
                if layout is None:
                    raise ImageReadError("not a NIfTI file (bad header)",
                                         "check the file type matches its extension", where=str(path))
            if layout.float_dtype is not None:
                lo = max(0, layout.data_offset - start)
                hi = max(lo, min(len(chunk), layout.data_offset + layout.data_bytes - start))
                data = pending + chunk[lo:hi] if pending else memoryview(chunk)[lo:hi]
                usable = len(data) - len(data) % layout.float_dtype.itemsize
                values = np.frombuffer(data[:usable], dtype=layout.float_dtype)
                nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                pending = bytes(data[usable:])
    except (EOFError, zlib.error) as exc:
        raise ImageReadError(f"compressed file is truncated or corrupt ({exc})",
                             "re-export or re-download the file", where=str(path)) from None
    if layout is None:
        layout = _nifti_layout(head)
        if layout is None:
            raise ImageReadError("not a NIfTI file (bad header)", "check the file type matches its extension", where=str(path))
    expected = layout.data_offset + layout.data_bytes
    if total < expected:
        raise ImageReadError(f"file is truncated ({total} of {expected} bytes)",
                             "re-export or re-download the file", where=str(path))
    if nonfinite:
        raise ImageReadError(f"has {nonfinite} NaN/Inf voxels", "re-export the image; NaN/Inf cannot be normalised",
                             where=str(path))


def write_image(image: sitk.Image, path: str | os.PathLike, *, compression_level: int = -1) -> None:
    """Write an image atomically (temp file in the same folder, then rename), compressed where the format allows."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in FILE_SUFFIXES:
        raise ImageReadError(f"cannot write '{suffix or path.name}'",
                             "write NIfTI (.nii.gz), NRRD or MHA", where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = suffix != ".nii"
    if suffix in (".mhd", ".nhdr"):
        # The header names its data file, so write both under the final names in a temp folder,
        # then move the data file first and the header last.
        tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            sitk.WriteImage(image, str(tmpdir / path.name), compress, compression_level)
            for item in sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name):
                os.replace(item, path.parent / item.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[: -len(suffix)]}.", suffix=suffix)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress, compression_level)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----- geometry ---------------------------------------------------------------------------------


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when two images share size, spacing, origin and direction (within float tolerance)."""
    return not grid_differences(a, b)


def grid_differences(a: sitk.Image, b: sitk.Image) -> list[str]:
    """Which of size / spacing / origin / direction differ between two images."""
    diffs = []
    if a.GetDimension() != b.GetDimension():
        return ["dimension"]
    if a.GetSize() != b.GetSize():
        diffs.append(f"size {a.GetSize()} vs {b.GetSize()}")
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        diffs.append(f"spacing {_fmt(a.GetSpacing())} vs {_fmt(b.GetSpacing())} mm")
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_MM):
        diffs.append(f"origin {_fmt(a.GetOrigin())} vs {_fmt(b.GetOrigin())} mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        diffs.append("direction")
    return diffs


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min, max corner, mm) of the image's voxel footprint."""
    size = np.array(image.GetSize())
    corners = []
    for bits in range(2 ** image.GetDimension()):
        idx = [(size[d] - 0.5) if (bits >> d) & 1 else -0.5 for d in range(image.GetDimension())]
        corners.append(image.TransformContinuousIndexToPhysicalPoint(idx))
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def overlap_fraction(moving: sitk.Image, fixed: sitk.Image) -> float:
    """Fraction of `moving`'s bounding box volume that lies inside `fixed`'s bounding box (0 = disjoint)."""
    lo_m, hi_m = physical_bounds(moving)
    lo_f, hi_f = physical_bounds(fixed)
    inter = np.clip(np.minimum(hi_m, hi_f) - np.maximum(lo_m, lo_f), 0, None)
    vol = float(np.prod(hi_m - lo_m))
    return float(np.prod(inter)) / vol if vol > 0 else 0.0


# ----- volumes and masks ------------------------------------------------------------------------


def as_volume(image: sitk.Image, where: str) -> sitk.Image:
    """A scalar 3D image: a 4D image with a single time point is reduced to 3D; anything else is an error."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel",
                             "export a single-channel (grey-level) volume", where=where)
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, 0])
        dim = 3
    if dim == 2 or (dim == 3 and min(image.GetSize()) == 1):
        raise ImageReadError(f"image is 2D (size {image.GetSize()})",
                             "give the whole 3D volume, not a single slice", where=where)
    if dim != 3:
        raise ImageReadError(f"image is {dim}D (size {image.GetSize()})",
                             "give one 3D volume (one post-contrast phase), not a time series", where=where)
    return image


def mask_labels(mask: sitk.Image) -> np.ndarray:
    """Distinct non-zero values of a mask."""
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    return values[values != 0]


def binarize_mask(mask: sitk.Image) -> sitk.Image:
    """Tumour = every non-zero label (or >= 0.5 in a fractional mask), as uint8 0/1 on the same grid."""
    arr = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(arr.dtype, np.floating) and np.any((arr != np.round(arr)) & np.isfinite(arr)):
        binary = (arr >= 0.5).astype(np.uint8)
    else:
        binary = (arr != 0).astype(np.uint8)
    out = sitk.GetImageFromArray(binary)
    out.CopyInformation(mask)
    return out


def mask_on_image_grid(mask: sitk.Image, image: sitk.Image, where: str) -> sitk.Image:
    """The binary mask on the image's grid: copied when grids match, resampled nearest-neighbour when
    they overlap physically, an error when they do not overlap."""
    binary = binarize_mask(mask)
    if same_grid(binary, image):
        binary.CopyInformation(image)
        return binary
    if overlap_fraction(binary, image) <= 0.0:
        raise ImageReadError("mask does not overlap the image in physical space",
                             "use the mask drawn on this image (check origin and orientation)", where=where)
    return sitk.Resample(binary, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def read_case_mask(case: Case, image: sitk.Image, image_series_uid: str | None) -> sitk.Image:
    """The case's mask as read (not yet on the image grid): a DICOM SEG is placed on `image`'s grid by its
    frames' geometry (segment from the optional `mask_segment` column); other formats are read as images."""
    where = f"{case.case_id}: mask {case.mask}"
    seg = seg_file(case.mask)
    if seg is not None:
        return read_seg_mask(seg, image, image_series_uid=image_series_uid,
                             segment=case.extra.get("mask_segment") or None)
    return as_volume(read_image(case.mask, series_uid=case.extra.get("mask_series_uid") or None), where)


def load_case_images(case: Case) -> tuple[sitk.Image, sitk.Image]:
    """Image as float32 3D and the tumour mask as binary uint8 on the image grid (what preprocessing uses).

    Optional manifest columns `image_series_uid` / `mask_series_uid` select DICOM series; `mask_segment`
    selects the segment of a DICOM SEG mask.
    """
    read = read_image_checked(case.image, series_uid=case.extra.get("image_series_uid") or None)
    image = as_volume(read.image, f"{case.case_id}: image {case.image}")
    mask = read_case_mask(case, image, read.series_uid)
    mask = mask_on_image_grid(mask, image, f"{case.case_id}: mask {case.mask}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise ImageReadError(f"has {values.size - np.count_nonzero(np.isfinite(values))} NaN/Inf voxels",
                             "re-export the image; NaN/Inf cannot be normalised", where=f"{case.case_id}: image {case.image}")
    return image, mask
