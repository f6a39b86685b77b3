"""Virtual sites over any manifest: which site each case belongs to, and its train/val/test split.

Partitioners (FLamby / Flower-datasets vocabulary):
  natural   the manifest's own grouping (`site` column, or any other column)
  iid       cases dealt to K sites at random, stratified by molecular subtype
  dirichlet label skew: each subtype's cases spread over K sites with proportions ~ Dir(alpha)
  quantity  site sizes ~ Dir(alpha), labels IID within sites
  feature   scanner / feature shift: sites are the values of a manifest column
            (e.g. manufacturer, field_strength); numeric columns are cut into `sites` quantile bins

Every partition is deterministic given its seed and is written as a CSV (case_id, site, split).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ConfigError
from fedsubtype.data.manifest import Case

log = logging.getLogger(__name__)

PARTITIONERS: tuple[str, ...] = ("natural", "iid", "dirichlet", "quantity", "feature")
PartitionKind = Literal["natural", "iid", "dirichlet", "quantity", "feature"]


@dataclass(frozen=True)
class PartitionSpec:
    """How to cut a cohort into virtual sites and split each site into train/val/test."""

    kind: str = "natural"
    sites: int | None = None          # K for iid / dirichlet / quantity / numeric feature bins
    alpha: float = 1.0                # Dirichlet concentration (dirichlet, quantity)
    column: str = "site"              # natural / feature: the manifest column that names the group
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    min_cases: int = 8                # dirichlet / quantity: smallest site allowed (re-drawn until met)
    external_site: str | None = None  # natural: a site held out entirely as an external test set
    keep_manifest_split: bool = False  # use the manifest's `split` column where present
    seed: int = 0

    def validate(self, where: str = "partition") -> None:
        """One-line ConfigError for settings no partition can honour."""
        if self.kind not in PARTITIONERS:
            raise ConfigError(f"unknown partitioner '{self.kind}'", f"use one of {', '.join(PARTITIONERS)}", where=f"{where}.kind")
        if self.kind in ("dirichlet", "quantity") and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be > 0, got {self.alpha}", "use e.g. 100 (near IID), 1 or 0.3 (strong skew)", where=f"{where}.alpha")
        if self.kind in ("iid", "dirichlet", "quantity") and (self.sites is None or self.sites < 1):
            raise ConfigError(f"'{self.kind}' needs sites >= 1, got {self.sites}", "set partition.sites", where=f"{where}.sites")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}", where=f"{where}.{name}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("val_fraction + test_fraction must leave cases for training", "lower them", where=where)
        if self.min_cases < 1:
            raise ConfigError(f"min_cases must be >= 1, got {self.min_cases}", where=f"{where}.min_cases")


@dataclass(frozen=True)
class Partition:
    """case_id -> (site, split), with the cases themselves, in manifest order."""

    cases: tuple[Case, ...]
    site: Mapping[str, str]
    split: Mapping[str, str]
    external_site: str | None = None

    @property
    def sites(self) -> list[str]:
        """Site names in a stable order (sorted)."""
        return sorted(set(self.site.values()))

    def select(self, sites: Sequence[str] | None = None, splits: Sequence[str] | None = None) -> list[Case]:
        """Cases of the given sites and splits (all when None), in manifest order."""
        return [c for c in self.cases
                if (sites is None or self.site[c.case_id] in sites)
                and (splits is None or self.split[c.case_id] in splits)]

    def internal_sites(self) -> list[str]:
        """Sites that take part in training (every site but the external one)."""
        return [s for s in self.sites if s != self.external_site]

    def to_csv(self) -> str:
        """The partition as CSV text: case_id, site, split."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case_id", "site", "split"])
        for c in self.cases:
            writer.writerow([c.case_id, self.site[c.case_id], self.split[c.case_id]])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> None:
        """Write :meth:`to_csv` atomically."""
        atomic_write_text(path, self.to_csv())

    def label_table(self) -> dict[str, dict[str, int]]:
        """Per site: case count, positives per binary task, and subtype counts (for the report)."""
        table: dict[str, dict[str, int]] = {}
        for site in self.sites:
            members = self.select([site])
            row: dict[str, int] = {"cases": len(members)}
            for task in CLASSIFICATION_TASKS:
                row[f"{task}+"] = sum(1 for c in members if c.labels.get(task) == 1.0)
            for key, n in sorted(Counter(subtype_key(c) for c in members).items()):
                row[key] = n
            table[site] = row
        return table


def subtype_key(case: Case) -> str:
    """Molecular subtype used as the stratum for splits and label skew (HR = ER or PR)."""
    er, pr, her2 = (case.labels.get(t) for t in CLASSIFICATION_TASKS)
    if er is None and pr is None and her2 is None:
        return "unknown"
    hr = "HR+" if (er == 1.0 or pr == 1.0) else "HR-"
    her = "HER2+" if her2 == 1.0 else "HER2-"
    return f"{hr}/{her}"


def _stratified_deal(ids_by_stratum: Mapping[str, list[str]], shares: np.ndarray, rng: np.random.Generator) -> dict[str, int]:
    """Deal ids to groups in proportion to `shares`, stratum after stratum, like cards.

    Ids are laid out stratum by stratum (each shuffled) and dealt in an even pattern, so every group
    gets its share of each stratum, rare strata included, and group sizes are exact to one case.
    """
    order: list[str] = []
    for stratum in sorted(ids_by_stratum):
        ids = list(ids_by_stratum[stratum])
        rng.shuffle(ids)
        order.extend(ids)
    counts = np.zeros(len(shares))
    out: dict[str, int] = {}
    for i, cid in enumerate(order):
        group = int(np.argmax(shares * (i + 1) - counts))
        counts[group] += 1
        out[cid] = group
    return out


def _by_stratum(cases: Sequence[Case]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for c in cases:
        groups[subtype_key(c)].append(c.case_id)
    return groups


def _site_name(i: int) -> str:
    return f"site{i + 1}"


def _assign_sites(cases: Sequence[Case], spec: PartitionSpec, rng: np.random.Generator) -> dict[str, str]:
    kind = spec.kind
    if kind == "natural" or (kind == "feature" and spec.sites is None):
        return {c.case_id: _column(c, spec.column) for c in cases}
    if kind == "feature":
        return _feature_bins(cases, spec)
    k = int(spec.sites or 1)
    if kind == "iid":
        dealt = _stratified_deal(_by_stratum(cases), np.full(k, 1.0 / k), rng)
        return {cid: _site_name(g) for cid, g in dealt.items()}
    for _attempt in range(1000):
        if kind == "dirichlet":
            assigned: dict[str, int] = {}
            for stratum, ids in sorted(_by_stratum(cases).items()):
                shares = rng.dirichlet(np.full(k, spec.alpha))
                assigned.update(_stratified_deal({stratum: ids}, shares, rng))
        else:  # quantity
            shares = rng.dirichlet(np.full(k, spec.alpha))
            assigned = _stratified_deal(_by_stratum(cases), shares, rng)
        sizes = Counter(assigned.values())
        if all(sizes.get(g, 0) >= spec.min_cases for g in range(k)):
            return {cid: _site_name(g) for cid, g in assigned.items()}
    raise ConfigError(f"could not draw {k} sites with at least {spec.min_cases} cases each at alpha={spec.alpha}",
                      "lower partition.min_cases or partition.sites, or raise alpha", where="partition")


def _column(case: Case, column: str) -> str:
    if column == "site":
        return case.site
    value = case.extra.get(column, "")
    if value == "":
        raise ConfigError(f"case {case.case_id} has no value in column '{column}'",
                          "fill the column or choose another partition.column", where="partition.column")
    return str(value)


def _feature_bins(cases: Sequence[Case], spec: PartitionSpec) -> dict[str, str]:
    """A numeric manifest column cut into `sites` quantile bins (scanner/feature shift)."""
    raw = {c.case_id: _column(c, spec.column) for c in cases}
    try:
        values = {cid: float(v) for cid, v in raw.items()}
    except ValueError:
        raise ConfigError(f"column '{spec.column}' is not numeric, so it cannot be cut into {spec.sites} bins",
                          "leave partition.sites empty to use its values as sites", where="partition.column") from None
    k = int(spec.sites or 1)
    edges = np.quantile(np.array(list(values.values())), np.linspace(0, 1, k + 1)[1:-1])
    return {cid: f"{spec.column}_q{int(np.searchsorted(edges, v, side='right')) + 1}" for cid, v in values.items()}


def _split_site(members: Sequence[Case], spec: PartitionSpec, seed: int) -> dict[str, str]:
    """Stratified train/val/test inside one site (the library's split, stratified on molecular subtype)."""
    from fedsubtype.data.splits import stratified_split

    if not spec.keep_manifest_split:
        members = [replace(c, split=None) for c in members]
    fractions = (1.0 - spec.val_fraction - spec.test_fraction, spec.val_fraction, spec.test_fraction)
    splits = stratified_split(members, fractions, seed=seed, stratify_on="subtype")
    return {c.case_id: name for name, group in splits.items() for c in group}


def make_partition(cases: Sequence[Case], spec: PartitionSpec) -> Partition:
    """Assign every case a site and a split; errors for impossible requests, warnings for thin sites."""
    spec.validate()
    cases = tuple(cases)
    if not cases:
        raise ConfigError("the manifest has no cases", "check data.manifest", where="partition")
    if spec.sites is not None and spec.kind != "natural" and spec.sites > len(cases):
        raise ConfigError(f"{spec.sites} sites requested but only {len(cases)} cases",
                          "lower partition.sites", where="partition.sites")
    rng = np.random.default_rng(spec.seed)
    site = _assign_sites(cases, spec, rng)
    if spec.external_site is not None and spec.external_site not in set(site.values()):
        raise ConfigError(f"external_site '{spec.external_site}' is not a site of this partition",
                          f"use one of {', '.join(sorted(set(site.values())))}", where="partition.external_site")
    split: dict[str, str] = {}
    members_by_site: dict[str, list[Case]] = defaultdict(list)
    for c in cases:
        members_by_site[site[c.case_id]].append(c)
    for index, name in enumerate(sorted(members_by_site)):
        members = members_by_site[name]
        if name == spec.external_site:
            split.update({c.case_id: "test" for c in members})
        else:
            split.update(_split_site(members, spec, seed=spec.seed * 1000 + index))
    partition = Partition(cases, site, split, spec.external_site)
    for line in thin_site_warnings(partition):
        log.warning(line)
    return partition


def thin_site_warnings(partition: Partition) -> list[str]:
    """One line per (site, task) whose training split has no positive or no negative case."""
    lines = []
    for name in partition.internal_sites():
        train = partition.select([name], ["train"])
        for task in CLASSIFICATION_TASKS:
            values = [c.labels.get(task) for c in train]
            pos, neg = sum(v == 1.0 for v in values), sum(v == 0.0 for v in values)
            if pos == 0 or neg == 0:
                kind = "positive" if pos == 0 else "negative"
                lines.append(f"site '{name}' has no {kind} {task.upper()} case in its training split "
                             f"({pos} positive, {neg} negative) — its local {task.upper()} head learns from one class only")
    return lines


def read_partition_csv(path: str | Path, cases: Sequence[Case]) -> Partition:
    """Rebuild a Partition from a CSV written by :meth:`Partition.write_csv` (audit / reproduce a run)."""
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    by_id = {c.case_id: c for c in cases}
    unknown = [r["case_id"] for r in rows if r["case_id"] not in by_id]
    if unknown:
        raise ConfigError(f"partition lists case '{unknown[0]}' that the manifest lacks", "use the matching manifest", where=str(path))
    chosen = tuple(by_id[r["case_id"]] for r in rows)
    return Partition(chosen, {r["case_id"]: r["site"] for r in rows}, {r["case_id"]: r["split"] for r in rows})
