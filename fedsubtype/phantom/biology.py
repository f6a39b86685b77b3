"""Biomarker labels and the latent tumour phenotypes they drive (docs/phantom.md).

Each case draws its *true* biology (ER, PR, HER2, Ki-67) from a site's prevalence, then a set of
latent phenotype variables, each a noisy function of the biology plus nuisance variation, and
finally the *observed* labels (with a little label noise and some missing values) that go into
the manifest. Nothing here touches images, so label/latent studies of thousands of cases are fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# HR/HER2 groups in the order used by prevalence vectors.
GROUPS: tuple[str, ...] = ("HR+/HER2-", "HR+/HER2+", "HR-/HER2+", "HR-/HER2-")

SEER_GROUP_PREVALENCE: tuple[float, ...] = (0.74, 0.10, 0.04, 0.11)
"""SEER, cases of known status (Howlader et al. 2014; SEER Cancer Stat Facts), renormalised to sum to 1."""

TRIAL_GROUP_PREVALENCE: tuple[float, ...] = (0.42, 0.18, 0.10, 0.30)
"""Neoadjuvant-trial-like enrichment (I-SPY-like cohorts over-represent HER2+ and triple-negative)."""

# Within HR+ (84 % of cases): ER+/PR+ 76 %, ER+/PR- 7 %, ER-/PR+ 1 % of all cases.
HR_POSITIVE_PATTERNS: tuple[tuple[int, int], ...] = ((1, 1), (1, 0), (0, 1))
HR_POSITIVE_PATTERN_P: tuple[float, ...] = (76 / 84, 7 / 84, 1 / 84)

# Median Ki-67 (percent) of the true biology per group; log-normal spread KI67_LOG_SD.
KI67_GROUP_MEDIAN: tuple[float, ...] = (16.0, 28.0, 36.0, 50.0)
KI67_LOG_SD = 0.6
KI67_PR_NEGATIVE_FACTOR = 1.3  # ER+/PR- luminal tumours proliferate more (luminal B-like)

LATENT_REGIONS: dict[str, str] = {
    "diameter_mm": "shape",
    "elongation": "shape",
    "lobulation": "margin",
    "spiculation": "margin",
    "enhancement": "core",
    "necrosis": "core",
    "heterogeneity_fine": "core",
    "heterogeneity_coarse": "core",
    "rim_enhancement": "rim",
    "oedema": "peritumoral",
    "peri_enhancement": "peritumoral",
    "bpe": "background",
    "fgt_density": "background",
}
"""Every latent phenotype column and the place in the image where its evidence lies."""

LATENT_COLUMNS: tuple[str, ...] = tuple(LATENT_REGIONS)


@dataclass(frozen=True)
class SiteBiology:
    """What differs between sites' patient populations: subtype mix and which labels they record."""

    group_prevalence: tuple[float, ...] = SEER_GROUP_PREVALENCE
    missing_er: float = 0.01
    missing_pr: float = 0.03
    missing_her2: float = 0.05
    missing_ki67: float = 0.10
    flip_er: float = 0.02
    flip_pr: float = 0.04
    flip_her2: float = 0.03
    ki67_reader_sd: float = 0.12  # multiplicative inter-observer spread of the reported Ki-67


@dataclass(frozen=True)
class Biology:
    """True biology of one case (no noise, nothing missing)."""

    er: int
    pr: int
    her2: int
    ki67: float

    @property
    def subtype(self) -> str:
        """Surrogate subtype (St Gallen 2013, Ki-67 cut-off 20 %)."""
        if self.er or self.pr:
            if self.her2:
                return "luminal_b_her2"
            return "luminal_a" if self.ki67 < 20 else "luminal_b"
        return "her2_enriched" if self.her2 else "triple_negative"


def sample_biology(rng: np.random.Generator, site: SiteBiology) -> Biology:
    """Draw true ER/PR/HER2/Ki-67 from the site's HR/HER2 group prevalence."""
    p = np.asarray(site.group_prevalence, dtype=float)
    group = int(rng.choice(len(GROUPS), p=p / p.sum()))
    her2 = int(group in (1, 2))
    if group in (0, 1):
        er, pr = HR_POSITIVE_PATTERNS[int(rng.choice(3, p=HR_POSITIVE_PATTERN_P))]
    else:
        er, pr = 0, 0
    median = KI67_GROUP_MEDIAN[group] * (KI67_PR_NEGATIVE_FACTOR if er and not pr else 1.0)
    ki67 = float(np.clip(median * np.exp(KI67_LOG_SD * rng.standard_normal()), 1.0, 95.0))
    return Biology(er, pr, her2, ki67)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


# Effects on each latent's linear predictor of: ER-negative, PR-positive, HER2-positive,
# standardised log Ki-67, and the nuisance noise SD. Signs follow the MRI-phenotype literature
# (docs/phantom.md); sizes are tuned so that an oracle on the latents is good but not perfect.
EFFECTS: dict[str, tuple[float, float, float, float, float]] = {
    #                      er_neg   pr_pos  her2   ki67   noise
    "log_diameter":       (0.10,    0.00,   0.18,  0.25,  0.30),
    "lobulation":         (-0.25,   0.00,   0.20,  0.30,  1.00),
    "spiculation":        (-0.80,   0.55,  -0.35, -0.50,  1.00),
    "enhancement":        (0.30,    0.00,   0.45,  0.50,  1.00),
    "necrosis":           (1.15,    0.00,   0.10,  0.80,  1.00),
    "heterogeneity_fine": (0.20,   -0.40,   0.55,  2.20,  1.00),
    "heterogeneity_coarse": (0.25,  0.00,   1.40,  0.50,  1.00),
    "rim_enhancement":    (0.85,   -0.25,   0.35,  0.40,  1.00),
    "oedema":             (0.65,    0.00,   0.50,  1.10,  1.00),
    "peri_enhancement":   (0.35,    0.00,   1.40,  0.30,  1.00),
    "bpe":                (-0.25,   0.00,   0.00,  0.00,  1.00),
}
BASELINE: dict[str, float] = {
    "log_diameter": float(np.log(17.0)), "lobulation": -0.6, "spiculation": -0.2, "enhancement": 0.0,
    "necrosis": -3.2, "heterogeneity_fine": -0.6, "heterogeneity_coarse": -0.8, "rim_enhancement": -1.2,
    "oedema": -1.4, "peri_enhancement": -1.4, "bpe": -0.9,
}


def ki67_score(ki67: float) -> float:
    """Standardised log Ki-67 (0 at 20 %, about unit spread over the cohort)."""
    return float((np.log(max(ki67, 1.0)) - np.log(20.0)) / 0.8)


def sample_latents(rng: np.random.Generator, bio: Biology, noise_scale: float = 1.0) -> dict[str, float]:
    """Latent phenotypes: each is a noisy function of the true biology plus nuisance variation."""
    drivers = np.array([1 - bio.er, bio.pr, bio.her2, ki67_score(bio.ki67)], dtype=float)
    lin: dict[str, float] = {}
    for name, (*beta, sd) in EFFECTS.items():
        lin[name] = BASELINE[name] + float(np.dot(beta, drivers)) + noise_scale * sd * float(rng.standard_normal())
    diameter = float(np.clip(np.exp(lin["log_diameter"]), 8.0, 45.0))
    return {
        "diameter_mm": diameter,
        "elongation": float(np.clip(1.0 + abs(0.25 * rng.standard_normal()) + 0.1 * rng.random(), 1.0, 1.8)),
        "lobulation": 0.22 * _sigmoid(lin["lobulation"]),
        "spiculation": _sigmoid(lin["spiculation"]),
        "enhancement": float(np.clip(1.0 + 0.12 * lin["enhancement"], 0.7, 1.5)),
        "necrosis": 0.45 * _sigmoid(lin["necrosis"]),
        "heterogeneity_fine": 0.30 * _sigmoid(lin["heterogeneity_fine"]),
        "heterogeneity_coarse": 0.35 * _sigmoid(lin["heterogeneity_coarse"]),
        "rim_enhancement": _sigmoid(lin["rim_enhancement"]),
        "oedema": _sigmoid(lin["oedema"]),
        "peri_enhancement": _sigmoid(lin["peri_enhancement"]),
        "bpe": 0.6 * _sigmoid(lin["bpe"]),
        "fgt_density": float(rng.beta(2.0, 3.0)),
    }


def observe_labels(rng: np.random.Generator, bio: Biology, site: SiteBiology) -> dict[str, float | None]:
    """Reported labels: the true biology with assay noise (flips, Ki-67 reader spread) and missing values."""
    def flip(value: int, p: float) -> int:
        return 1 - value if rng.random() < p else value

    er = flip(bio.er, site.flip_er)
    pr = flip(bio.pr, site.flip_pr)
    her2 = flip(bio.her2, site.flip_her2)
    ki67 = float(np.clip(round(bio.ki67 * np.exp(site.ki67_reader_sd * rng.standard_normal())
                               + 1.5 * rng.standard_normal()), 1.0, 100.0))
    draws = rng.random(4)
    return {
        "er": None if draws[0] < site.missing_er else float(er),
        "pr": None if draws[1] < site.missing_pr else float(pr),
        "her2": None if draws[2] < site.missing_her2 else float(her2),
        "ki67": None if draws[3] < site.missing_ki67 else ki67,
    }
