"""MAMA-MIA import on a small tree built in exactly the published layout (real NIfTI, real .xlsx)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import SimpleITK as sitk
from openpyxl import Workbook

from broken_cases import make_image, make_mask
from fedsubtype.cli import main
from fedsubtype.errors import UserError
from fedsubtype.data.importers import import_mama_mia
from fedsubtype.data.importers.mama_mia import parse_status
from fedsubtype.data.manifest import read_manifest

COLUMNS = ["patient_id", "dataset", "age", "er", "pr", "her2", "hr", "tumor_subtype", "field_strength",
           "manufacturer", "scanner_model", "site"]
ROWS = [
    ["DUKE_001", "DUKE", 51, 1.0, 0.0, None, 1.0, "luminal", 1.5, "GE MEDICAL SYSTEMS", "Signa", "Duke"],
    ["ISPY1_1001", "ISPY1", 44, "positive", "Negative", 0, 1, "luminal", 3.0, "SIEMENS", "Trio", "UCSF"],
    ["ISPY2_102011", "ISPY2", 39, 0.0, 0.0, 1.0, 0.0, "her2_enriched", 3.0, "SIEMENS", "Skyra", "UCSF"],
    ["NACT_01", "NACT", 60, 1.0, 1.0, 0.0, 1.0, "luminal", 1.5, "GE MEDICAL SYSTEMS", "Signa", "Stanford"],
    ["DUKE_002", "DUKE", 70, "weak", None, None, None, None, 1.5, "GE MEDICAL SYSTEMS", "Signa", "Duke"],
]


def _nifti(img: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def build_tree(root: Path, clinical: str = "xlsx") -> Path:
    """DUKE_001, ISPY1_1001, DUKE_002 complete; ISPY2_102011 lacks its segmentation; NACT_01 lacks phase 1;
    ORPHAN_7 has images but no clinical row."""
    for i, pid in enumerate(["DUKE_001", "ISPY1_1001", "ISPY2_102011", "NACT_01", "DUKE_002", "ORPHAN_7"]):
        img = make_image(seed=i)
        phases = (0,) if pid == "NACT_01" else (0, 1, 2)
        for ph in phases:
            _nifti(img, root / "images" / pid / f"{pid}_{ph:04d}.nii.gz")
        if pid != "ISPY2_102011":
            _nifti(make_mask(img), root / "segmentations" / "expert" / f"{pid}.nii.gz")
            _nifti(make_mask(img), root / "segmentations" / "automatic" / f"{pid}.nii.gz")
    if clinical == "xlsx":
        book = Workbook()
        book.active.title = "notes"
        book.active.append(["about this file"])
        sheet = book.create_sheet("dataset_info")
        sheet.append(COLUMNS)
        for row in ROWS:
            sheet.append(row)
        book.save(root / "clinical_and_imaging_info.xlsx")
        return root / "clinical_and_imaging_info.xlsx"
    path = root / "clinical.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([c.upper() if c == "er" else c for c in COLUMNS])  # header case is tolerated
        for row in ROWS:
            writer.writerow(["" if v is None else v for v in row])
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mama") / "MAMA-MIA"
    build_tree(root)
    return root


def test_import_writes_the_manifest(tree, tmp_path):
    out = tmp_path / "out" / "manifest.csv"
    summary = import_mama_mia(tree, out)
    cases = {c.case_id: c for c in read_manifest(out)}
    assert sorted(cases) == ["DUKE_001", "DUKE_002", "ISPY1_1001"]
    duke = cases["DUKE_001"]
    assert duke.labels == {"er": 1.0, "pr": 0.0, "her2": None, "ki67": None}
    assert cases["ISPY1_1001"].labels == {"er": 1.0, "pr": 0.0, "her2": 0.0, "ki67": None}
    assert cases["DUKE_002"].labels == dict.fromkeys(("er", "pr", "her2", "ki67"))
    assert duke.image.resolve() == (tree / "images" / "DUKE_001" / "DUKE_001_0001.nii.gz").resolve()
    assert duke.mask.resolve() == (tree / "segmentations" / "expert" / "DUKE_001.nii.gz").resolve()
    assert duke.site == "DUKE" and cases["ISPY1_1001"].site == "ISPY1"
    assert duke.extra["manufacturer"] == "GE MEDICAL SYSTEMS" and duke.extra["field_strength"] == "1.5"
    assert duke.extra["dataset"] == "DUKE" and duke.extra["clinical_site"] == "Duke"
    assert "age" not in duke.extra
    assert not Path(out.read_text(encoding="utf-8").splitlines()[1].split(",")[1]).is_absolute()

    assert summary.cases == 3
    left = "\n".join(summary.left_out)
    assert "ISPY2_102011: expert segmentation" in left
    assert "NACT_01: image images/NACT_01/NACT_01_0001.nii.gz not found (phases present: 0000)" in left
    assert "ORPHAN_7: not in the clinical table" in left
    assert len(summary.left_out) == 3
    assert any("DUKE_002: er='weak' not understood" in n for n in summary.notes)
    assert summary.labels["er"] == {"positive": 2, "negative": 0, "missing": 1}
    assert summary.sites == {"DUKE": 2, "ISPY1": 1}


def test_cli_import_then_validate(tree, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["import", "mama-mia", str(tree), "--out", str(out), "--site-column", "manufacturer"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "3 cases, 3 left out" in printed
    assert {c.site for c in read_manifest(out)} == {"GE MEDICAL SYSTEMS", "SIEMENS"}
    assert main(["validate", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 rows, 3 usable cases, 0 errors" in printed
    assert "ki67: 0 present, 3 missing" in printed


def test_phase_zero_and_site_column_site(tree, tmp_path):
    out = tmp_path / "m.csv"
    summary = import_mama_mia(tree, out, phase=0, site_column="site")
    cases = {c.case_id: c for c in read_manifest(out)}
    assert "NACT_01" in cases and cases["NACT_01"].image.name == "NACT_01_0000.nii.gz"
    assert cases["NACT_01"].site == "Stanford" and summary.cases == 4


def test_csv_clinical_table(tmp_path):
    root = tmp_path / "mm"
    table = build_tree(root, clinical="csv")
    out = tmp_path / "m.csv"
    import_mama_mia(root, out, clinical=table)
    cases = {c.case_id: c for c in read_manifest(out)}
    assert cases["DUKE_001"].labels["er"] == 1.0 and cases["DUKE_001"].labels["her2"] is None
    assert cases["ISPY1_1001"].labels["pr"] == 0.0


def test_user_mistakes_are_one_line(tree, tmp_path, capsys):
    assert main(["import", "mama-mia", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 1
    assert "no 'images' folder" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,er\nDUKE_001,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="no 'dataset' column"):
        import_mama_mia(tree, tmp_path / "m.csv", clinical=bad)
    with pytest.raises(UserError, match="no usable case"):
        import_mama_mia(tree, tmp_path / "m.csv", phase=7)
    with pytest.raises(SystemExit) as exc:
        main(["import", "mama-mia", str(tree), "--out", "x.csv", "--site-column", "scanner"])
    assert exc.value.code == 2
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"not a workbook")
    with pytest.raises(UserError, match="cannot read the workbook"):
        import_mama_mia(tree, tmp_path / "m.csv", clinical=broken)


@pytest.mark.parametrize("value, expected", [
    (1.0, (1.0, True)), (0, (0.0, True)), (None, (None, True)), (math.nan, (None, True)), ("", (None, True)),
    ("Positive", (1.0, True)), ("neg", (0.0, True)), ("1.0", (1.0, True)), (" NA ", (None, True)),
    (2, (None, False)), ("weak", (None, False)), ("0.5", (None, False)),
])
def test_parse_status(value, expected):
    assert parse_status(value) == expected
