"""Site-level (user-level) DP at the coordinator: Flower's fixed/adaptive clipping strategy wrappers.

Sample-level DP (DP-SGD at each site, :mod:`fedsubtype.privacy.engine`) protects each *patient* of a
site against everyone who sees that site's updates. Site-level DP protects the participation of a whole
*site* in the aggregate model: each site's update is clipped (at the server, or at the site with the
matching Flower mod) and the coordinator adds Gaussian noise to the sum. The `site_level_dp:` section of
federation.yaml selects it; the server calls :func:`wrap_strategy`, the ClientApp installs
:func:`site_level_clipping_mod` (a no-op unless the round asks for client-side clipping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedsubtype.errors import ConfigError

ROUND_KEY = "site-dp-clipping"
"""Round-config key telling the ClientApp which client-side clipping mod to apply ("fixed"/"adaptive")."""


@dataclass
class SiteLevelDPConfig:
    """federation.yaml `site_level_dp:`: Flower's DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping.

    enabled:              wrap the strategy.
    clipping:             "fixed" (clip every site update to clipping_norm) or "adaptive" (Andrew et al. 2021:
                          the norm tracks the target_clipped_quantile of update norms).
    side:                 "server" (the coordinator clips the updates it receives) or "client" (each site clips
                          its own update before sending; the raw update never leaves the site).
    noise_multiplier:     σ of the Gaussian noise added to the sum of clipped updates (std = σ · clip / sites).
    clipping_norm:        fixed clipping bound on the L2 norm of a site's update.
    initial_clipping_norm, target_clipped_quantile, clip_norm_lr, clipped_count_stddev: adaptive clipping.
    num_sampled_sites:    sites sampled per round; None → the federation's minimum number of sites.
    """

    enabled: bool = False
    clipping: Literal["fixed", "adaptive"] = "fixed"
    side: Literal["server", "client"] = "server"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    num_sampled_sites: int | None = None

    def validate(self, where: str = "site_level_dp") -> None:
        """One-line ConfigErrors for impossible values."""
        def positive(key: str, allow_zero: bool = False) -> None:
            v = getattr(self, key)
            ok = v is not None and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
            if not ok:
                raise ConfigError(f"{key} must be {'≥ 0' if allow_zero else '> 0'}, got {v}", "see docs/privacy.md",
                                  where=f"{where}.{key}")

        positive("noise_multiplier", allow_zero=True)
        positive("clipping_norm")
        positive("initial_clipping_norm")
        positive("clip_norm_lr")
        if not 0.0 < self.target_clipped_quantile < 1.0:
            raise ConfigError(f"target_clipped_quantile must be in (0, 1), got {self.target_clipped_quantile}",
                              "use e.g. 0.5", where=f"{where}.target_clipped_quantile")
        if self.clipped_count_stddev is not None:
            positive("clipped_count_stddev", allow_zero=True)
        if self.num_sampled_sites is not None and self.num_sampled_sites < 1:
            raise ConfigError(f"num_sampled_sites must be ≥ 1, got {self.num_sampled_sites}",
                              "use the number of sites per round", where=f"{where}.num_sampled_sites")


def wrap_strategy(strategy: Any, cfg: SiteLevelDPConfig, *, num_sampled_sites: int) -> Any:
    """`strategy` wrapped in the Flower DP wrapper `cfg` selects (unchanged when disabled).

    `num_sampled_sites` is the federation's sites per round (cfg.num_sampled_sites overrides it).
    """
    if not cfg.enabled:
        return strategy
    from flwr.serverapp import strategy as fs

    n = int(cfg.num_sampled_sites or num_sampled_sites)
    try:
        wrapped = _wrap(fs, strategy, cfg, n)
    except ValueError as exc:  # Flower checks the combination (e.g. adaptive noise too small for few sites)
        raise ConfigError(f"site-level DP settings rejected by Flower: {exc}", "see docs/privacy.md",
                          where="site_level_dp") from None
    _equal_weights_and_entropy_noise(wrapped, getattr(strategy, "weighted_by_key", "num-examples"))
    return wrapped


@contextmanager
def entropy_seeded_numpy() -> Iterator[None]:
    """NumPy's global generator seeded from the OS's entropy inside the block, its previous state restored after.

    Flower's DP wrappers draw their noise from `np.random`, which the coordinator seeds with the run's seed
    (known to every site and written into model.pt): anyone could regenerate that noise and subtract it.
    Restoring the state keeps every other seeded draw of the run reproducible.
    """
    state = np.random.get_state()
    np.random.seed(None)  # fresh entropy from the OS
    try:
        yield
    finally:
        np.random.set_state(state)


def _equal_weights_and_entropy_noise(wrapped: Any, weight_key: str) -> None:
    """Make the wrapper average site updates with equal weights (as its accounting assumes) and noise from entropy.

    The sites' example counts are kept for the reported `num-examples` total.
    """
    aggregate = wrapped.aggregate_train

    def aggregate_train(server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        replies = list(replies)
        total = 0.0
        for reply in replies:
            for record in reply.content.metric_records.values():
                total += float(record.get(weight_key, 0.0))
                record[weight_key] = 1.0
        with entropy_seeded_numpy():
            arrays, metrics = aggregate(server_round, replies)
        if metrics is not None and weight_key in metrics:
            metrics[weight_key] = total
        return arrays, metrics

    wrapped.aggregate_train = aggregate_train


def _wrap(fs: Any, strategy: Any, cfg: SiteLevelDPConfig, n: int) -> Any:
    if cfg.clipping == "fixed":
        cls = (fs.DifferentialPrivacyServerSideFixedClipping if cfg.side == "server"
               else fs.DifferentialPrivacyClientSideFixedClipping)
        return cls(strategy, noise_multiplier=cfg.noise_multiplier, clipping_norm=cfg.clipping_norm,
                   num_sampled_clients=n)
    cls = (fs.DifferentialPrivacyServerSideAdaptiveClipping if cfg.side == "server"
           else fs.DifferentialPrivacyClientSideAdaptiveClipping)
    return cls(strategy, noise_multiplier=cfg.noise_multiplier, num_sampled_clients=n,
               initial_clipping_norm=cfg.initial_clipping_norm, target_clipped_quantile=cfg.target_clipped_quantile,
               clip_norm_lr=cfg.clip_norm_lr, clipped_count_stddev=cfg.clipped_count_stddev)


def round_config_entries(cfg: SiteLevelDPConfig) -> dict[str, str]:
    """Entries the server adds to every train config so the ClientApp's mod knows which clipping to apply."""
    if cfg.enabled and cfg.side == "client":
        return {ROUND_KEY: cfg.clipping}
    return {}


def site_level_clipping_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """ClientApp mod: Flower's fixed/adaptive clipping mod when the round asks for it, else a pass-through.

    A reply without weights (a site that declined, e.g. privacy budget exhausted) is passed on unchanged
    rather than turned into a clipping error, so the coordinator sees why the site declined.
    """
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    configs = list(msg.content.config_records.values()) if msg.content is not None else []
    mode = configs[0].get(ROUND_KEY) if len(configs) == 1 else None
    if mode not in ("fixed", "adaptive"):
        return call_next(msg, ctxt)
    inner: dict[str, Any] = {}

    def capture(m: Any, c: Any) -> Any:
        inner["reply"] = call_next(m, c)
        return inner["reply"]

    out = (fixedclipping_mod if mode == "fixed" else adaptiveclipping_mod)(msg, ctxt, capture)
    reply = inner.get("reply")
    if reply is not None and not reply.has_error() and len(reply.content.array_records) == 0:
        return reply
    return out
