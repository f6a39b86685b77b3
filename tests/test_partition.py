"""Partitioners: counts, stratification, determinism, validation and thin-site warnings."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedsubtype.errors import ConfigError
from fedsubtype.data.manifest import Case
from simulation.partition import PartitionSpec, make_partition, read_partition_csv, subtype_key, thin_site_warnings


def _cohort(n: int = 400, seed: int = 0, sites: int = 4) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        er = float(rng.random() < 0.75)
        pr = float(er and rng.random() < 0.8)
        her2 = float(rng.random() < 0.15)
        labels = {"er": er, "pr": pr, "her2": her2, "ki67": float(rng.uniform(1, 60))}
        extra = {"manufacturer": ("GE", "Siemens", "Philips")[i % 3], "field_strength": ("1.5", "3.0")[i % 2]}
        cases.append(Case(f"c{i:04d}", Path(f"{i}.nii.gz"), Path(f"{i}_m.nii.gz"), f"S{i % sites}", labels, None, extra))
    return cases


@pytest.mark.parametrize("kind", ["natural", "iid", "dirichlet", "quantity", "feature"])
def test_every_case_gets_one_site_and_split(kind: str) -> None:
    cases = _cohort()
    spec = PartitionSpec(kind=kind, sites=None if kind in ("natural", "feature") else 5, alpha=1.0,
                         column="manufacturer" if kind == "feature" else "site", seed=3)
    part = make_partition(cases, spec)
    assert set(part.site) == {c.case_id for c in cases}
    assert set(part.split.values()) <= {"train", "val", "test"}
    expected = {"natural": 4, "iid": 5, "dirichlet": 5, "quantity": 5, "feature": 3}[kind]
    assert len(part.sites) == expected


def test_natural_keeps_the_manifest_site() -> None:
    cases = _cohort()
    part = make_partition(cases, PartitionSpec(kind="natural"))
    assert all(part.site[c.case_id] == c.site for c in cases)


def test_iid_sizes_and_subtype_mix_are_even() -> None:
    cases = _cohort(500)
    part = make_partition(cases, PartitionSpec(kind="iid", sites=5, seed=1))
    sizes = Counter(part.site.values())
    assert max(sizes.values()) - min(sizes.values()) <= 5  # one case per stratum at most
    overall = Counter(subtype_key(c) for c in cases)
    for site in part.sites:
        members = part.select([site])
        mix = Counter(subtype_key(c) for c in members)
        for key, n in overall.items():
            assert abs(mix[key] / len(members) - n / len(cases)) < 0.05


def test_splits_are_stratified_within_each_site() -> None:
    cases = _cohort(600)
    spec = PartitionSpec(kind="natural", val_fraction=0.1, test_fraction=0.2)
    part = make_partition(cases, spec)
    for site in part.sites:
        members = part.select([site])
        counts = Counter(part.split[c.case_id] for c in members)
        assert abs(counts["test"] - 0.2 * len(members)) <= 1
        assert abs(counts["val"] - 0.1 * len(members)) <= 1
        for key, n in Counter(subtype_key(c) for c in members).items():
            test_n = sum(1 for c in members if subtype_key(c) == key and part.split[c.case_id] == "test")
            assert abs(test_n - 0.2 * n) <= 1.5


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    cases = _cohort(800)

    def spread(alpha: float) -> float:
        part = make_partition(cases, PartitionSpec(kind="dirichlet", sites=5, alpha=alpha, seed=0, min_cases=5))
        fractions = [np.mean([c.labels["er"] for c in part.select([s])]) for s in part.sites]
        return float(np.std(fractions))

    assert spread(0.3) > spread(100.0)
    assert spread(100.0) < 0.05


def test_same_seed_same_partition_other_seed_differs() -> None:
    cases = _cohort()
    spec = PartitionSpec(kind="dirichlet", sites=4, alpha=0.5, seed=7)
    assert make_partition(cases, spec).to_csv() == make_partition(cases, spec).to_csv()
    other = PartitionSpec(kind="dirichlet", sites=4, alpha=0.5, seed=8)
    assert make_partition(cases, spec).to_csv() != make_partition(cases, other).to_csv()


def test_external_site_is_all_test_and_csv_roundtrips(tmp_path: Path) -> None:
    cases = _cohort()
    part = make_partition(cases, PartitionSpec(kind="natural", external_site="S3"))
    assert {part.split[c.case_id] for c in part.select(["S3"])} == {"test"}
    assert part.internal_sites() == ["S0", "S1", "S2"]
    part.write_csv(tmp_path / "partition.csv")
    again = read_partition_csv(tmp_path / "partition.csv", cases)
    assert again.site == part.site and again.split == part.split
    assert (tmp_path / "partition.csv").read_text(encoding="utf-8").splitlines()[0] == "case_id,site,split"


def test_feature_shift_bins_a_numeric_column() -> None:
    cases = _cohort()
    part = make_partition(cases, PartitionSpec(kind="feature", column="field_strength", sites=2))
    assert sorted(Counter(part.site.values()).values()) == [200, 200]


@pytest.mark.parametrize("spec, needle", [
    (PartitionSpec(kind="banana"), "unknown partitioner 'banana'"),
    (PartitionSpec(kind="dirichlet", sites=3, alpha=0.0), "alpha must be > 0"),
    (PartitionSpec(kind="dirichlet", sites=3, alpha=-1.0), "alpha must be > 0"),
    (PartitionSpec(kind="iid", sites=50), "50 sites requested but only 20 cases"),
    (PartitionSpec(kind="natural", external_site="nowhere"), "external_site 'nowhere'"),
    (PartitionSpec(kind="feature", column="colour"), "no value in column 'colour'"),
])
def test_bad_settings_are_one_line_errors(spec: PartitionSpec, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_partition(_cohort(20), spec)
    assert needle in err.value.line() and "\n" not in err.value.line()


def test_site_without_a_positive_case_warns_naming_site_and_task(caplog: pytest.LogCaptureFixture) -> None:
    cases = _cohort(200)
    cases = [Case(c.case_id, c.image, c.mask, c.site, {**c.labels, "her2": 0.0} if c.site == "S1" else c.labels)
             for c in cases]
    with caplog.at_level(logging.WARNING, logger="simulation.partition"):
        part = make_partition(cases, PartitionSpec(kind="natural"))
    lines = thin_site_warnings(part)
    assert any("'S1'" in line and "HER2" in line and "no positive" in line for line in lines)
    assert not any("'S0'" in line for line in lines)
    assert any("'S1'" in r.getMessage() and "HER2" in r.getMessage() for r in caplog.records)
