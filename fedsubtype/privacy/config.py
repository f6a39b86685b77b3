"""The site's own differential-privacy settings: the `privacy:` section of site.yaml.

The site decides its privacy budget; the coordinator cannot change it (round configs carrying
privacy keys are refused by :func:`fedsubtype.privacy.refuse_coordinator_overrides`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedsubtype.errors import ConfigError

DEFAULT_DELTA_CAP = 1e-5
"""Largest default δ; the default is also never above 1/(10 n) for n training cases."""

Accountant = Literal["prv", "rdp"]


@dataclass
class PrivacyConfig:
    """Sample-level DP-SGD at one site (Opacus), with a budget over the whole federation run.

    enabled:          train with DP-SGD (per-sample clipping + Gaussian noise, Poisson sampling).
    target_epsilon:   the site's total budget ε for the whole run; with no noise_multiplier the
                      noise is planned so that the planned rounds × local epochs spend at most this.
    delta:            δ of the (ε, δ) guarantee; None → min(1e-5, 1/(10 n)) for n training cases.
    max_grad_norm:    per-sample gradient clipping bound C.
    accountant:       "prv" (default; numerically tight) or "rdp" (an upper bound, looser by ~10 %).
    noise_multiplier: σ to use as given instead of planning it from target_epsilon.
    ledger:           JSON file holding the spent-privacy history; None → <site state folder>/privacy_ledger.json.
    rounds:           rounds the noise is planned for; None → the number the coordinator announces for the
                      run (a coordinator announcing fewer than it runs only gets fewer rounds: the ledger
                      declines every round past the budget).
    lifetime_epsilon: the site's budget over ALL runs in its ledger (every run id the coordinator may choose),
                      at the current run's δ; None → target_epsilon (a new run id then gets no fresh budget).
    reproducible_noise: seed DP sampling and noise from the run's seed, run id and round (simulations only:
                      anyone knowing those can regenerate the noise); False → seeds from the OS's entropy.
                      fedsubtype-client refuses true.
    """

    enabled: bool = False
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: Accountant = "prv"
    noise_multiplier: float | None = None
    ledger: Path | None = None
    rounds: int | None = None
    lifetime_epsilon: float | None = None
    reproducible_noise: bool = False

    def validate(self, where: str = "privacy") -> None:
        """One-line ConfigErrors for settings that can never be right (δ vs 1/n is checked later)."""
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ConfigError(f"target_epsilon must be a positive finite number, got {self.target_epsilon}",
                              "use e.g. 8, 3 or 1 (smaller = more private), or disable privacy",
                              where=f"{where}.target_epsilon")
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}",
                              "use a value well below 1/n for n training cases (e.g. 1e-5), or omit it",
                              where=f"{where}.delta")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}",
                              "use e.g. 1.0", where=f"{where}.max_grad_norm")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be a positive number, got {self.noise_multiplier}",
                              "use e.g. 1.0, or omit it to plan it from target_epsilon",
                              where=f"{where}.noise_multiplier")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}", "use the planned number of rounds, or omit it",
                              where=f"{where}.rounds")
        if self.lifetime_epsilon is not None and not (self.lifetime_epsilon > 0 and math.isfinite(self.lifetime_epsilon)):
            raise ConfigError(f"lifetime_epsilon must be a positive finite number, got {self.lifetime_epsilon}",
                              "use e.g. 8 (the site's total over all runs), or omit it (= target_epsilon)",
                              where=f"{where}.lifetime_epsilon")
        if self.enabled and self.target_epsilon is None:
            raise ConfigError("privacy is enabled but no target_epsilon (the site's budget) is set",
                              "add target_epsilon, e.g. 8", where=f"{where}.target_epsilon")

    def lifetime_budget(self) -> float:
        """ε the site allows over all runs together (lifetime_epsilon, else the per-run target_epsilon)."""
        if self.lifetime_epsilon is not None:
            return float(self.lifetime_epsilon)
        return float(self.target_epsilon) if self.target_epsilon is not None else math.inf

    def resolved_delta(self, n_train: int, where: str = "privacy") -> float:
        """δ for a site with `n_train` training cases; a δ ≥ 1/n is a ConfigError (it allows leaking a case)."""
        if n_train < 1:
            raise ConfigError("the site has no training cases", "check the manifest's split column", where=where)
        if self.delta is None:
            return min(DEFAULT_DELTA_CAP, 1.0 / (10.0 * n_train))
        if self.delta >= 1.0 / n_train:
            raise ConfigError(f"delta {self.delta:g} is not below 1/n = {1.0 / n_train:.3g} for n = {n_train} "
                              "training cases (such a δ permits revealing a whole case)",
                              f"use delta ≤ {1.0 / (10 * n_train):.2g}, or omit it", where=f"{where}.delta")
        return self.delta
