"""Image I/O round trips through real files: NIfTI, NRRD, MHA/MHD, DICOM series (one and two per folder)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from broken_cases import make_image, make_mask, write_dicom_series
from fedsubtype.errors import ImageReadError
from fedsubtype.data.dicom import choose_dicom_series, list_dicom_series
from fedsubtype.data.imageio import (grid_differences, load_case_images,
                                read_image, read_image_noted, write_image)
from fedsubtype.data.manifest import Case

OBLIQUE = tuple(sitk.VersorTransform((0.1, 0.2, 0.9), 0.4).GetMatrix())  # a right-handed rotation


def _case(tmp_path: Path, image: sitk.Image, mask: sitk.Image, name: str = "c") -> Case:
    write_image(image, tmp_path / f"{name}.nii.gz")
    write_image(mask, tmp_path / f"{name}_mask.nii.gz")
    return Case(name, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz", "s", dict.fromkeys(("er", "pr", "her2", "ki67")))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    img = make_image(spacing=(0.7, 0.75, 2.5), origin=(-10.5, 3.25, 40.0), direction=OBLIQUE)
    write_image(img, tmp_path / f"x{suffix}")
    back = read_image(tmp_path / f"x{suffix}")
    assert grid_differences(back, img) == []
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_write_is_atomic_and_compressed(tmp_path, monkeypatch):
    img = make_image()
    target = tmp_path / "x.nii.gz"
    write_image(img, target)
    raw = tmp_path / "x.nii"
    write_image(img, raw)
    assert target.read_bytes()[:2] == b"\x1f\x8b" and target.stat().st_size < raw.stat().st_size
    before = target.read_bytes()

    def broken_write(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError):
        write_image(make_image(seed=9), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii", "x.nii.gz"]


def test_write_refuses_unknown_formats(tmp_path):
    with pytest.raises(ImageReadError, match="cannot write"):
        write_image(make_image(), tmp_path / "x.png")


def test_dicom_series_round_trip(tmp_path):
    img = make_image(spacing=(0.7, 0.7, 2.0), origin=(-20.0, 15.0, -30.0), direction=OBLIQUE)
    write_dicom_series(img, tmp_path / "dcm", series_uid="1.2.826.0.1.3680043.2.1125.7.1")
    back, note = read_image_noted(tmp_path / "dcm")
    assert "1.2.826.0.1.3680043.2.1125.7.1 (16 slices)" in note
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    # int16 rescaling keeps the order of intensities
    a, b = sitk.GetArrayViewFromImage(img).ravel(), sitk.GetArrayViewFromImage(back).ravel().astype(float)
    assert np.corrcoef(a, b)[0, 1] > 0.999


def test_folder_with_two_series_is_read_deliberately(tmp_path, caplog):
    folder = tmp_path / "dcm"
    big, small = "1.2.826.0.1.3680043.2.1125.8.1", "1.2.826.0.1.3680043.2.1125.8.2"
    write_dicom_series(make_image(size=(20, 22, 6), seed=1), folder, series_uid=small, description="localizer")
    write_dicom_series(make_image(size=(20, 22, 12), seed=2), folder, series_uid=big)
    assert [s.uid for s in list_dicom_series(folder)] == [big, small]
    with caplog.at_level(logging.INFO, logger="fedsubtype.data.imageio"):
        img = read_image(folder)
    assert img.GetSize() == (20, 22, 12)
    assert any(big in r.message and "largest of 2 series" in r.message and r.levelno == logging.WARNING
               for r in caplog.records)
    assert read_image(folder, series_uid=small).GetSize() == (20, 22, 6)
    one_file = next(p for p in sorted(folder.iterdir()) if p.name.startswith("2_"))
    assert read_image(one_file).GetSize() == (20, 22, 6)  # a .dcm file reads its own series
    with pytest.raises(ImageReadError, match="no DICOM series with UID 9.9") as exc:
        read_image(folder, series_uid="9.9")
    assert big in str(exc.value) and "\n" not in str(exc.value)
    assert "as requested" in choose_dicom_series(folder, small)[1]


def test_read_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").write_bytes(b"png")
    (tmp_path / "bad.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    cases = {tmp_path / "empty": "no DICOM series", tmp_path / "x.png": "unsupported file type",
             tmp_path / "nope.nii.gz": "file not found", tmp_path / "bad.mha": "cannot read image"}
    (tmp_path / "nested" / "series_a").mkdir(parents=True)
    cases[tmp_path / "nested"] = "no DICOM series"
    for path, text in cases.items():
        with pytest.raises(ImageReadError, match=text) as exc:
            read_image(path)
        line = exc.value.line()
        assert "\n" not in line and line.startswith(str(path)) and " — " in line
    with pytest.raises(ImageReadError, match="subfolder that holds the slices .it has: series_a"):
        read_image(tmp_path / "nested")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_voxels_are_refused(tmp_path, suffix):
    img = make_image(dtype=np.float64)
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.nan
    arr[5, 5, 5] = -np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    write_image(bad, tmp_path / f"x{suffix}")
    write_image(make_mask(img), tmp_path / "m.nii.gz")
    case = Case("c", tmp_path / f"x{suffix}", tmp_path / "m.nii.gz", "s", dict.fromkeys(("er", "pr", "her2", "ki67")))
    with pytest.raises(ImageReadError, match="has 2 NaN/Inf voxels"):
        load_case_images(case)


def test_load_case_images_types_and_grid(tmp_path):
    img = make_image(dtype=np.int16)
    image, mask = load_case_images(_case(tmp_path, img, make_mask(img, label=255)))
    assert image.GetPixelID() == sitk.sitkFloat32 and mask.GetPixelID() == sitk.sitkUInt8
    assert grid_differences(mask, image) == []
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}


def test_load_case_images_takes_every_label_of_a_multilabel_mask(tmp_path):
    img = make_image()
    outer = make_mask(img, radius_vox=(5, 5, 3), label=1)
    core = make_mask(img, radius_vox=(2, 2, 1), label=2)
    multi = sitk.Maximum(outer, core)
    _, mask = load_case_images(_case(tmp_path, img, multi))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(outer))


def test_load_case_images_resamples_an_overlapping_mask(tmp_path):
    img = make_image(spacing=(0.8, 0.8, 2.0))
    truth = make_mask(img)
    fine = sitk.Image((40, 44, 32), sitk.sitkUInt8)
    fine.SetSpacing((0.4, 0.4, 1.0))
    fine.SetOrigin((-0.2, -0.2, -0.5))  # voxel corners aligned with the image's voxels
    fine = sitk.Resample(truth, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    image, mask = load_case_images(_case(tmp_path, img, fine))
    assert grid_differences(mask, image) == []
    a, b = sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(truth)
    dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
    assert dice > 0.9


def test_load_case_images_refuses_a_disjoint_mask(tmp_path):
    img = make_image()
    far = make_mask(img)
    far.SetOrigin((300.0, 0.0, 0.0))
    with pytest.raises(ImageReadError, match="does not overlap"):
        load_case_images(_case(tmp_path, img, far))


def test_load_case_images_rejects_4d_and_reduces_single_frame(tmp_path):
    img = make_image()
    write_image(sitk.JoinSeries([img]), tmp_path / "one.nrrd")
    write_image(sitk.JoinSeries([img, img]), tmp_path / "two.nrrd")
    write_image(make_mask(img), tmp_path / "m.nii.gz")
    labels = dict.fromkeys(("er", "pr", "her2", "ki67"))
    image, _ = load_case_images(Case("a", tmp_path / "one.nrrd", tmp_path / "m.nii.gz", "s", labels))
    assert image.GetDimension() == 3
    with pytest.raises(ImageReadError, match="4D"):
        load_case_images(Case("b", tmp_path / "two.nrrd", tmp_path / "m.nii.gz", "s", labels))


def test_manifest_series_uid_column_selects_the_series(tmp_path):
    folder = tmp_path / "dcm"
    write_dicom_series(make_image(size=(20, 22, 12), seed=2), folder, series_uid="1.2.3.9.1")
    small = make_image(size=(20, 22, 8), seed=1)
    write_dicom_series(small, folder, series_uid="1.2.3.9.2")
    write_image(make_mask(small), tmp_path / "m.nii.gz")
    labels = dict.fromkeys(("er", "pr", "her2", "ki67"))
    case = Case("a", folder, tmp_path / "m.nii.gz", "s", labels, extra={"image_series_uid": "1.2.3.9.2"})
    image, mask = load_case_images(case)
    assert image.GetSize() == (20, 22, 8) and mask.GetSize() == (20, 22, 8)
