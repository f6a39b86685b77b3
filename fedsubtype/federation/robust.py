"""Robust aggregation settings (`robust:` in federation.yaml): Flower's Byzantine-robust strategies' parameters,
their constraints, and server-side clipping of each update to a multiple of the round's median norm."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsubtype.errors import ConfigError

ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
"""Flower strategies that resist a minority of bad updates; none of them weights sites by example count."""


@dataclass
class RobustConfig:
    """What the robust strategies assume about the federation, and optional server-side norm clipping."""

    num_malicious: int = 1
    """f, the number of dishonest sites Krum, MultiKrum and Bulyan tolerate."""
    trim_beta: float = 0.2
    """FedTrimmedAvg: share of the values cut at each end, per coordinate, in [0, 0.5)."""
    multikrum_keep: int | None = None
    """MultiKrum: how many of the best-scored updates are averaged (None: min_sites - f)."""
    clip_norm_ratio: float | None = None
    """Clip every update to this multiple of the round's median update norm before aggregating (None: off)."""

    def validate(self, where: str = "robust") -> None:
        if self.num_malicious < 0:
            raise ConfigError(f"num_malicious must be >= 0, got {self.num_malicious}", "use e.g. 1",
                              where=f"{where}.num_malicious")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}", "use e.g. 0.2",
                              where=f"{where}.trim_beta")
        if self.multikrum_keep is not None and self.multikrum_keep < 1:
            raise ConfigError(f"multikrum_keep must be >= 1, got {self.multikrum_keep}", "use e.g. 2 or remove it",
                              where=f"{where}.multikrum_keep")
        if self.clip_norm_ratio is not None and not self.clip_norm_ratio > 0:
            raise ConfigError(f"clip_norm_ratio must be > 0, got {self.clip_norm_ratio}", "use e.g. 2 or remove it",
                              where=f"{where}.clip_norm_ratio")


def strategy_constraint(strategy: str, robust: RobustConfig, min_sites: int) -> str | None:
    """Why `strategy` cannot work when a round counts with `min_sites` replies (None when it can)."""
    f = robust.num_malicious
    if strategy in ("krum", "multikrum") and min_sites < 2 * f + 3:
        return f"{strategy} with num_malicious {f} needs min_sites >= 2f + 3 = {2 * f + 3}, got {min_sites}"
    if strategy == "bulyan" and min_sites < 4 * f + 3:
        return f"bulyan with num_malicious {f} needs min_sites >= 4f + 3 = {4 * f + 3}, got {min_sites}"
    if strategy == "multikrum" and robust.multikrum_keep is not None and robust.multikrum_keep > min_sites - f:
        return f"multikrum_keep {robust.multikrum_keep} is more than min_sites - num_malicious = {min_sites - f}"
    return None


def clip_updates(flat: list[np.ndarray], global_flat: np.ndarray, ratio: float) -> list[np.ndarray]:
    """Each site's weights with its update (weights - global) scaled down to at most `ratio` × the median norm."""
    updates = [w.astype(np.float64) - global_flat for w in flat]
    norms = np.array([float(np.linalg.norm(u)) for u in updates])
    bound = ratio * float(np.median(norms)) if len(norms) else 0.0
    out = []
    for w, u, n in zip(flat, updates, norms):
        scale = bound / n if n > bound > 0 else 1.0
        out.append(w if scale == 1.0 else (global_flat + scale * u).astype(w.dtype))
    return out
