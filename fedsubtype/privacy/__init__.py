"""Differential privacy at each site: DP-SGD with Opacus, the site's privacy ledger, accountant checks.

Light to import: torch/opacus are imported only by :mod:`fedsubtype.privacy.engine`.
"""

from .config import PrivacyConfig

__all__ = ["PrivacyConfig"]
