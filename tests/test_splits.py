"""Splits: stratification, determinism, honouring a manifest's split column, the splits.csv file."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedsubtype.errors import ConfigError, UserError
from fedsubtype.data.manifest import Case
from fedsubtype.data.splits import cohort_summary, stratified_split, stratum_of, write_split_csv


def _cohort(n: int = 200, seed: int = 3, split: bool = False) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        er = float(rng.random() < 0.75)
        her2 = None if rng.random() < 0.1 else float(rng.random() < 0.2)
        labels = {"er": er, "pr": float(er and rng.random() < 0.8), "her2": her2, "ki67": None}
        sp = ("train", "val", "test")[i % 3] if split else None
        cases.append(Case(f"c{i:03d}", Path(f"{i}.nii.gz"), Path(f"{i}_m.nii.gz"), f"site{i % 3}", labels, sp))
    return cases


def test_fractions_and_disjoint_cover() -> None:
    cases = _cohort()
    s = stratified_split(cases, (0.7, 0.1, 0.2), seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (140, 20, 40)
    ids = [c.case_id for part in s.values() for c in part]
    assert sorted(ids) == sorted(c.case_id for c in cases)


def test_stratified_prevalence_is_kept() -> None:
    cases = _cohort(400)
    s = stratified_split(cases, (0.7, 0.1, 0.2), seed=5)
    overall = Counter(stratum_of(c, "subtype") for c in cases)
    test = Counter(stratum_of(c, "subtype") for c in s["test"])
    for stratum, n in overall.items():
        if n >= 20:  # each common stratum is within one case of its share
            assert abs(test[stratum] - n * 0.2) <= 1.0, stratum
    # missing HER2 is its own stratum, not merged into negatives
    assert any("?" in k for k in test)


def test_deterministic_and_order_independent() -> None:
    cases = _cohort()
    a = stratified_split(cases, seed=7)
    b = stratified_split(list(reversed(cases)), seed=7)
    c = stratified_split(cases, seed=8)
    ids = lambda s: {k: [x.case_id for x in v] for k, v in s.items()}  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_honours_split_column() -> None:
    cases = _cohort(30, split=True)
    s = stratified_split(cases, (0.5, 0.25, 0.25), seed=1)
    assert all(c.split == name for name, part in s.items() for c in part)
    assert [len(s[k]) for k in ("train", "val", "test")] == [10, 10, 10]


def test_partial_split_column_is_an_error() -> None:
    cases = _cohort(6, split=True)
    cases[2] = Case(cases[2].case_id, cases[2].image, cases[2].mask, cases[2].site, cases[2].labels, None)
    with pytest.raises(UserError, match="split"):
        stratified_split(cases)


def test_tiny_and_rare_strata_still_split() -> None:
    cases = _cohort(7, seed=11)
    s = stratified_split(cases, (0.7, 0.1, 0.2), seed=0, stratify_on="site+subtype")
    assert len(s["train"]) >= 1 and len(s["val"]) == 1 and len(s["test"]) == 1


def test_bad_fractions_and_stratify_key() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        stratified_split(_cohort(10), (0.5, 0.1, 0.1))
    with pytest.raises(ConfigError, match="stratify_on"):
        stratified_split(_cohort(10), stratify_on="colour")


def test_write_split_csv(tmp_path: Path) -> None:
    s = stratified_split(_cohort(20), seed=0)
    write_split_csv(s, tmp_path / "splits.csv")
    rows = list(csv.DictReader(open(tmp_path / "splits.csv", encoding="utf-8")))
    assert set(rows[0]) == {"case_id", "site", "split"}
    assert Counter(r["split"] for r in rows) == {k: len(v) for k, v in s.items() if v}


def test_cohort_summary_is_aggregate_only() -> None:
    cases = _cohort(50)
    summary = cohort_summary(cases)
    assert summary["n_cases"] == 50 and sum(summary["sites"].values()) == 50
    assert summary["labels"]["ki67"] == {"n": 0, "missing": 50}
    assert summary["labels"]["her2"]["n"] + summary["labels"]["her2"]["missing"] == 50
    assert "c000" not in repr(summary)
