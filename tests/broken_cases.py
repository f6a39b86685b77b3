"""Builders of real image files and manifests for tests, including a corpus of broken cases.

Every builder writes real files through SimpleITK so the code under test reads them the way it
reads a user's data.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

SIZE = (20, 22, 16)  # x, y, z voxels: small enough for fast tests
SPACING = (0.8, 0.8, 2.0)


def make_image(size=SIZE, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None, seed: int = 0,
               dtype=np.float32) -> sitk.Image:
    """A noisy volume with a bright blob in the middle, on an anisotropic grid."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(100.0, 10.0, size=size[::-1])
    zz, yy, xx = np.indices(size[::-1])
    c = [s / 2 for s in size[::-1]]
    blob = ((zz - c[0]) ** 2 / 9 + (yy - c[1]) ** 2 / 16 + (xx - c[2]) ** 2 / 16) <= 1
    arr[blob] += 200.0
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def make_mask(like: sitk.Image, center=None, radius_vox=(4, 4, 2), label: int = 1) -> sitk.Image:
    """An ellipsoid tumour mask (uint8) on the grid of `like`; centre in voxel (x, y, z), default the middle."""
    size = like.GetSize()
    center = center or tuple(s // 2 for s in size)
    zz, yy, xx = np.indices(size[::-1])
    inside = (((xx - center[0]) / radius_vox[0]) ** 2 + ((yy - center[1]) / radius_vox[1]) ** 2
              + ((zz - center[2]) / radius_vox[2]) ** 2) <= 1
    mask = sitk.GetImageFromArray((inside * label).astype(np.uint8))
    mask.CopyInformation(like)
    return mask


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str | None = None,
                       description: str = "post-contrast") -> str:
    """Write a 3D image as a DICOM series (one int16 file a slice, with the geometry tags); return its UID."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(sitk.RescaleIntensity(image, 0, 4000), sitk.sitkInt16)
    series_uid = series_uid or "1.2.826.0.1.3680043.2.1125." + str(int(hashlib.sha1(str(folder).encode()).hexdigest()[:12], 16))
    direction = img.GetDirection()
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    common = [
        ("0008|0031", now_time), ("0008|0021", now_date), ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000e", series_uid), ("0020|000d", series_uid + ".1"), ("0008|0060", "MR"),
        ("0008|103e", description), ("0010|0020", "PHANTOM"),
        ("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6],
                                             direction[1], direction[4], direction[7])))),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    prefix = series_uid.rsplit(".", 1)[-1]
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{i + 1}")
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i)))))
        sl.SetMetaData("0020|0013", str(i + 1))
        sl.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"{prefix}_{i:03d}.dcm"))
        writer.Execute(sl)
    return series_uid


# ----- the corpus of broken cases -------------------------------------------------------------------

HEADER = "case_id,image,mask,site,er,pr,her2,ki67\n"


def _write(img: sitk.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path.name


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _good(d: Path, cid: str) -> tuple[str, str]:
    img = make_image(seed=hash(cid) % 1000)
    return _write(img, d / f"{cid}.nii.gz"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")


def _with_image(arr_fn: Callable[[np.ndarray], np.ndarray], suffix: str = ".nii.gz"):
    def build(d: Path, cid: str) -> tuple[str, str]:
        img = make_image()
        arr = arr_fn(sitk.GetArrayFromImage(img))
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(img)
        return _write(bad, d / f"{cid}{suffix}"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")
    return build


def _with_mask(mask_fn: Callable[[sitk.Image], sitk.Image]):
    def build(d: Path, cid: str) -> tuple[str, str]:
        img = make_image()
        return _write(img, d / f"{cid}.nii.gz"), _write(mask_fn(img), d / f"{cid}_mask.nii.gz")
    return build


def _missing_file(d: Path, cid: str) -> tuple[str, str]:
    image, mask = _good(d, cid)
    (d / image).unlink()
    return image, mask


def _garbage(d: Path, cid: str) -> tuple[str, str]:
    image, mask = _good(d, cid)
    (d / image).write_bytes(b"this is not an image\n" * 50)
    return image, mask


def _plain_named_gz(d: Path, cid: str) -> tuple[str, str]:
    """An uncompressed NIfTI saved under a .nii.gz name (common, and readable)."""
    img = make_image()
    sitk.WriteImage(img, str(d / f"{cid}.nii"))
    (d / f"{cid}.nii").rename(d / f"{cid}.nii.gz")
    return f"{cid}.nii.gz", _write(make_mask(img), d / f"{cid}_mask.nii.gz")


def _truncated_gz(d: Path, cid: str) -> tuple[str, str]:
    image, mask = _good(d, cid)
    _cut_in_half(d / image)
    return image, mask


def _corrupt_gz(d: Path, cid: str) -> tuple[str, str]:
    image, mask = _good(d, cid)
    data = bytearray((d / image).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 32] = bytes(32)
    (d / image).write_bytes(bytes(data))
    return image, mask


def _truncated_nii(d: Path, cid: str) -> tuple[str, str]:
    img = make_image()
    image = _write(img, d / f"{cid}.nii")
    _cut_in_half(d / image)
    return image, _write(make_mask(img), d / f"{cid}_mask.nii.gz")


def _image_2d(d: Path, cid: str) -> tuple[str, str]:
    img = make_image()
    return _write(img[:, :, 8], d / f"{cid}.nii.gz"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")


def _image_4d(frames: int):
    def build(d: Path, cid: str) -> tuple[str, str]:
        img = make_image()
        vol = sitk.JoinSeries([img] * frames)  # NRRD keeps a size-1 4th axis (ITK's NIfTI reader drops it)
        return _write(vol, d / f"{cid}.nrrd"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")
    return build


def _vector_image(d: Path, cid: str) -> tuple[str, str]:
    img = make_image()
    return _write(sitk.Compose(img, img), d / f"{cid}.nii.gz"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")


def _spacing(spacing):
    def build(d: Path, cid: str) -> tuple[str, str]:
        img = make_image(spacing=spacing)
        return _write(img, d / f"{cid}.nii.gz"), _write(make_mask(img), d / f"{cid}_mask.nii.gz")
    return build


def _nan(arr: np.ndarray) -> np.ndarray:
    arr[3, 4, 5] = np.nan
    return arr


def _inf(arr: np.ndarray) -> np.ndarray:
    arr[1, 1, 1] = np.inf
    return arr


def _multilabel(img: sitk.Image) -> sitk.Image:
    return sitk.Maximum(make_mask(img, label=1), make_mask(img, radius_vox=(2, 2, 1), label=2))


def _fractional(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(make_mask(img), sitk.sitkFloat32) * 0.8


def _negative(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(make_mask(img), sitk.sitkInt16) - 1


def _regrid(spacing=None, origin_shift=(0.0, 0.0, 0.0), size=None, flip_x=False):
    """A mask of the same physical ellipsoid drawn on another grid (resampled from the image grid)."""
    def fn(img: sitk.Image) -> sitk.Image:
        ref = sitk.Image(size or img.GetSize(), sitk.sitkUInt8)
        ref.SetSpacing(spacing or img.GetSpacing())
        ref.SetOrigin(tuple(o + s for o, s in zip(img.GetOrigin(), origin_shift)))
        direction = list(img.GetDirection())
        if flip_x:
            direction[0] = -direction[0]
            ref.SetOrigin(img.TransformIndexToPhysicalPoint((img.GetSize()[0] - 1, 0, 0)))
        ref.SetDirection(direction)
        return sitk.Resample(make_mask(img), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return fn


def _far_away(img: sitk.Image) -> sitk.Image:
    mask = make_mask(img)
    mask.SetOrigin((500.0, 500.0, 500.0))
    return mask


def _tumour_outside(img: sitk.Image) -> sitk.Image:
    """A mask grid that overlaps the image but whose tumour lies beyond the image's edge."""
    big = sitk.Image([s * 3 for s in img.GetSize()], sitk.sitkUInt8)
    big.SetSpacing(img.GetSpacing())
    big.SetOrigin(img.GetOrigin())
    big[50:55, 50:55, 36:40] = 1
    return big


def _empty(img: sitk.Image) -> sitk.Image:
    return make_mask(img) * 0


def _at_border(img: sitk.Image) -> sitk.Image:
    return make_mask(img, center=(1, img.GetSize()[1] // 2, img.GetSize()[2] // 2))


def _tiny(img: sitk.Image) -> sitk.Image:
    mask = make_mask(img) * 0
    mask[10, 10, 8] = 1
    return mask


def _two_dicom_series(d: Path, cid: str) -> tuple[str, str]:
    img = make_image(size=(20, 22, 16))
    folder = d / f"{cid}_dicom"
    write_dicom_series(img, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.1")
    write_dicom_series(make_image(size=(20, 22, 6), seed=5), folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2",
                       description="localizer")
    return folder.name, _write(make_mask(img), d / f"{cid}_mask.nii.gz")


# case_id -> (builder, expected severity or None when clean, text expected in the problem line)
CORPUS: dict[str, tuple[Callable[[Path, str], tuple[str, str]], str | None, str]] = {
    "good": (_good, None, ""),
    "missing_file": (_missing_file, "error", "file not found"),
    "garbage": (_garbage, "error", "not a NIfTI file"),
    "plain_nii_named_gz": (_plain_named_gz, None, ""),
    "truncated_gz": (_truncated_gz, "error", "truncated"),
    "corrupt_gz": (_corrupt_gz, "error", "corrupt"),
    "truncated_nii": (_truncated_nii, "error", "truncated"),
    "image_2d": (_image_2d, "error", "2D"),
    "image_4d": (_image_4d(3), "error", "4D"),
    "image_4d_single": (_image_4d(1), "warning", "single time point"),
    "vector_image": (_vector_image, "error", "2 components"),
    "tiny_spacing": (_spacing((0.05, 0.05, 0.05)), "error", "spacing"),
    "huge_spacing": (_spacing((0.8, 0.8, 15.0)), "error", "spacing"),
    # ITK reads NaN/Inf in NIfTI as 0 (fedsubtype scans the file itself); NRRD and MHA keep them
    "nan_nifti": (_with_image(_nan), "error", "NaN/Inf"),
    "inf_nifti_uncompressed": (_with_image(_inf, ".nii"), "error", "NaN/Inf"),
    "nan_voxels": (_with_image(_nan, ".nrrd"), "error", "NaN/Inf"),
    "inf_voxels": (_with_image(_inf, ".mha"), "error", "NaN/Inf"),
    "constant": (_with_image(lambda a: np.full_like(a, 7.0)), "error", "constant"),
    "empty_mask": (_with_mask(_empty), "error", "mask is empty"),
    "multilabel": (_with_mask(_multilabel), "warning", "labels 1, 2"),
    "fractional_mask": (_with_mask(_fractional), "warning", "fractional"),
    "negative_mask": (_with_mask(_negative), "error", "negative"),
    "mask_spacing": (_with_mask(_regrid(spacing=(0.4, 0.4, 1.0), size=(40, 44, 32))), "warning", "spacing"),
    "mask_origin": (_with_mask(_regrid(origin_shift=(0.8, 0.0, 0.0))), "warning", "origin"),
    "mask_size": (_with_mask(_regrid(size=(24, 22, 16))), "warning", "size"),
    "mask_direction": (_with_mask(_regrid(flip_x=True)), "warning", "direction"),
    "mask_far_away": (_with_mask(_far_away), "error", "does not overlap"),
    "tumour_outside": (_with_mask(_tumour_outside), "error", "outside the image"),
    "at_border": (_with_mask(_at_border), "warning", "touches the volume border"),
    "tiny_tumour": (_with_mask(_tiny), "warning", "only 1 voxels"),
    "two_dicom_series": (_two_dicom_series, "warning", "several DICOM series"),
}


def build_corpus(root: Path, names: list[str] | None = None) -> Path:
    """Write the cases of CORPUS (all, or `names`) under root/ and a manifest naming them; return its path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names or CORPUS):
        image, mask = CORPUS[name][0](root / "cases", name)
        rows.append(f"{name},cases/{image},cases/{mask},site{i % 3},{i % 2},{(i + 1) % 2},,{(i * 7) % 100}\n")
    manifest = root / "manifest.csv"
    manifest.write_text(HEADER + "".join(rows), encoding="utf-8")
    return manifest
