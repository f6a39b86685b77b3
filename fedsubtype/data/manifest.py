"""The case manifest (docs/architecture.md): one CSV row a case, paths relative to the manifest's folder."""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ManifestError

REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "image", "mask", "site", *TASKS)
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one case (or the manifest as a whole when case_id is '*')."""

    case_id: str
    what: str
    fix: str = ""
    severity: Literal["error", "warning"] = "error"

    def line(self) -> str:
        return f"{self.case_id}: {self.what}" + (f" — {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Case:
    """A validated manifest row. Missing labels are None, never 0."""

    case_id: str
    image: Path
    mask: Path
    site: str
    labels: Mapping[str, float | None]
    split: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def label_vector(self) -> np.ndarray:
        """Labels in TASKS order as float32; NaN where missing (Ki-67 in percent)."""
        return np.array([np.nan if self.labels.get(t) is None else self.labels[t] for t in TASKS], dtype=np.float32)

    def present_vector(self) -> np.ndarray:
        """True where the task's label is present."""
        return np.array([self.labels.get(t) is not None for t in TASKS], dtype=bool)


def _parse_label(task: str, raw: str) -> tuple[float | None, str | None]:
    text = (raw or "").strip()
    if text == "" or text.lower() in {"na", "nan", "none", "missing"}:
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, f"{task}={text!r} is not a number"
    if not math.isfinite(value):
        return None, f"{task}={text!r} is not finite"
    if task in CLASSIFICATION_TASKS:
        if value not in (0.0, 1.0):
            return None, f"{task}={text!r} must be 0, 1 or empty"
        return value, None
    if not 0.0 <= value <= 100.0:
        return None, f"{task}={text!r} must be a percentage in [0, 100] or empty"
    return value, None


def _resolve(base: Path, raw: str) -> Path:
    p = Path(raw.strip())
    return p if p.is_absolute() else (base / p)


def _rename_hint(missing: list[str], header: list[str]) -> str:
    """'rename 'Ki-67' to 'ki67'; ' for header names that look like a missing required column."""
    def key(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    pairs = []
    for col in missing:
        near = [h for h in header if key(h) == key(col)] or difflib.get_close_matches(col, header, n=1, cutoff=0.75)
        if near and near[0] not in REQUIRED_COLUMNS:
            pairs.append(f"rename '{near[0]}' to '{col}'")
    return "; ".join(pairs) + "; " if pairs else ""


def load_manifest(path: str | os.PathLike) -> tuple[list[Case], list[Problem]]:
    """Parse every row; return the usable cases and every problem found (one per line, all at once).

    Only the table is checked here; image content is checked by :mod:`fedsubtype.data.validation`.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest not found", "check the path or create one with `fedsubtype phantom` / `fedsubtype import`", where=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest ({exc.__class__.__name__})", "save it as UTF-8 CSV", where=str(path)) from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"missing column(s) {', '.join(missing)}",
                            _rename_hint(missing, header) + f"the header must contain {', '.join(REQUIRED_COLUMNS)}",
                            where=str(path))
    base = path.parent
    cases: list[Case] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for rowno, raw_row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw_row.items()}
        cid = row.get("case_id", "")
        ident = cid or f"row {rowno}"
        bad = False
        if not cid:
            problems.append(Problem(ident, "empty case_id", "give every row a unique case_id"))
            bad = True
        elif cid in seen:
            problems.append(Problem(cid, f"duplicate case_id (also on row {seen[cid]})", "make case_id unique"))
            bad = True
        else:
            seen[cid] = rowno
        for col in ("image", "mask", "site"):
            if not row.get(col):
                problems.append(Problem(ident, f"empty '{col}'", f"fill the '{col}' column"))
                bad = True
        labels: dict[str, float | None] = {}
        for task in TASKS:
            value, err = _parse_label(task, row.get(task, ""))
            if err:
                problems.append(Problem(ident, err, "fix the value or leave it empty for missing"))
                bad = True
            labels[task] = value
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            problems.append(Problem(ident, f"split={split!r} is not one of {', '.join(SPLITS)}", "fix it or leave it empty"))
            bad = True
        if bad:
            continue
        extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS and k != "split" and k}
        cases.append(Case(cid, _resolve(base, row["image"]), _resolve(base, row["mask"]), row["site"], labels, split, extra))
    if not cases and not problems:
        problems.append(Problem("*", "manifest has no rows", "add one row per case"))
    return cases, problems


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """Cases of a manifest whose table is clean; otherwise one ManifestError naming the first problem."""
    cases, problems = load_manifest(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{errors[0].line()}{more}", "run `fedsubtype validate` to list every problem", where=str(path))
    return cases


def _relative(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p, base)
    except ValueError:  # different drive on Windows
        return str(p)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def write_manifest(cases: Iterable[Case], path: str | os.PathLike) -> None:
    """Write cases as a manifest with paths relative to its folder (atomic)."""
    path = Path(path).absolute()
    cases = list(cases)
    extra_cols: list[str] = []
    for c in cases:
        for k in c.extra:
            if k not in extra_cols:
                extra_cols.append(k)
    has_split = any(c.split for c in cases)
    cols = [*REQUIRED_COLUMNS, *(["split"] if has_split else []), *extra_cols]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for c in cases:
        row = [c.case_id, _relative(Path(c.image).absolute(), path.parent), _relative(Path(c.mask).absolute(), path.parent), c.site]
        row += [_fmt(c.labels.get(t)) for t in TASKS]
        if has_split:
            row.append(c.split or "")
        row += [c.extra.get(k, "") for k in extra_cols]
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())
