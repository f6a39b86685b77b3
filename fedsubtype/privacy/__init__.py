"""Differential privacy at each site: DP-SGD with Opacus, the site's privacy ledger, accountant checks.

Light to import: torch/opacus are imported only by :mod:`fedsubtype.privacy.engine` and
:mod:`fedsubtype.privacy.site` (import those directly).

- :class:`PrivacyConfig` — site.yaml `privacy:` (the site's own budget; the coordinator cannot change it).
- :mod:`.accounting` — ε of a (σ, q, steps) history (Opacus PRV/RDP), σ planned for a target ε.
- :mod:`.ledger` — the per-site, per-run JSON ledger of every released step.
- :mod:`.engine` — the Opacus hook `training.fit(privacy=...)` calls.
- :mod:`.site` — SitePrivacy: plan, budget check, hook and ledger for SiteAlgo.
- :mod:`.site_level` — Flower's site-level DP strategy wrappers (federation.yaml `site_level_dp:`), equal
  weights and entropy-seeded noise.
- :mod:`.limits` — site.yaml `limits:` and RoundDeclined: what the coordinator may ask of a site.
- :mod:`.requests` — rounds and evaluations served per run id (checked against the limits).
- :mod:`.metrics_gate` — evaluation metrics leave a site only when computed over enough cases.
- :mod:`.report` — `fedsubtype-client --privacy-report`: ε per run and over all runs.
"""

from fedsubtype.privacy.config import PrivacyConfig
from fedsubtype.privacy.site_level import SiteLevelDPConfig

__all__ = ["PrivacyConfig", "SiteLevelDPConfig"]
