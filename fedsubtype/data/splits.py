"""Train/validation/test splits: honour a manifest's `split` column, otherwise a seeded stratified split."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ConfigError, UserError
from fedsubtype.data.manifest import SPLITS, Case

STRATIFY_CHOICES: tuple[str, ...] = ("subtype", "site", "site+subtype", "none", *TASKS)
"""`subtype` = the ER/PR/HER2 combination; a task name = that label; missing labels are their own stratum."""


def _label_code(case: Case, task: str) -> str:
    value = case.labels.get(task)
    if value is None:
        return "?"
    if task == "ki67":
        return "hi" if value >= 20 else "lo"  # the St Gallen Ki-67 cut-off
    return str(int(value))


def stratum_of(case: Case, stratify_on: str) -> str:
    """The stratum key of one case (missing labels are kept as '?', never merged into negatives)."""
    if stratify_on == "none":
        return "all"
    if stratify_on == "subtype":
        return "/".join(_label_code(case, t) for t in CLASSIFICATION_TASKS)
    if stratify_on == "site":
        return case.site
    if stratify_on == "site+subtype":
        return case.site + "|" + stratum_of(case, "subtype")
    return _label_code(case, stratify_on)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ConfigError(f"expected three fractions (train, val, test), got {len(fractions)}", "use e.g. [0.7, 0.1, 0.2]",
                          where="data.split_fractions")
    tr, va, te = (float(f) for f in fractions)
    if min(tr, va, te) < 0 or tr <= 0 or not math.isclose(tr + va + te, 1.0, abs_tol=1e-6):
        raise ConfigError(f"fractions {list(fractions)} must be >= 0, train > 0, and sum to 1", "use e.g. [0.7, 0.1, 0.2]",
                          where="data.split_fractions")
    return tr, va, te


def _coarsen(strata: list[str], min_count: int) -> list[str]:
    """Merge strata with fewer than `min_count` members into one 'rare' stratum so scikit-learn can stratify."""
    counts = Counter(strata)
    return [s if counts[s] >= min_count else "rare" for s in strata]


def _take(indices: np.ndarray, strata: list[str], n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (rest, taken) with `n_take` taken, stratified when the strata allow it."""
    from sklearn.model_selection import train_test_split

    if n_take <= 0:
        return indices, indices[:0]
    if n_take >= len(indices):
        return indices[:0], indices
    labels = [strata[i] for i in indices]
    for attempt in (labels, _coarsen(labels, 2)):
        n_classes = len(set(attempt))
        if n_classes < 2 or min(Counter(attempt).values()) < 2 or n_take < n_classes or len(indices) - n_take < n_classes:
            continue
        rest, taken = train_test_split(indices, test_size=n_take, random_state=seed, stratify=attempt)
        return np.sort(rest), np.sort(taken)
    rest, taken = train_test_split(indices, test_size=n_take, random_state=seed, shuffle=True)
    return np.sort(rest), np.sort(taken)


def _sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """(n_val, n_test): rounded, at least one each when its fraction > 0 and there are enough cases."""
    _, fva, fte = fractions
    n_test = int(round(n * fte))
    n_val = int(round(n * fva))
    if fte > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if fva > 0 and n_val == 0 and n >= 3:
        n_val = 1
    while n - n_test - n_val < 1 and (n_test > 0 or n_val > 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def stratified_split(cases: Iterable[Case], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                     stratify_on: str = "subtype") -> dict[str, list[Case]]:
    """Cases by split name ('train', 'val', 'test').

    When every case carries a `split` (manifest column) it is used as is. Otherwise the cases (sorted by
    case_id, so input order does not matter) are split with scikit-learn, stratified on `stratify_on`
    with missing labels as their own stratum; rare strata are pooled, and the split is deterministic for a seed.
    """
    cases = sorted(cases, key=lambda c: c.case_id)
    if stratify_on not in STRATIFY_CHOICES:
        raise ConfigError(f"unknown stratify_on {stratify_on!r}", f"use one of {', '.join(STRATIFY_CHOICES)}",
                          where="data.stratify_on")
    with_split = [c for c in cases if c.split]
    if with_split:
        if len(with_split) != len(cases):
            missing = next(c.case_id for c in cases if not c.split)
            raise UserError(f"the 'split' column is filled for {len(with_split)} of {len(cases)} cases (e.g. {missing} has none)",
                            "fill it for every row (train/val/test) or remove the column to get a stratified split",
                            where="manifest")
        return {name: [c for c in cases if c.split == name] for name in SPLITS}
    fr = _check_fractions(fractions)
    if not cases:
        return {name: [] for name in SPLITS}
    n_val, n_test = _sizes(len(cases), fr)
    strata = [stratum_of(c, stratify_on) for c in cases]
    all_idx = np.arange(len(cases))
    rest, test = _take(all_idx, strata, n_test, seed)
    train, val = _take(rest, strata, n_val, seed + 1)
    return {"train": [cases[i] for i in train], "val": [cases[i] for i in val], "test": [cases[i] for i in test]}


def with_splits(splits: dict[str, list[Case]]) -> list[Case]:
    """The cases with their `split` field set from the dict (for writing a manifest back)."""
    from dataclasses import replace

    return [replace(c, split=name) for name in SPLITS for c in splits.get(name, [])]


def write_split_csv(splits: dict[str, list[Case]], path: str | Path) -> None:
    """Write `case_id,site,split` (atomic), train then val then test."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "site", "split"])
    for name in SPLITS:
        for c in splits.get(name, []):
            w.writerow([c.case_id, c.site, name])
    atomic_write_text(path, buf.getvalue())


def cohort_summary(cases: Sequence[Case]) -> dict[str, Any]:
    """Aggregate-only description of a cohort (counts, sites, label prevalence); never case ids."""
    out: dict[str, Any] = {"n_cases": len(cases), "sites": dict(sorted(Counter(c.site for c in cases).items()))}
    labels: dict[str, Any] = {}
    for t in TASKS:
        values = [c.labels.get(t) for c in cases if c.labels.get(t) is not None]
        entry: dict[str, Any] = {"n": len(values), "missing": len(cases) - len(values)}
        if values and t in CLASSIFICATION_TASKS:
            pos = sum(1 for v in values if v == 1)
            entry.update(positive=pos, prevalence=round(pos / len(values), 4))
        elif values:
            arr = np.asarray(values, dtype=float)
            entry.update(mean=round(float(arr.mean()), 2), median=round(float(np.median(arr)), 2))
        labels[t] = entry
    out["labels"] = labels
    return out
