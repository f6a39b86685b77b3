"""Tumour masks as DICOM SEG (highdicom-written, as 3D Slicer/OHIF export them) on a DICOM image series;
the NIfTI mask of the same case is the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_cases import enhanced_file, other_mask, reference_case, seg_file, series_datasets, write_series
from fedsubtype.data.imageio import load_case_images, write_image
from fedsubtype.data.manifest import Case
from fedsubtype.data.validation import validate_case

LABELS = dict.fromkeys(("er", "pr", "her2", "ki67"))


def _series_with_seg(tmp_path: Path, masks=None):
    img, mask = reference_case()
    datasets = series_datasets(img)
    folder = write_series(datasets, tmp_path / "dcm")
    seg = seg_file(datasets, masks or {"Tumour": mask, "Breast": other_mask(img)}, tmp_path / "seg" / "mask.dcm")
    return img, mask, datasets, folder, seg


@pytest.mark.parametrize("segment", ["Tumour", "tumour", "1"])
def test_seg_segment_by_label_or_number_matches_the_nifti_mask(tmp_path, segment):
    img, mask, _, folder, seg = _series_with_seg(tmp_path)
    case = Case("c", folder, seg, "s", LABELS, extra={"mask_segment": segment})
    image, on_grid = load_case_images(case)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(mask))
    np.testing.assert_allclose(on_grid.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert validate_case(case) == []


def test_seg_on_an_enhanced_multiframe_image_and_in_a_folder(tmp_path):
    img, mask = reference_case()
    mf = enhanced_file(series_datasets(img), tmp_path / "mf" / "enhanced.dcm")
    seg = seg_file([pydicom.dcmread(mf)], {"Tumour": mask}, tmp_path / "seg" / "mask.dcm")
    case = Case("c", mf, seg.parent, "s", LABELS)  # a folder holding only the SEG; one segment: no choice needed
    _, on_grid = load_case_images(case)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(mask))


def test_seg_with_several_segments_and_no_choice_is_one_line(tmp_path):
    _, _, _, folder, seg = _series_with_seg(tmp_path)
    problems = validate_case(Case("c", folder, seg, "s", LABELS))
    assert [p.line() for p in problems] == [
        f"c: mask {seg}: SEG holds 2 segments (1 'Tumour', 2 'Breast'); which one is the tumour? — "
        "add a 'mask_segment' column with the segment's number or label"]
    problems = validate_case(Case("c", folder, seg, "s", LABELS, extra={"mask_segment": "Liver"}))
    assert len(problems) == 1 and "SEG has no segment 'Liver'" in problems[0].what


def test_seg_of_another_series_is_refused(tmp_path):
    img, mask, _, _, seg = _series_with_seg(tmp_path)
    other = write_series(series_datasets(img, generate_uid()), tmp_path / "other")
    problems = validate_case(Case("c", other, seg, "s", LABELS, extra={"mask_segment": "1"}))
    assert len(problems) == 1 and problems[0].severity == "error"
    assert "SEG was drawn on series" in problems[0].what and "not on the image's series" in problems[0].what


def test_nifti_and_nrrd_masks_on_a_dicom_image_keep_working(tmp_path):
    img, mask, _, folder, _ = _series_with_seg(tmp_path)
    for suffix in (".nii.gz", ".nrrd"):
        write_image(mask, tmp_path / f"m{suffix}")
        case = Case("c", folder, tmp_path / f"m{suffix}", "s", LABELS)
        assert validate_case(case) == []
        np.testing.assert_array_equal(sitk.GetArrayFromImage(load_case_images(case)[1]), sitk.GetArrayFromImage(mask))
