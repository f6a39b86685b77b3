"""Pooled (centralized on the union) and local-only (each site alone) training, through the one training pipeline.

Both start from the study's initial weights for the seed and train `budget_epochs` epochs, so they see
the same number of training samples as a federation of `rounds × local_epochs`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fedsubtype.configio import from_dict

from .cohort import Cohort
from .scenario import Scenario


@dataclass
class TrainedModel:
    """One trained model with where it was trained and what it cost."""

    model: Any
    train_sites: list[str]
    history: list[dict[str, Any]]
    samples_seen: int


def train_config(scen: Scenario, seed: int, epochs: int, threads: int | None = None) -> Any:
    """The scenario's TrainConfig for one run: its seed, its epochs, no early stopping (equal budgets) and no
    weight average (a federated site keeps none either: the server's average is the federation's), so that the
    methods differ in how they share, not in how they optimise."""
    from fedsubtype.train.config import TrainConfig

    cfg = from_dict(TrainConfig, copy.deepcopy(scen.training), "scenario.training")
    return replace(cfg, seed=seed, epochs=epochs, patience=None, progress=False, device="cpu",
                   threads=threads or cfg.threads, ema_decay=None)


def privacy_hook(scen: Scenario, n_train: int, epochs: int, batch_size: int, seed: int) -> Any:
    """DP-SGD for a centralized run when the scenario enables privacy (one release of `epochs` epochs), else None."""
    if not scen.privacy.get("enabled"):
        return None
    from fedsubtype.privacy import PrivacyConfig
    from fedsubtype.privacy.accounting import make_plan
    from fedsubtype.privacy.engine import OpacusPrivacy, derive_seed

    cfg = from_dict(PrivacyConfig, dict(scen.privacy), "scenario.privacy")
    plan = make_plan(cfg, n_train=n_train, batch_size=batch_size, rounds=1, local_epochs=epochs)
    return OpacusPrivacy(plan, seed=derive_seed("sim", seed, n_train))


def train_on(sites: list[str], cohort: Cohort, scen: Scenario, init_model: Any, seed: int,
             out_dir: Path, say: Callable[[str], None]) -> TrainedModel:
    """Train a copy of `init_model` on the union of `sites`' training splits, validating on their val splits."""
    from fedsubtype.train.pipeline import PipelineJob, run_pipeline

    cfg = train_config(scen, seed, scen.federation.budget_epochs)
    train = cohort.dataset(cohort.split(sites, "train"))
    val = cohort.dataset(cohort.split(sites, "val"))
    hook = privacy_hook(scen, len(train), cfg.epochs, cfg.batch_size, seed)
    job = PipelineJob(lambda: copy.deepcopy(init_model), train, val if len(val) else None, cfg, privacy=hook)
    result = run_pipeline(job, out_dir=out_dir, log=lambda line: say(f"    {line}")).trained
    return TrainedModel(result.model, list(sites), result.history, result.samples_seen)
