"""The server-side aggregation: Flower's strategy for the configured name, its NaN-aware metric mean, and the
strategy state (FedAdam/FedYogi moments) a checkpoint carries."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum,
                                     MultiKrum, Strategy)

from fedsubtype.federation.config import FederationConfig
from fedsubtype.privacy.site_level import wrap_strategy

STATE_ATTRS = ("m_t", "v_t")
"""Strategy attributes saved in checkpoints (FedAdam/FedYogi moments)."""


def nan_aware_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of each metric over the sites where it is finite; total examples kept."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        total += w
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list) or not math.isfinite(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    out = MetricRecord({weight_key: total})
    for key in sums:
        out[key] = sums[key] / weights[key] if weights[key] > 0 else float("nan")
    return out


def make_strategy(cfg: FederationConfig) -> Strategy:
    """The configured strategy (wrapped for site-level DP when enabled); sampling waits for `min_sites` sites."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0, min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites, min_available_nodes=cfg.min_sites,
        train_metrics_aggr_fn=nan_aware_mean, evaluate_metrics_aggr_fn=nan_aware_mean)
    if cfg.strategy == "fedprox":
        base: Strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedavg":
        base = FedAvg(**common)
    elif cfg.strategy == "fedadam":
        base = FedAdam(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau, **common)
    elif cfg.strategy == "fedyogi":
        base = FedYogi(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau, **common)
    else:
        base = robust_strategy(cfg, common)
    return wrap_strategy(base, cfg.site_level_dp, num_sampled_sites=cfg.min_sites)


def robust_strategy(cfg: FederationConfig, common: dict[str, Any]) -> Strategy:
    """One of Flower's Byzantine-robust strategies; they ignore example counts (docs/federation.md)."""
    f = cfg.robust.num_malicious
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.robust.trim_beta, **common)
    if cfg.strategy == "krum":
        return Krum(num_malicious_nodes=f, **common)
    if cfg.strategy == "multikrum":
        keep = cfg.robust.multikrum_keep or max(1, cfg.min_sites - f)
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=keep, **common)
    return Bulyan(num_malicious_nodes=f, **common)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The server optimiser's moments, for a checkpoint (empty for FedAvg/FedProx)."""
    return {name: getattr(strategy, name) for name in STATE_ATTRS if getattr(strategy, name, None) is not None}


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put a checkpoint's moments back, so a resumed FedAdam/FedYogi run continues where it stopped."""
    for name, value in state.items():
        setattr(strategy, name, value)
