"""Which case goes to which site, each case's random streams, and its labels and latents (no images).

Every case draws from its own generators seeded by (seed, case index, stream), so results do not
depend on the number of worker processes, and label/latent studies can skip image rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedsubtype.phantom.biology import LATENT_COLUMNS, Biology, observe_labels, sample_biology, sample_latents
from fedsubtype.phantom.scanner import SiteProfile, site_profiles, site_sizes

STREAM_BIOLOGY, STREAM_IMAGE = 0, 1


@dataclass(frozen=True)
class PlannedCase:
    """One case before rendering: identity, site, true biology, latents and reported labels."""

    index: int
    case_id: str
    site: SiteProfile
    biology: Biology
    latents: dict[str, float]
    labels: dict[str, float | None]


def case_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one case's stream; independent of worker count and order."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def plan_cohort(cases: int, sites: int, seed: int) -> list[PlannedCase]:
    """Assign cases to sites (interleaved deterministically) and draw every case's biology and latents."""
    profiles = site_profiles(sites)
    sizes = site_sizes(cases, profiles)
    site_of = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    site_of = np.random.default_rng(np.random.SeedSequence([int(seed), 2**31 - 1])).permutation(site_of)
    planned = []
    for index in range(cases):
        profile = profiles[int(site_of[index])]
        rng = case_rng(seed, index, STREAM_BIOLOGY)
        bio = sample_biology(rng, profile.biology)
        latents = sample_latents(rng, bio)
        labels = observe_labels(rng, bio, profile.biology)
        planned.append(PlannedCase(index, f"ph{seed:03d}_{index:04d}", profile, bio, latents, labels))
    return planned


def latent_table(planned: list[PlannedCase]) -> pd.DataFrame:
    """case_id, site, true biology (true_*), subtype and every latent phenotype column."""
    rows = []
    for p in planned:
        row = {"case_id": p.case_id, "site": p.site.name, "true_er": p.biology.er, "true_pr": p.biology.pr,
               "true_her2": p.biology.her2, "true_ki67": round(p.biology.ki67, 2), "subtype": p.biology.subtype}
        row.update({k: round(float(p.latents[k]), 5) for k in LATENT_COLUMNS})
        rows.append(row)
    return pd.DataFrame(rows)


def label_table(planned: list[PlannedCase]) -> pd.DataFrame:
    """case_id, site and the reported labels (NaN where missing)."""
    return pd.DataFrame([{"case_id": p.case_id, "site": p.site.name,
                          **{k: (np.nan if v is None else v) for k, v in p.labels.items()}} for p in planned])


def sample_labels(cases: int, sites: int = 5, seed: int = 0) -> pd.DataFrame:
    """Reported labels, true biology and latents of a cohort without rendering any image (fast)."""
    planned = plan_cohort(cases, sites, seed)
    return label_table(planned).merge(latent_table(planned).drop(columns="site"), on="case_id")
