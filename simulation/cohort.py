"""The study's data: the manifest (the phantom generated when asked), its partition, the warm cache, datasets.

Also scores a model on every site's test split and on the pooled test split in one prediction pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsubtype.configio import from_dict
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case, read_manifest

from .partition import Partition, PartitionSpec, make_partition
from .scenario import DataSpec, Scenario

log = logging.getLogger(__name__)

POOLED = "pooled"
"""Name of the pooled test split (every internal site's test cases) in results."""


def ensure_manifest(data: DataSpec, say: Callable[[str], None] = print) -> Path:
    """The manifest path; the phantom cohort is generated next to it first when absent and allowed."""
    manifest = Path(data.manifest)
    if manifest.is_file():
        return manifest
    if not data.phantom.generate_if_missing:
        raise UserError("manifest not found", "check data.manifest, or set data.phantom.generate_if_missing: true",
                        where=str(manifest))
    from fedsubtype.phantom import generate_cohort

    say(f"generating the phantom cohort ({data.phantom.cases} cases, {data.phantom.sites} sites) into {manifest.parent} ...")
    generate_cohort(manifest.parent, cases=data.phantom.cases, sites=data.phantom.sites, seed=data.phantom.seed)
    if not manifest.is_file():
        raise UserError("the phantom generator did not write the expected manifest",
                        "point data.manifest at <out_dir>/manifest.csv", where=str(manifest))
    return manifest


@dataclass
class Cohort:
    """Cases, their partition into virtual sites, and the preprocessing cache every method reads."""

    cases: list[Case]
    partition: Partition
    cache: Any
    preprocess_config: Any

    def dataset(self, cases: list[Case]) -> Any:
        """A CaseDataset over the cache (augmentation is added by `fedsubtype.train.loop.fit` for training sets)."""
        from fedsubtype.data.dataset import CaseDataset

        return CaseDataset(cases, self.cache, augment=None)

    def split(self, sites: list[str], split: str) -> list[Case]:
        """Cases of `sites` in one split."""
        return self.partition.select(sites, [split])

    def test_sets(self) -> dict[str, list[Case]]:
        """Every site's test split (external site included), plus the pooled internal test split."""
        out = {site: self.split([site], "test") for site in self.partition.sites}
        out[POOLED] = self.split(self.partition.internal_sites(), "test")
        return out


def build_preprocess_config(scen: Scenario) -> Any:
    """The scenario's preprocessing settings as the library's PreprocessConfig."""
    from fedsubtype.data.preprocess import PreprocessConfig

    return from_dict(PreprocessConfig, dict(scen.preprocess), "scenario.preprocess")


def load_cohort(scen: Scenario, spec: PartitionSpec, say: Callable[[str], None] = print, warm: bool = True) -> Cohort:
    """Read (or generate) the manifest, partition it, and (when `warm`) preprocess every case into the cache once."""
    from fedsubtype.data.cache import PreprocessCache

    manifest = ensure_manifest(scen.data, say)
    cases = read_manifest(manifest)
    if scen.data.max_cases is not None:
        if scen.data.max_cases < 1:
            raise UserError(f"data.max_cases must be >= 1, got {scen.data.max_cases}", "remove it to use every case",
                            where="scenario.data.max_cases")
        cases = cases[:scen.data.max_cases]
        say(f"using the first {len(cases)} cases of {manifest} (data.max_cases)")
    partition = make_partition(cases, spec)
    pcfg = build_preprocess_config(scen)
    cache = PreprocessCache(Path(scen.data.cache_dir), pcfg)
    if warm:
        say(f"preprocessing {len(cases)} cases into {scen.data.cache_dir} (cached; reused on later runs) ...")
        cache.warm(cases, workers=max(1, scen.data.cache_workers), progress=True)
    return Cohort(cases=list(cases), partition=partition, cache=cache, preprocess_config=pcfg)


def evaluate_everywhere(model: Any, cohort: Cohort, *, n_boot: int, seed: int,
                        device: str = "cpu") -> tuple[dict[str, dict[str, Any]], Any]:
    """Metrics of `model` on each site's test split and on the pooled test split, plus the pooled predictions."""
    import numpy as np

    from fedsubtype.evaluate.predictions import Predictions, predict_dataset
    from fedsubtype.evaluate.scoring import score_predictions

    everything = [c for site in cohort.partition.sites for c in cohort.split([site], "test")]
    preds = predict_dataset(model, cohort.dataset(everything), batch_size=16, device=device)
    site_of = {c.case_id: cohort.partition.site[c.case_id] for c in everything}
    internal = set(cohort.partition.internal_sites())

    def subset(keep: Callable[[str], bool]) -> Predictions:
        idx = np.array([i for i, cid in enumerate(preds.case_ids) if keep(site_of[cid])], dtype=int)
        # sites are the partition's virtual sites (the manifest's own site column may differ)
        return preds.subset(idx, sites=[site_of[preds.case_ids[i]] for i in idx])

    metrics: dict[str, dict[str, Any]] = {}
    for site in cohort.partition.sites:
        metrics[site] = score_predictions(subset(lambda s, site=site: s == site), n_boot=n_boot, seed=seed)
    pooled = subset(lambda s: s in internal)
    metrics[POOLED] = score_predictions(pooled, n_boot=n_boot, seed=seed)
    return metrics, pooled
