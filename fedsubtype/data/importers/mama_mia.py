"""MAMA-MIA layout -> case manifest.

Layout (docs/data.md, "Importing MAMA-MIA")::

    ROOT/images/{pid}/{pid}_0000.nii.gz        pre-contrast; _0001 first post-contrast, ...
    ROOT/segmentations/expert/{pid}.nii.gz     expert tumour segmentation
    ROOT/clinical_and_imaging_info.xlsx        sheet `dataset_info` (or a CSV with the same columns)

ER/PR/HER2 become 0/1/missing (never 0 for missing); Ki-67 is not in MAMA-MIA and stays missing.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case, write_manifest

CLINICAL_NAMES: tuple[str, ...] = ("clinical_and_imaging_info.xlsx", "clinical_and_imaging_info.csv")
SHEET = "dataset_info"
SITE_COLUMNS: tuple[str, ...] = ("dataset", "site", "manufacturer")
KEPT_COLUMNS: tuple[str, ...] = ("dataset", "site", "manufacturer", "scanner_model", "field_strength", "hr",
                                 "tumor_subtype", "pixel_spacing", "slice_thickness")
"""Clinical columns copied into the manifest as optional columns (`site` becomes `clinical_site`)."""

_POSITIVE = {"1", "pos", "positive", "+", "yes", "true", "y"}
_NEGATIVE = {"0", "neg", "negative", "-", "no", "false", "n"}
_MISSING = {"", "na", "n/a", "nan", "none", "null", "unknown", "missing", "?", "nd", "not available"}


@dataclass
class ImportSummary:
    """What an import wrote and what it left out, one line per left-out case or note."""

    manifest: Path
    cases: int
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sites: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Left-out cases and notes (one line each), then what was written."""
        out = list(self.left_out) + list(self.notes)
        out.append(f"wrote {self.manifest}: {self.cases} cases, {len(self.left_out)} left out")
        out.append("sites: " + ", ".join(f"{k} {v}" for k, v in self.sites.items()))
        for task, c in self.labels.items():
            out.append(f"{task}: {c['positive']} positive, {c['negative']} negative, {c['missing']} missing")
        out.append("ki67: missing for every case (MAMA-MIA has no Ki-67)")
        return out


def parse_status(value: Any) -> tuple[float | None, bool]:
    """A receptor status as 0/1/None; the flag is False when the value was not understood."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, True
    if isinstance(value, bool):
        return float(value), True
    if isinstance(value, (int, float)):
        return (float(value), True) if value in (0, 1) else (None, False)
    text = str(value).strip().lower()
    if text in _MISSING:
        return None, True
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        return (number, True) if number in (0.0, 1.0) else (None, False)
    if text in _POSITIVE:
        return 1.0, True
    if text in _NEGATIVE:
        return 0.0, True
    return None, False


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else str(value)
    return str(value).strip()


def _read_xlsx(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a bad workbook
        raise UserError(f"cannot read the workbook ({exc.__class__.__name__}: {exc})",
                        "save it again as .xlsx, or export the sheet as CSV and pass --clinical FILE.csv",
                        where=str(path)) from None
    try:
        note = None
        if SHEET in book.sheetnames:
            sheet = book[SHEET]
        else:
            sheet = book[book.sheetnames[0]]
            note = f"clinical table: no sheet '{SHEET}' in {path.name}; read the first sheet '{sheet.title}'"
        rows = sheet.iter_rows(values_only=True)
        header: list[str] | None = None
        records = []
        for row in rows:
            if header is None:
                names = [_cell_text(v).lower() for v in row]
                if "patient_id" in names:
                    header = names
                continue
            if row is None or all(v is None or _cell_text(v) == "" for v in row):
                continue
            records.append({h: v for h, v in zip(header, row) if h})
        if header is None:
            raise UserError(f"no header row with 'patient_id' in sheet '{sheet.title}'",
                            "the clinical table needs a patient_id column", where=str(path))
        return records, note
    finally:
        book.close()


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [(f or "").strip().lower() for f in (reader.fieldnames or [])]
            if "patient_id" not in fields:
                raise UserError("no 'patient_id' column", "the clinical table needs a patient_id column", where=str(path))
            return [{(k or "").strip().lower(): v for k, v in row.items() if k}
                    for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    except UnicodeDecodeError:
        raise UserError("the CSV is not UTF-8 text", "save it as UTF-8 CSV", where=str(path)) from None


def read_clinical(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of the clinical table (column names lower-cased) and a note when a fallback was used."""
    if not path.is_file():
        raise UserError("clinical table not found", "pass --clinical FILE (xlsx or csv)", where=str(path))
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return _read_xlsx(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return _read_csv(path), None
    raise UserError(f"unsupported clinical table type '{path.suffix}'", "use .xlsx or .csv", where=str(path))


def _find_clinical(root: Path) -> Path:
    for name in CLINICAL_NAMES:
        if (root / name).is_file():
            return root / name
    raise UserError(f"no clinical table ({' or '.join(CLINICAL_NAMES)}) in the MAMA-MIA folder",
                    "pass --clinical FILE (xlsx sheet 'dataset_info', or csv)", where=str(root))


def _label_counts(cases: Iterable[Case]) -> dict[str, dict[str, int]]:
    cases = list(cases)
    return {t: {"positive": sum(c.labels[t] == 1 for c in cases), "negative": sum(c.labels[t] == 0 for c in cases),
                "missing": sum(c.labels[t] is None for c in cases)} for t in CLASSIFICATION_TASKS}


def import_mama_mia(root: str | os.PathLike, out_manifest: str | os.PathLike, *, phase: int = 1,
                    site_column: str = "dataset", clinical: str | os.PathLike | None = None) -> ImportSummary:
    """Write a manifest for every MAMA-MIA case that has the phase image, an expert segmentation and a
    clinical row; every case left out is reported with the reason (one line each)."""
    root = Path(root)
    _check_arguments(root, phase, site_column)
    rows, columns, notes = _clinical_rows(root, clinical, site_column)
    image_dirs = {p.name.lower(): p for p in (root / "images").iterdir() if p.is_dir()}
    out_path = Path(out_manifest)
    left_out: list[str] = []
    cases = _cases_from_rows(rows, columns, root, image_dirs, f"_{int(phase):04d}.nii.gz", site_column,
                             left_out, notes)
    listed = {pid.lower() for pid in cases} | {_cell_text(r.get("patient_id")).lower() for r in rows}
    for name in sorted(set(image_dirs) - listed):
        left_out.append(f"{image_dirs[name].name}: not in the clinical table — left out")
    if not cases:
        raise UserError(f"no usable case found ({len(left_out)} left out"
                        + (f"; first: {left_out[0]}" if left_out else "") + ")",
                        "check ROOT, --phase and --clinical", where=str(root))
    ordered = [cases[k] for k in sorted(cases)]
    write_manifest(ordered, out_path)
    return ImportSummary(out_path, len(ordered), left_out, notes,
                         dict(sorted(Counter(c.site for c in ordered).items())), _label_counts(ordered))


class _LeftOut(Exception):
    """A clinical row whose case cannot be imported; the message is the report line."""


def _check_arguments(root: Path, phase: int, site_column: str) -> None:
    """The MAMA-MIA folder, --phase and --site-column, checked before anything is read."""
    if not (root / "images").is_dir():
        raise UserError("no 'images' folder", "point ROOT at the MAMA-MIA folder (with images/ and segmentations/)",
                        where=str(root))
    if not 0 <= int(phase) <= 9999:
        raise UserError(f"--phase {phase} is out of range", "use 0 (pre-contrast), 1 (first post-contrast), 2, …")
    if site_column not in SITE_COLUMNS:
        raise UserError(f"--site-column {site_column!r} is not supported", f"use one of {', '.join(SITE_COLUMNS)}")


def _clinical_rows(root: Path, clinical: str | os.PathLike | None,
                   site_column: str) -> tuple[list[dict[str, Any]], set[str], list[str]]:
    """Rows and column names of the clinical table, and notes on what it lacks; no site column is a UserError."""
    clinical_path = Path(clinical) if clinical else _find_clinical(root)
    rows, note = read_clinical(clinical_path)
    notes = [note] if note else []
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    if site_column not in columns:
        raise UserError(f"clinical table has no '{site_column}' column",
                        f"choose --site-column among the columns present: {', '.join(c for c in SITE_COLUMNS if c in columns) or 'none'}",
                        where=str(clinical_path))
    for task in CLASSIFICATION_TASKS:
        if task not in columns:
            notes.append(f"clinical table has no '{task}' column; {task} is missing for every case")
    return rows, columns, notes


def _cases_from_rows(rows: list[dict[str, Any]], columns: set[str], root: Path, image_dirs: dict[str, Path],
                     suffix: str, site_column: str, left_out: list[str], notes: list[str]) -> dict[str, Case]:
    """A case per clinical row with its files, by patient id; appends a line to `left_out` per row left out."""
    cases: dict[str, Case] = {}
    for row in rows:
        pid = _cell_text(row.get("patient_id"))
        if not pid:
            continue
        if pid in cases:
            left_out.append(f"{pid}: duplicate row in the clinical table — kept the first")
            continue
        try:
            image, mask = _case_files(root, pid, image_dirs, suffix)
        except _LeftOut as why:
            left_out.append(str(why))
            continue
        labels = _row_labels(row, pid, notes)
        site = _cell_text(row.get(site_column))
        if not site:
            site = "unknown"
            notes.append(f"{pid}: empty '{site_column}'; site set to 'unknown'")
        extra = {}
        for col in KEPT_COLUMNS:
            if col in columns:
                extra["clinical_site" if col == "site" else col] = _cell_text(row.get(col))
        cases[pid] = Case(pid, image, mask, site, labels, None, extra)
    return cases


def _case_files(root: Path, pid: str, image_dirs: dict[str, Path], suffix: str) -> tuple[Path, Path]:
    """The phase image and expert segmentation of patient `pid`; _LeftOut says which is missing."""
    folder = image_dirs.get(pid.lower())
    if folder is None:
        raise _LeftOut(f"{pid}: no image folder images/{pid}/ — left out")
    image = folder / f"{folder.name}{suffix}"
    if not image.is_file():
        phases = sorted(p.name[len(folder.name) + 1:-7] for p in folder.glob(f"{folder.name}_*.nii.gz"))
        have = f" (phases present: {', '.join(phases)})" if phases else ""
        raise _LeftOut(f"{pid}: image {image.relative_to(root)} not found{have} — left out; try another --phase")
    seg_dir = root / "segmentations" / "expert"
    mask = next((m for m in (seg_dir / f"{folder.name}.nii.gz", seg_dir / f"{pid}.nii.gz") if m.is_file()), None)
    if mask is None:
        raise _LeftOut(f"{pid}: expert segmentation segmentations/expert/{folder.name}.nii.gz not found — left out")
    return image, mask


def _row_labels(row: dict[str, Any], pid: str, notes: list[str]) -> dict[str, float | None]:
    """ER/PR/HER2 of one clinical row as 0/1/None (Ki-67 stays None); a value not understood adds a note."""
    labels: dict[str, float | None] = dict.fromkeys(TASKS)
    for task in CLASSIFICATION_TASKS:
        value, understood = parse_status(row.get(task))
        if not understood:
            notes.append(f"{pid}: {task}={row.get(task)!r} not understood; left missing")
        labels[task] = value
    return labels
