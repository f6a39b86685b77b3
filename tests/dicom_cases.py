"""DICOM as a PACS or a segmentation tool writes it, built with pydicom/highdicom from a small synthetic case
whose NIfTI version is the reference: classic series (any transfer syntax, with gaps, localizers, several
acquisitions), enhanced multi-frame files and DICOM SEG masks."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from broken_cases import make_image, make_mask

SIZE = (40, 36, 8)  # x, y, z (JPEG 2000 needs 32+ pixels a side)
SPACING = (0.8, 0.9, 2.0)
ORIGIN = (-10.0, 20.0, 30.0)
DIRECTION = tuple(sitk.VersorTransform((0.1, 0.2, 0.9), 0.4).GetMatrix())


def reference_case() -> tuple[sitk.Image, sitk.Image]:
    """An int16 image (oblique, anisotropic) and its tumour mask: what every DICOM variant must read as."""
    img = make_image(size=SIZE, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    img = sitk.Cast(sitk.RescaleIntensity(img, 0, 3000), sitk.sitkInt16)
    return img, make_mask(img, radius_vox=(6, 5, 2))


def _slice_dataset(img: sitk.Image, z: int, series_uid: str, study_uid: str, frame_of_ref: str) -> Dataset:
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MRImageStorage
    ds.Modality, ds.ImageType = "MR", ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Case", "PHANTOM", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_ref
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "A1", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, z + 1, 1
    ds.Manufacturer, ds.PositionReferenceIndicator = "fedsubtype-tests", ""
    ds.ImagePositionPatient = [float(v) for v in img.TransformIndexToPhysicalPoint((0, 0, z))]
    ds.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [float(img.GetSpacing()[1]), float(img.GetSpacing()[0])]
    ds.SliceThickness = float(img.GetSpacing()[2])
    ds.Rows, ds.Columns = img.GetSize()[1], img.GetSize()[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(sitk.GetArrayViewFromImage(img)[z]).astype(np.int16).tobytes()
    return ds


def series_datasets(img: sitk.Image, series_uid: str | None = None) -> list[Dataset]:
    """One MR Image Storage dataset per slice of an int16 image, with its geometry tags."""
    series_uid = series_uid or generate_uid()
    study, frame_of_ref = generate_uid(), generate_uid()
    return [_slice_dataset(img, z, series_uid, study, frame_of_ref) for z in range(img.GetDepth())]


def write_series(datasets: list[Dataset], folder: Path, transfer_syntax: str | None = None,
                 skip: tuple[int, ...] = ()) -> Path:
    """Write the datasets as files `IM0001`… (no extension, as PACS exports do), compressed when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        if i in skip:
            continue
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds = pydicom.dcmread(_roundtrip(ds))
            ds.compress(transfer_syntax)
        ds.save_as(folder / f"IM{i + 1:04d}", enforce_file_format=True)
    return folder


def _roundtrip(ds: Dataset):
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def enhanced_file(datasets: list[Dataset], path: Path) -> Path:
    """The series as one enhanced (legacy-converted) multi-frame MR file with per-frame geometry."""
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(path)
    return path


def seg_file(datasets: list[Dataset], masks: dict[str, sitk.Image], path: Path) -> Path:
    """A binary DICOM SEG with one segment per named mask, drawn on the given series."""
    arrays = np.stack([sitk.GetArrayFromImage(m).astype(bool) for m in masks.values()], axis=-1)
    if len(datasets) == 1 and "PerFrameFunctionalGroupsSequence" in datasets[0]:  # frames in the file's order
        like = next(iter(masks.values()))
        order = [like.TransformPhysicalPointToIndex([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])[2]
                 for f in datasets[0].PerFrameFunctionalGroupsSequence]
        arrays = arrays[order]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, label in enumerate(masks)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=arrays, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=10,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="fedsubtype-tests",
        manufacturer_model_name="tests", software_versions="0", device_serial_number="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def other_mask(img: sitk.Image) -> sitk.Image:
    """A second structure (a corner block) for multi-segment SEGs."""
    arr = np.zeros(sitk.GetArrayViewFromImage(img).shape, dtype=np.uint8)
    arr[:2, :3, :3] = 1
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out
