"""Builders of real image files and manifests for tests, including a corpus of broken cases.

Every builder writes real files through SimpleITK so the code under test reads them the way it
reads a user's data.
"""

from __future__ import annotations

import csv
import gzip
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
    series_uid = series_uid or f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1e6) % 10**12}.{abs(hash(str(folder))) % 10**6}"
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
