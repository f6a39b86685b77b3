"""DICOM as PACS exports it: pydicom's shipped MR files and series written from a synthetic case whose
NIfTI version is the reference (same voxels, same physical space)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dicom_cases import enhanced_file, reference_case, series_datasets, write_series
from fedsubtype.data import itk_log
from fedsubtype.data.imageio import read_image, read_image_checked, write_image
from fedsubtype.data.manifest import Case
from fedsubtype.data.validation import validate_case
from fedsubtype.errors import ImageReadError

LABELS = dict.fromkeys(("er", "pr", "her2", "ki67"))
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _same_volume(image: sitk.Image, reference: sitk.Image) -> None:
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)


def _lines(case: Case) -> list[str]:
    return [p.line() if p.severity == "error" else f"warning: {p.line()}" for p in validate_case(case)]


def _case(tmp_path: Path, image: Path, mask_img: sitk.Image | None = None, **extra: str) -> Case:
    mask_path = tmp_path / "mask.nii.gz"
    if mask_img is not None:
        write_image(mask_img, mask_path)
    return Case("c", image, mask_path, "s", LABELS, extra=extra)


def test_classic_series_reads_like_the_nifti_and_like_itk(tmp_path):
    img, mask = reference_case()
    folder = write_series(series_datasets(img), tmp_path / "dcm")
    _same_volume(read_image(folder), img)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    _same_volume(read_image(folder), reader.Execute())  # the former (GDCM) read path gives the same volume
    assert _lines(_case(tmp_path, folder, mask)) == []


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_compressed_series_read_the_same_voxels(tmp_path, syntax):
    img, _ = reference_case()
    folder = write_series(series_datasets(img), tmp_path / "dcm", syntax)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == syntax
    _same_volume(read_image(folder), img)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm"])
def test_pydicom_compressed_files_match_the_uncompressed_original(tmp_path, name):
    for n in ("MR_small.dcm", name):
        (tmp_path / n.removesuffix(".dcm")).mkdir()
        shutil.copy(get_testdata_file(n), tmp_path / n.removesuffix(".dcm") / n)
    original = read_image(tmp_path / "MR_small" / "MR_small.dcm")
    _same_volume(read_image(tmp_path / name.removesuffix(".dcm") / name), original)
    assert original.GetSize() == (64, 64, 1)


def test_unsupported_transfer_syntax_is_named_in_one_line(tmp_path):
    img, mask = reference_case()
    folder = write_series(series_datasets(img), tmp_path / "dcm")
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder for video in a volume
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=False)
    lines = _lines(_case(tmp_path, folder, mask))
    assert len(lines) == 1 and "MPEG2 Main Profile" in lines[0] and "re-export the series uncompressed" in lines[0]


def test_missing_slice_is_diagnosed_from_the_positions_not_the_header(tmp_path):
    img, mask = reference_case()
    folder = write_series(series_datasets(img), tmp_path / "dcm", skip=(4,))
    lines = _lines(_case(tmp_path, folder, mask))
    assert len(lines) == 1 and "about 1 slice(s) missing" in lines[0] and "re-export the complete series" in lines[0]
    assert "header" not in lines[0]


def _shift_slice(datasets, index: int, mm: float):
    ds = datasets[index]
    normal = np.cross(np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float))
    ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient, float) + mm * normal]


def test_small_unevenness_is_resampled_with_a_warning_and_large_is_refused(tmp_path):
    img, mask = reference_case()
    datasets = series_datasets(img)
    _shift_slice(datasets, 3, 0.1)  # 5 % of the 2 mm spacing
    folder = write_series(datasets, tmp_path / "small")
    read = read_image_checked(folder)
    assert read.image.GetSize() == img.GetSize() and read.notes[0].severity == "warning"
    assert "resampled linearly" in read.notes[0].what and "tolerance 10%" in read.notes[0].what
    np.testing.assert_allclose(sitk.GetArrayFromImage(read.image)[[0, 7]], sitk.GetArrayFromImage(img)[[0, 7]])
    _shift_slice(datasets, 3, 0.5)  # now 30 %
    lines = _lines(_case(tmp_path, write_series(datasets, tmp_path / "large"), mask))
    assert len(lines) == 1 and "slice spacing is uneven" in lines[0] and "resamples up to 10%" in lines[0]


def test_localizer_in_the_series_is_left_out_with_a_warning(tmp_path):
    img, mask = reference_case()
    datasets = series_datasets(img)
    scout = series_datasets(img, datasets[0].SeriesInstanceUID)[2]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    folder = write_series(datasets + [scout], tmp_path / "dcm")
    lines = _lines(_case(tmp_path, folder, mask))
    assert len(lines) == 1 and lines[0].startswith("warning: c: image") and "1 localizer slice(s)" in lines[0]
    _same_volume(read_image(folder), img)


def test_two_acquisitions_in_one_series_are_refused(tmp_path):
    img, mask = reference_case()
    first = series_datasets(img)
    second = series_datasets(img, first[0].SeriesInstanceUID)
    for ds in second:
        ds.AcquisitionNumber = 2
    folder = write_series(first, tmp_path / "dcm")
    for i, ds in enumerate(second):
        ds.save_as(folder / f"ACQ2_{i}", enforce_file_format=True)
    lines = _lines(_case(tmp_path, folder, mask))
    assert len(lines) == 1 and "holds 2 acquisitions at the same slice positions" in lines[0]


def test_enhanced_multiframe_file_reads_as_the_volume(tmp_path):
    img, mask = reference_case()
    path = enhanced_file(series_datasets(img), tmp_path / "mf" / "enhanced.dcm")
    read = read_image_checked(path)
    assert "multi-frame file (8 frames)" in read.summary and read.notes == []
    _same_volume(read.image, img)
    assert _lines(_case(tmp_path, path, mask)) == []


def test_one_file_of_a_classic_series_says_so_and_suggests_the_folder(tmp_path):
    img, mask = reference_case()
    folder = write_series(series_datasets(img), tmp_path / "dcm")
    lines = _lines(_case(tmp_path, folder / "IM0003", mask))
    assert len(lines) == 1 and "names one file of a 8-slice DICOM series" in lines[0]
    assert f"put the folder {folder} in the manifest" in lines[0]


def test_several_series_the_uid_column_chooses(tmp_path):
    img, mask = reference_case()
    datasets = series_datasets(img)
    folder = write_series(datasets, tmp_path / "dcm")
    scout = series_datasets(img)[:3]
    for ds, iop in zip(scout, ([0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1], [1, 0, 0, 0, 1, 0])):
        ds.ImageOrientationPatient = iop
    write_series(scout, tmp_path / "scouts")
    for p in (tmp_path / "scouts").iterdir():
        p.rename(folder / f"S{p.name}")
    assert _lines(_case(tmp_path, folder, mask, image_series_uid=datasets[0].SeriesInstanceUID)) == []
    with pytest.raises(ImageReadError, match="3 different orientations.*this folder also holds"):
        read_image(folder, series_uid=scout[0].SeriesInstanceUID)


def test_pydicom_mr700_projections_and_mr2_localizers_get_the_right_diagnosis(tmp_path):
    root = TEST_FILES / "dicomdirtests" / "98892003"
    lines = _lines(Case("mr700", root / "MR700", root / "MR700", "s", LABELS))
    assert lines == [f"mr700: image {root / 'MR700'}: slices lie in 7 different orientations (7 slices: localizer or "
                     "projection images, not one volume) — point the manifest at the series of the post-contrast volume "
                     "(an 'image_series_uid' column chooses one)",
                     "mr700: mask names the same file as the image — give the tumour segmentation in the 'mask' column"]
    lines = _lines(Case("mr2", root / "MR2", tmp_path / "m.nii.gz", "s", LABELS))
    assert "3 different orientations" in lines[0] and "this folder also holds" in lines[0]
    assert not any("header" in ln or "implausible" in ln for ln in lines)


def test_emri_small_without_geometry_is_refused():
    path = get_testdata_file("emri_small.dcm")  # ships in pydicom-data (the test extra)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    with pytest.raises(ImageReadError, match="multi-frame file has no slice geometry in 10 of 10 frames"):
        read_image(path)


def test_itk_warnings_never_reach_the_terminal(capfd, caplog):
    files = sorted(str(p) for p in (TEST_FILES / "dicomdirtests" / "98892003" / "MR700").iterdir())
    with itk_log.captured() as said:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.Execute()  # ITK warns "Non uniform sampling or missing slices detected": dropped
        sitk.LoggerBase.GetGlobalITKLogger().DisplayWarningText(
            "WARNING: In /x/itkFoo.hxx, line 7\nFooFilter (0x55d0): something odd\n\n")
    assert said == ["something odd"]
    sitk.LoggerBase.GetGlobalITKLogger().DisplayWarningText("WARNING: In /x.hxx, line 1\nBar (0x1): outside\n")
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "itk" not in (out + err).lower()
    assert any(r.message == "ITK: outside" for r in caplog.records)
