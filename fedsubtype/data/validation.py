"""Case validation: read every case and report every problem at once, one line each.

Errors make a case unusable; warnings do not (the case is used as :mod:`fedsubtype.data.imageio`
loads it, and the warning says how). Trainers pick their policy from `ValidationReport.cases`.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.errors import ImageReadError
from fedsubtype.data.dicom_seg import seg_file
from fedsubtype.data.imageio import (ImageRead, as_volume, binarize_mask, grid_differences, mask_on_image_grid,
                                     overlap_fraction, read_case_mask, read_image_checked)
from fedsubtype.data.manifest import Case, Problem, load_manifest

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
MIN_TUMOUR_VOXELS = 8
MAX_TUMOUR_FRACTION = 0.5


@dataclass
class ValidationReport:
    """Usable cases, every problem found, and how many manifest rows were read."""

    cases: list[Case]
    problems: list[Problem]
    rows: int = 0
    checked: list[Case] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when no problem is an error (every row is a usable case)."""
        return not self.errors

    def summary(self) -> dict[str, Any]:
        """Counts of rows, usable cases, sites, labels per task (positive/negative/missing) and Ki-67 stats."""
        labels: dict[str, dict[str, Any]] = {}
        for task in CLASSIFICATION_TASKS:
            values = [c.labels.get(task) for c in self.cases]
            labels[task] = {"positive": sum(v == 1 for v in values), "negative": sum(v == 0 for v in values),
                            "missing": sum(v is None for v in values)}
        ki67 = [float(c.labels["ki67"]) for c in self.cases if c.labels.get("ki67") is not None]
        labels["ki67"] = {"present": len(ki67), "missing": len(self.cases) - len(ki67)}
        if ki67:
            labels["ki67"].update(mean=round(statistics.fmean(ki67), 2), median=round(statistics.median(ki67), 2),
                                  min=min(ki67), max=max(ki67))
        return {
            "rows": self.rows,
            "cases": len(self.cases),
            "unusable": self.rows - len(self.cases),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "sites": dict(sorted(Counter(c.site for c in self.cases).items())),
            "labels": labels,
        }

    def problem_lines(self) -> list[str]:
        """One line per problem: `case_id: what — fix`, warnings marked `warning:`."""
        return [p.line() if p.severity == "error" else f"{p.case_id}: warning: {p.what}" + (f" — {p.fix}" if p.fix else "")
                for p in self.problems]

    def format(self) -> list[str]:
        """Every problem line, then the summary as readable lines."""
        s = self.summary()
        lines = self.problem_lines()
        lines.append(f"{s['rows']} rows, {s['cases']} usable cases, {s['errors']} errors, {s['warnings']} warnings")
        lines.append("sites: " + (", ".join(f"{k} {v}" for k, v in s["sites"].items()) or "none"))
        for task in CLASSIFICATION_TASKS:
            t = s["labels"][task]
            lines.append(f"{task}: {t['positive']} positive, {t['negative']} negative, {t['missing']} missing")
        k = s["labels"]["ki67"]
        stats = (f", mean {k['mean']}, median {k['median']}, range {k['min']:g}–{k['max']:g}" if k["present"] else "")
        lines.append(f"ki67: {k['present']} present, {k['missing']} missing{stats}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report: ok, summary, every problem."""
        return {"ok": self.ok, "summary": self.summary(),
                "problems": [{"case_id": p.case_id, "severity": p.severity, "what": p.what, "fix": p.fix}
                             for p in self.problems]}


# ----- per-case checks ------------------------------------------------------------------------------


def _spacing_fix(spacing: tuple[float, ...], dicom: bool) -> str:
    """Where an implausible spacing comes from: the header of a file, or a DICOM series' slice positions."""
    if not dicom:
        return "fix the voxel size in the file header (NIfTI pixdim / NRRD space directions / MHA ElementSpacing)"
    if all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing[:2]):
        return ("the slice positions (ImagePositionPatient) are that far apart: this series is not a thin-slice "
                "volume; choose the post-contrast series with 'image_series_uid'")
    return "check PixelSpacing in the DICOM headers, or choose another series with 'image_series_uid'"


class _Checker:
    """Collects the problems of one case."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.problems: list[Problem] = []

    def error(self, what: str, fix: str) -> None:
        self.problems.append(Problem(self.case.case_id, what, fix, "error"))

    def warn(self, what: str, fix: str) -> None:
        self.problems.append(Problem(self.case.case_id, what, fix, "warning"))

    def read(self, role: str) -> ImageRead | None:
        path = getattr(self.case, role)
        uid = self.case.extra.get(f"{role}_series_uid") or None
        try:
            read = read_image_checked(path, series_uid=uid)
        except ImageReadError as exc:
            self.error(f"{role} {path}: {exc.what}", exc.fix or "")
            return None
        if read.summary and "others:" in read.summary:
            self.warn(f"{role} folder holds several DICOM series; read {read.summary}",
                      f"add a '{role}_series_uid' column to choose another")
        for note in read.notes:
            (self.error if note.severity == "error" else self.warn)(f"{role} {path}: {note.what}", note.fix)
        image = self.volume(role, read.image, dicom=read.dicom)
        return None if image is None else ImageRead(image, read.summary, read.notes, read.series_uid, read.dicom)

    def read_mask(self, image: ImageRead | None) -> sitk.Image | None:
        """The mask as read; a DICOM SEG needs the image (its grid and series) and comes back on its grid."""
        case = self.case
        same_uid = (case.extra.get("mask_series_uid") or None) == (case.extra.get("image_series_uid") or None)
        if os.path.abspath(case.mask) == os.path.abspath(case.image) and same_uid:
            self.error("mask names the same file as the image", "give the tumour segmentation in the 'mask' column")
            return None
        try:
            if seg_file(case.mask) is None:
                read = self.read("mask")
                return None if read is None else read.image
            if image is None:
                return None  # a SEG is placed on the image's grid: nothing to place it on
            return read_case_mask(case, image.image, image.series_uid)
        except ImageReadError as exc:
            self.error(f"mask {case.mask}: {exc.what}", exc.fix or "")
            return None

    def volume(self, role: str, image: sitk.Image, *, dicom: bool = False) -> sitk.Image | None:
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            self.warn(f"{role} is 4D with a single time point; read as 3D", "save it as a 3D volume to silence this")
        try:
            image = as_volume(image, role)
        except ImageReadError as exc:
            self.error(f"{role} {exc.what.removeprefix('image ')}", exc.fix or "")
            return None
        spacing = image.GetSpacing()
        if any(not (MIN_SPACING_MM <= s <= MAX_SPACING_MM) for s in spacing):
            self.error(f"{role} spacing {tuple(round(s, 4) for s in spacing)} mm is implausible "
                       f"(expected {MIN_SPACING_MM}–{MAX_SPACING_MM} mm)", _spacing_fix(spacing, dicom))
            return None
        return image

    def check_image(self, image: sitk.Image) -> bool:
        arr = sitk.GetArrayViewFromImage(image)
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                self.error(f"image has {bad} NaN/Inf voxels", "re-export the image; NaN/Inf cannot be normalised")
                return False
        lo, hi = arr.min(), arr.max()
        if lo == hi:
            self.error(f"image is constant (every voxel = {lo:g})", "check the file is the post-contrast volume, not a blank")
            return False
        return True

    def check_mask_values(self, mask: sitk.Image) -> bool:
        arr = sitk.GetArrayViewFromImage(mask)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                self.error("mask has NaN/Inf voxels", "save the mask as integer labels")
                return False
            fractional = np.any(arr != np.round(arr))
        else:
            fractional = False
        if arr.min() < 0:
            self.error(f"mask has negative values (min {arr.min():g})", "save the mask as 0 background, 1 tumour")
            return False
        if fractional:
            self.warn("mask has fractional values (a probability map?); tumour taken where >= 0.5",
                      "save a binary mask (0 background, 1 tumour)")
            return True
        labels = np.unique(arr) if arr.dtype != np.uint8 else np.flatnonzero(np.bincount(arr.ravel(), minlength=2))
        labels = labels[labels != 0]
        if len(labels) > 1:
            shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", …" if len(labels) > 8 else "")
            self.warn(f"mask is not binary (labels {shown}); all non-zero labels are taken as tumour",
                      "save a binary mask (0 background, 1 tumour) if some labels are not tumour")
        return True

    def check_geometry(self, image: sitk.Image, mask: sitk.Image) -> sitk.Image | None:
        binary = binarize_mask(mask)  # keep a reference: an array view does not own the image
        if not np.any(sitk.GetArrayViewFromImage(binary)):
            self.error("mask is empty (no tumour voxel)", "give the tumour segmentation of this case")
            return None
        diffs = grid_differences(mask, image)
        if diffs:
            overlap = overlap_fraction(mask, image)
            if overlap <= 0:
                self.error(f"mask grid does not overlap the image in physical space ({'; '.join(diffs)})",
                           "use the mask drawn on this image (check origin and orientation)")
                return None
            part = "" if overlap > 0.999 else f"; only {overlap:.0%} of the mask's box lies inside the image"
            self.warn(f"mask grid differs from the image ({'; '.join(diffs)}){part}; "
                      "resampled nearest-neighbour onto the image grid",
                      "save the mask on the image grid to silence this")
        try:
            on_grid = mask_on_image_grid(mask, image, "mask")
        except ImageReadError as exc:
            self.error(f"mask {exc.what}", exc.fix or "")
            return None
        if not np.any(sitk.GetArrayViewFromImage(on_grid)):
            self.error("tumour lies outside the image once the mask is put on the image grid",
                       "use the mask drawn on this image (check origin and orientation)")
            return None
        return on_grid

    def check_tumour(self, on_grid: sitk.Image) -> None:
        arr = sitk.GetArrayViewFromImage(on_grid)
        touching = []
        for axis, name in zip((2, 1, 0), "xyz"):  # numpy axes are z, y, x
            if np.take(arr, 0, axis=axis).any():
                touching.append(f"{name}-")
            if np.take(arr, -1, axis=axis).any():
                touching.append(f"{name}+")
        if touching:
            self.warn(f"tumour touches the volume border ({', '.join(touching)}); the peritumoral shell is cut there",
                      "use a field of view that contains the whole tumour and its surroundings")
        n = int(np.count_nonzero(arr))
        if n < MIN_TUMOUR_VOXELS:
            vol = n * float(np.prod(on_grid.GetSpacing()))
            self.warn(f"tumour has only {n} voxels ({vol:.1f} mm³)", "check the mask; core/rim regions will be unreliable")
        elif n > MAX_TUMOUR_FRACTION * arr.size:
            self.warn(f"mask covers {n / arr.size:.0%} of the volume", "check the mask is not inverted (tumour = 1)")


def validate_case(case: Case) -> list[Problem]:
    """Read a case's image and mask and return every problem found (errors and warnings)."""
    check = _Checker(case)
    try:
        image = check.read("image")
        mask = check.read_mask(image)
        image_ok = image is not None and check.check_image(image.image)
        mask_ok = mask is not None and check.check_mask_values(mask)
        if image_ok and mask_ok:
            on_grid = check.check_geometry(image.image, mask)
            if on_grid is not None:
                check.check_tumour(on_grid)
    except Exception as exc:  # noqa: BLE001 — an unforeseen failure of one case must not stop the others
        check.error(f"cannot be checked ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                    "check the files; report this if they open in a viewer")
    return check.problems


def _shared_files(cases: list[Case]) -> list[Problem]:
    """Warn when two cases point at the same image file (a duplicate patient leaks across splits)."""
    first: dict[str, str] = {}
    problems = []
    for c in cases:
        key = os.path.normcase(os.path.abspath(c.image))
        if key in first:
            problems.append(Problem(c.case_id, f"same image file as case {first[key]}",
                                    "remove the duplicate row or fix the path", "warning"))
        else:
            first[key] = c.case_id
    return problems


def validate_cases(cases: Iterable[Case], *, workers: int = 1, progress: bool = False) -> ValidationReport:
    """Check every case (in a thread pool when workers > 1); problems come back in case order."""
    cases = list(cases)
    workers = max(1, int(workers))
    if workers == 1:
        results: Iterable[list[Problem]] = map(validate_case, cases)
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate")
        results = pool.map(validate_case, cases)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(cases), desc="validate", unit="case")
    try:
        per_case = list(results)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # joined before the report exists: nothing outlives it
    problems = [p for ps in per_case for p in ps] + _shared_files(cases)
    usable = [c for c, ps in zip(cases, per_case) if not any(p.severity == "error" for p in ps)]
    return ValidationReport(cases=usable, problems=problems, rows=len(cases), checked=cases)


def _rejected_rows(path: Path, cases: list[Case], table_problems: list[Problem]) -> list[Case]:
    """Rows the table check rejected, as label-less cases, so their files are checked too."""
    flagged = {p.case_id for p in table_problems}
    kept = {c.case_id for c in cases}
    rows: list[Case] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for rowno, raw in enumerate(csv.DictReader(fh), start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
            ident = row.get("case_id") or f"row {rowno}"
            if ident not in flagged or ident in kept or not row.get("image") or not row.get("mask"):
                continue
            kept.add(ident)
            extra = {k: v for k, v in row.items() if k.endswith("_series_uid") or k == "mask_segment"}
            rows.append(Case(ident, path.parent / row["image"], path.parent / row["mask"], row.get("site", ""),
                             dict.fromkeys(TASKS), None, extra))
    return rows


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return sum(1 for row in csv.reader(fh) if any(cell.strip() for cell in row)) - 1


def validate_manifest(path: str | os.PathLike, *, workers: int = 1, progress: bool = False) -> ValidationReport:
    """Table problems of the manifest plus every case's image problems, all in one report.

    Rows rejected by the table check still have their files checked, so one run lists everything.
    A manifest that cannot be read at all (missing file, missing columns) raises ManifestError.
    """
    path = Path(path)
    cases, table_problems = load_manifest(path)
    rejected = _rejected_rows(path, cases, table_problems) if table_problems else []
    report = validate_cases(cases + rejected, workers=workers, progress=progress)
    rejected_ids = {c.case_id for c in rejected}
    report.cases = [c for c in report.cases if c.case_id not in rejected_ids]
    report.checked = cases
    report.problems = list(table_problems) + report.problems
    report.rows = max(_count_rows(path), len(cases))
    return report
