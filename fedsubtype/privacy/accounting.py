"""Privacy accounting: ε for a history of DP-SGD steps, and the noise planned for a site's budget.

A history is a list of (noise_multiplier σ, sample_rate q, steps) entries — the state of an Opacus
accountant — so the ε spent over a whole federation run is computed from every round's steps at once
(composition over rounds, not a sum of per-round ε). Opacus' PRV accountant (Gopi et al. 2021) gives a
numerically tight upper bound; RDP (Mironov 2017) a looser one. Both are checked against Google's
independent `dp-accounting` package in the tests.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from fedsubtype.errors import ConfigError
from fedsubtype.privacy.config import PrivacyConfig

Entry = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps): one homogeneous stretch of DP-SGD steps."""

MAX_NOISE_MULTIPLIER = 1e3


def _quiet_opacus() -> None:
    """Opacus' RDP warns about every order it skips; the answer is still a valid upper bound."""
    logging.getLogger("opacus").setLevel(logging.ERROR)
    for name in ("opacus.accountants.analysis.rdp", "opacus.accountants.rdp"):
        logging.getLogger(name).setLevel(logging.ERROR)


def epsilon_for(history: Sequence[Entry], delta: float, accountant: str = "prv") -> float:
    """ε (an upper bound) at `delta` after composing every entry of `history`; 0 for no steps."""
    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return 0.0
    _quiet_opacus()
    from opacus.accountants import PRVAccountant, RDPAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            acc = RDPAccountant()
            acc.history = list(history)
            return float(acc.get_epsilon(delta))
        if accountant != "prv":
            raise ValueError(f"unknown accountant {accountant!r}")
        acc = PRVAccountant()
        acc.history = list(history)
        coarse = float(acc.get_epsilon(delta, eps_error=0.01))
        # PRV's error is absolute; keep it ≤ 0.2 % of ε so small budgets are reported as tightly as large.
        fine_error = min(0.01, max(5e-4, 0.002 * coarse))
        if fine_error >= 0.01:
            return coarse
        return float(acc.get_epsilon(delta, eps_error=fine_error))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv", tolerance: float = 0.01) -> float:
    """Smallest σ (within `tolerance` of ε) whose ε after `steps` steps at rate q is ≤ `target_epsilon`."""
    if steps <= 0:
        raise ValueError("steps must be positive")
    low, high = 0.0, 1.0
    while epsilon_for([(high, sample_rate, steps)], delta, accountant) > target_epsilon:
        low, high = high, 2.0 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError("target ε unreachable")
    eps_high = epsilon_for([(high, sample_rate, steps)], delta, accountant)
    while target_epsilon - eps_high > tolerance * target_epsilon and high - low > 1e-4:
        mid = 0.5 * (low + high)
        eps = epsilon_for([(mid, sample_rate, steps)], delta, accountant)
        if eps <= target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


def sample_rate_for(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate q giving an expected batch of `batch_size` cases (capped at 1)."""
    return min(1.0, batch_size / n_train)


def steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps in one epoch: what Opacus' Poisson sampler draws (int(1/q))."""
    return max(1, int(1.0 / sample_rate))


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site will spend: σ, q, steps per round and the planned ε over the whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    delta: float
    target_epsilon: float
    max_grad_norm: float
    accountant: str
    planned_epsilon: float
    epsilon_one_round: float
    affordable_rounds: int

    def summary(self) -> str:
        """One line for the site's start-up summary (what the plan costs)."""
        head = (f"DP-SGD: σ = {self.noise_multiplier:.3f}, clip C = {self.max_grad_norm:g}, "
                f"Poisson rate q = {self.sample_rate:.4f}, {self.steps_per_round} steps/round × {self.rounds} rounds "
                f"→ ε = {self.planned_epsilon:.3f} at δ = {self.delta:.2g} ({self.accountant.upper()}), "
                f"budget ε = {self.target_epsilon:g}")
        if self.affordable_rounds < self.rounds:
            head += (f"; WARNING the budget covers only {self.affordable_rounds} of {self.rounds} rounds — "
                     "the site will decline later rounds")
        return head


def _affordable_rounds(sigma: float, q: float, steps_per_round: int, rounds: int, delta: float,
                       target: float, accountant: str) -> int:
    """How many whole rounds fit in the budget (binary search over the round count)."""
    lo, hi = 0, rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_for([(sigma, q, mid * steps_per_round)], delta, accountant) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_plan(cfg: PrivacyConfig, *, n_train: int, batch_size: int, rounds: int,
              local_epochs: int = 1, steps_per_round: int | None = None, where: str = "privacy") -> PrivacyPlan:
    """Plan a site's DP-SGD over the run: σ given or planned from the budget; errors if not even one round fits.

    `steps_per_round` overrides local_epochs × int(1/q) when training runs a fixed number of steps.
    Raises ConfigError (one line) for δ ≥ 1/n, a missing budget, or a budget too small for one round.
    """
    if not cfg.enabled:
        raise ValueError("make_plan needs an enabled PrivacyConfig")
    if cfg.target_epsilon is None:
        raise ConfigError("privacy is enabled but no target_epsilon is set", "add target_epsilon, e.g. 8",
                          where=f"{where}.target_epsilon")
    if rounds < 1 or local_epochs < 1 or batch_size < 1:
        raise ValueError("rounds, local_epochs and batch_size must be positive")
    delta = cfg.resolved_delta(n_train, where)
    q = sample_rate_for(n_train, batch_size)
    steps = steps_per_round if steps_per_round is not None else local_epochs * steps_per_epoch(q)
    target = float(cfg.target_epsilon)
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        try:
            sigma = noise_multiplier_for(target, delta, q, steps * rounds, cfg.accountant)
        except ValueError:
            raise ConfigError(f"a budget of ε = {target:g} cannot pay for {rounds} rounds × {steps} steps even "
                              f"with σ = {MAX_NOISE_MULTIPLIER:g}", "raise target_epsilon or train fewer rounds",
                              where=f"{where}.target_epsilon") from None
    eps_one = epsilon_for([(sigma, q, steps)], delta, cfg.accountant)
    if eps_one > target:
        raise ConfigError(f"the budget ε = {target:g} is too small for even one round "
                          f"({steps} steps at σ = {sigma:.3g}, q = {q:.3g} cost ε = {eps_one:.3g})",
                          "raise target_epsilon or noise_multiplier, or train fewer local epochs",
                          where=f"{where}.target_epsilon")
    planned = epsilon_for([(sigma, q, steps * rounds)], delta, cfg.accountant)
    affordable = rounds if planned <= target else _affordable_rounds(sigma, q, steps, rounds, delta, target,
                                                                     cfg.accountant)
    return PrivacyPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, rounds=rounds, delta=delta,
                       target_epsilon=target, max_grad_norm=cfg.max_grad_norm, accountant=cfg.accountant,
                       planned_epsilon=planned, epsilon_one_round=eps_one, affordable_rounds=affordable)
