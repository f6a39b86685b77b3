"""Phantom cohort: realistic single-phase post-contrast breast DCE-MRI whose phenotypes depend on
ER/PR/HER2/Ki-67 as the literature reports, with the latent variables kept for an oracle.

Phantom results are engineering evidence, never clinical claims.
"""

from fedsubtype.phantom.biology import LATENT_COLUMNS, LATENT_REGIONS
from fedsubtype.phantom.cohort import generate_cohort, is_phantom_cohort, render_case
from fedsubtype.phantom.plan import plan_cohort, sample_labels

__all__ = ["LATENT_COLUMNS", "LATENT_REGIONS", "generate_cohort", "is_phantom_cohort", "plan_cohort",
           "render_case", "sample_labels"]
