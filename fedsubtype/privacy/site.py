"""The DP part of a site's lifecycle, called by `fedsubtype.federation.site_algo.SiteAlgo` (no Flower types).

initialize → :meth:`SitePrivacy.start` plans σ from the site's own budget and the run's planned rounds,
opens the ledger and says what the plan costs; each train round → :meth:`check` (decline if the round
would exceed the budget), :meth:`hook` (the Opacus hook for `fit`), :meth:`record` (append the steps to
the ledger, report ε spent). The coordinator cannot change any of it: privacy keys in a round config are
ignored (:func:`privacy_overrides` names them so the site can log the attempt).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsubtype.errors import ConfigError
from fedsubtype.privacy.accounting import PrivacyPlan, make_plan
from fedsubtype.privacy.config import PrivacyConfig
from fedsubtype.privacy.ledger import PrivacyLedger
from fedsubtype.privacy.limits import RoundDeclined

LEDGER_FILENAME = "privacy_ledger.json"

_OVERRIDE_WORDS = ("privacy", "epsilon", "delta", "noise", "grad_norm", "grad-norm", "clip", "accountant", "dp_", "dp-")


def privacy_overrides(round_config: Mapping[str, Any]) -> list[str]:
    """Keys in a coordinator's round config that look like privacy settings; the site ignores them.

    The site-level DP keys (Flower's `clipping_norm`, fedsubtype's `site-dp-clipping`) concern clipping a
    site's whole update, not the site's own privacy settings, and are not listed.
    """
    from fedsubtype.privacy.site_level import ROUND_KEY

    return sorted(k for k in round_config if k not in ("clipping_norm", ROUND_KEY)
                  and any(w in str(k).lower() for w in _OVERRIDE_WORDS))


class PrivacyBudgetExhausted(RoundDeclined):
    """A round the site declines because it would exceed the site's privacy budget (this run's or its lifetime's).

    The ClientApp answers the coordinator with `line()` (ε figures only, nothing about cases); `metrics`
    (ε spent, budget, δ, budget_exhausted = 1) are for the site's own log.
    """

    def __init__(self, reason: str, metrics: dict[str, float]) -> None:
        super().__init__(reason, "the site has spent its privacy budget; it will decline further rounds",
                         where="privacy")
        self.metrics = metrics


def refuse_reproducible_noise(cfg: PrivacyConfig, where: str = "site.privacy") -> None:
    """Deployment check: reproducible DP noise (a simulation-only setting) lets others regenerate the noise."""
    if cfg.reproducible_noise:
        raise ConfigError("privacy.reproducible_noise is for simulations only (anyone who knows the run's seed "
                          "could regenerate and subtract this site's DP noise)",
                          "remove reproducible_noise or set it to false", where=f"{where}.reproducible_noise")


def startup_check(cfg: PrivacyConfig, *, n_train: int, batch_size: int, rounds: int | None = None,
                  local_epochs: int = 1, where: str = "privacy") -> str:
    """The site's start-up line about privacy; one-line ConfigErrors for δ ≥ 1/n or a budget too small for a round.

    Needs only the number of training cases (from the manifest), so it runs before any image is read.
    Without the coordinator's number of rounds it plans for `cfg.rounds` or, failing that, one round.
    """
    if not cfg.enabled:
        return "privacy: DP-SGD disabled (this site gives no formal privacy guarantee)"
    plan = make_plan(cfg, n_train=n_train, batch_size=batch_size, rounds=rounds or cfg.rounds or 1,
                     local_epochs=local_epochs, where=where)
    note = "" if rounds or cfg.rounds else (" (shown for one round: σ is planned over the run's rounds when the "
                                            "coordinator announces them)")
    return f"privacy: {plan.summary()}{note}"


class SitePrivacy:
    """A site's DP-SGD plan and ledger for one federation run."""

    def __init__(self, plan: PrivacyPlan, ledger: PrivacyLedger, *, run_id: str, seed: int = 0,
                 grad_sample_mode: str | None = None, lifetime_epsilon: float = math.inf,
                 reproducible_noise: bool = False) -> None:
        self.plan, self.ledger, self.run_id, self.seed = plan, ledger, str(run_id), int(seed)
        self.grad_sample_mode = grad_sample_mode
        self.lifetime_epsilon = float(lifetime_epsilon)
        self.reproducible_noise = bool(reproducible_noise)

    @classmethod
    def start(cls, cfg: PrivacyConfig, *, site: str, n_train: int, batch_size: int, rounds: int,
              run_id: str, state_dir: str | Path, local_epochs: int = 1, max_steps: int | None = None,
              seed: int = 0, where: str = "privacy") -> SitePrivacy | None:
        """Plan and open the ledger before any data is read; None when privacy is disabled.

        `n_train` is the number of training cases (from the manifest), `rounds` × `local_epochs` (or
        `max_steps` per round) what the run plans; `cfg.rounds`, when the site set it, wins over `rounds`.
        The plan is stored in the ledger, so a restarted site keeps the run's σ. Bad settings raise
        one-line ConfigErrors.
        """
        if not cfg.enabled:
            return None
        delta = cfg.resolved_delta(n_train, where)
        path = Path(cfg.ledger) if cfg.ledger is not None else Path(state_dir) / LEDGER_FILENAME
        ledger = PrivacyLedger(path, run_id, delta=delta, accountant=cfg.accountant,
                               target_epsilon=float(cfg.target_epsilon or 0.0), site=site)
        saved = ledger.plan
        unchanged = saved is not None and all(saved.get(k) == v for k, v in (
            ("target_epsilon", cfg.target_epsilon), ("max_grad_norm", cfg.max_grad_norm),
            ("accountant", cfg.accountant), ("delta", delta)))
        if unchanged and (cfg.noise_multiplier is None or saved.get("noise_multiplier") == cfg.noise_multiplier):
            plan = PrivacyPlan(**saved)  # a restarted site keeps the run's σ, q and steps per round
        else:
            plan = make_plan(cfg, n_train=n_train, batch_size=batch_size, rounds=cfg.rounds or rounds,
                             local_epochs=local_epochs, steps_per_round=max_steps, where=where)
            # a changed site.yaml re-plans; otherwise a plan stored meanwhile by another process wins
            plan = PrivacyPlan(**ledger.save_plan(dataclasses.asdict(plan), replace=saved is not None))
        return cls(plan, ledger, run_id=run_id, seed=seed, lifetime_epsilon=cfg.lifetime_budget(),
                   reproducible_noise=cfg.reproducible_noise)

    def summary(self) -> str:
        """What the plan costs and what this run has already spent (ledger)."""
        line = f"privacy: {self.plan.summary()}; ledger {self.ledger.path}"
        if self.ledger.steps:
            line += f" (run {self.run_id}: already spent ε = {self.ledger.spent():.3f} over {self.ledger.steps} steps)"
        return line + f"; all runs: ε = {self.ledger.epsilon_all_runs():.3f} of the lifetime {self.lifetime_epsilon:g}"

    def round_entries(self) -> list[tuple[float, float, int]]:
        """What one planned round releases."""
        return [(self.plan.noise_multiplier, self.plan.sample_rate, self.plan.steps_per_round)]

    def require_budget(self, server_round: int) -> None:
        """Raise :class:`PrivacyBudgetExhausted` when the round would exceed the budget (before any training)."""
        reason = self.check(server_round)
        if reason is not None:
            raise PrivacyBudgetExhausted(reason, self.metrics(declined=True))

    def check(self, server_round: int) -> str | None:
        """None when the round fits this run's budget and the site's lifetime budget; else the one-line reason."""
        after = self.ledger.epsilon_if(self.round_entries())
        if after > self.plan.target_epsilon:
            return (f"privacy budget exhausted: round {server_round} would raise ε from {self.ledger.spent():.3f} to "
                    f"{after:.3f} > budget {self.plan.target_epsilon:g} (δ = {self.plan.delta:.2g}); the site declines")
        lifetime = self.ledger.epsilon_all_runs_if(self.round_entries())
        if lifetime > self.lifetime_epsilon:
            return (f"lifetime privacy budget exhausted: round {server_round} of run {self.run_id} would raise the "
                    f"site's ε over all runs from {self.ledger.epsilon_all_runs():.3f} to {lifetime:.3f} > lifetime "
                    f"budget {self.lifetime_epsilon:g} (δ = {self.plan.delta:.2g}); the site declines")
        return None

    def hook(self, server_round: int) -> Any:
        """The Opacus hook (engine.OpacusPrivacy) for this round's `fit`: capped at the planned steps, fresh noise.

        Sampling and noise are seeded from the OS's entropy unless the site opted into reproducible noise
        (simulations): then from the run's seed, run id, round and steps, which the coordinator knows.
        """
        from fedsubtype.privacy.engine import DEFAULT_GRAD_SAMPLE_MODE, OpacusPrivacy, derive_seed, entropy_seed

        seed = (derive_seed(self.seed, self.run_id, server_round, self.ledger.steps) if self.reproducible_noise
                else entropy_seed())
        return OpacusPrivacy(self.plan, seed=seed, max_steps=self.plan.steps_per_round,
                             grad_sample_mode=self.grad_sample_mode or DEFAULT_GRAD_SAMPLE_MODE,
                             server_round=server_round)

    def record(self, server_round: int, hook: Any) -> dict[str, float]:
        """Append the round's steps to the ledger (atomically) and return the metrics sent with the reply."""
        self.ledger.record(server_round, hook.entries())
        return self.metrics()

    def metrics(self, *, declined: bool = False) -> dict[str, float]:
        """Aggregate privacy metrics safe to send: ε spent in this run, budget, δ, steps, declined flag."""
        spent = self.ledger.spent()
        return {"dp_enabled": 1, "epsilon_spent": float(spent), "epsilon_budget": float(self.plan.target_epsilon),
                "dp_delta": float(self.plan.delta), "dp_steps": int(self.ledger.steps),
                "dp_noise_multiplier": float(self.plan.noise_multiplier),
                "budget_exhausted": int(declined)}


def no_privacy_metrics() -> dict[str, float]:
    """What a site without DP reports (no ε: a non-DP site gives no formal guarantee)."""
    return {"dp_enabled": 0, "budget_exhausted": 0}


def site_startup_line(site: Any) -> str:
    """The privacy line of a site's start-up summary, from the manifest table alone (no image is read).

    `site` is a SiteConfig. n is estimated as the manifest's rows × (1 − val_fraction) — never below the
    real training split, so δ < 1/n checked here also holds for the real n; the exact plan is made when
    the run's first round arrives. Raises one-line ConfigErrors for δ ≥ 1/n or a budget too small for one round.
    """
    if not site.privacy.enabled:
        return startup_check(site.privacy, n_train=1, batch_size=1)
    from fedsubtype.data.manifest import load_manifest

    cases, _ = load_manifest(site.manifest)
    if site.manifest_site is not None:
        cases = [c for c in cases if c.site == site.manifest_site]
    n_train = max(1, int(round(len(cases) * (1.0 - site.val_fraction))))
    return startup_check(site.privacy, n_train=n_train, batch_size=site.batch_size or 8, where="site.privacy")
