"""The coordinator's rounds: what the ServerApp runs for a submitted federation.

Each round drives the strategy's own configure/aggregate steps (rather than `Strategy.start`) so that a
round counts only when at least `min_sites` sites answered, every round is checkpointed, and a stopped
run resumes from its last checkpoint. The run folder (rounds.json, CSVs, checkpoints, model.pt) is
written through `RunStore`.
"""

from __future__ import annotations

import json
import math
import uuid
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsubtype import __version__
from fedsubtype.configio import atomic_write_text, to_dict
from fedsubtype.federation.config import FederationConfig
from fedsubtype.federation.phase import node_names, run_phase
from fedsubtype.federation.reply_checks import count_bounds, first_counts, flat_weights, screen_train
from fedsubtype.federation.robust import clip_updates
from fedsubtype.federation.runstore import RoundRecord, RunStore
from fedsubtype.federation.secagg_round import FAILED as SECURE_FAILED, secure_train
from fedsubtype.federation.strategy import make_strategy, nan_aware_mean, restore_strategy_state, strategy_state
from fedsubtype.federation.transport import LAYOUT_KEY, layout_of, pack, unpack
from fedsubtype.privacy.site_level import round_config_entries

PROGRESS = "[fedsubtype]"
"""Prefix of the progress lines `fedsubtype-server` shows."""
TRAIN_KEYS = ("train-loss", "num-examples", "epsilon")
EVAL_KEYS = ("mean-auc", "er-auc", "pr-auc", "her2-auc", "ki67-mae")
FIXED_THRESHOLD = "fixed (federated: per-case validation predictions stay at the sites)"


def say(msg: str) -> None:
    """A progress line (streamed to the coordinator's terminal by `flwr run --stream`)."""
    log(INFO, "%s %s", PROGRESS, msg)


def run_id_of(run_dir: Path) -> str:
    """The run's id, created once and kept across --resume (a DP site keys its privacy ledger on it)."""
    path = Path(run_dir) / "run_id"
    if not path.is_file():
        atomic_write_text(path, uuid.uuid4().hex + "\n")
    return path.read_text(encoding="utf-8").strip()


def round_config(cfg: FederationConfig, run_id: str = "run") -> ConfigRecord:
    """What every site needs for a round (FedProx adds `proximal-mu`; the strategy adds `server-round`)."""
    return ConfigRecord({
        "run-id": run_id, "num-rounds": cfg.rounds,
        "local-epochs": cfg.local_epochs, "local-steps": cfg.local_steps or 0, "lr": cfg.lr,
        "batch-size": cfg.batch_size, "weight-decay": cfg.weight_decay, "augment": cfg.augment, "seed": cfg.seed,
        "local-norm": cfg.local_norm, "model-config": json.dumps(to_dict(cfg.model)),
        "preprocess-config": json.dumps(to_dict(cfg.preprocess)), "fedsubtype-version": __version__,
        **round_config_entries(cfg.site_level_dp),
    })


def evaluates_after(rnd: int, cfg: FederationConfig) -> bool:
    """Whether the global model after round `rnd` is scored at the sites (always after the last round)."""
    return rnd == cfg.rounds or (cfg.evaluate_every > 0 and rnd % cfg.evaluate_every == 0)


def _fmt(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics and math.isfinite(float(metrics[k]))]
    return ", ".join(parts) or "no finite metrics"


def starting_point(store: RunStore, cfg: FederationConfig, strategy: Strategy, resume: bool
                   ) -> tuple[int, list[np.ndarray]]:
    """(first round to run, global weights): the last checkpoint's when resuming, else the seeded initial model."""
    checkpoint = store.latest_checkpoint() if resume else None
    if checkpoint is not None:
        done, weights, strat_name, state = checkpoint
        if strat_name != cfg.strategy:
            raise ValueError(f"checkpoint strategy {strat_name} differs from the config's {cfg.strategy}")
        restore_strategy_state(strategy, state)
        store.truncate_after(done)
        say(f"resuming after round {done} of {cfg.rounds} from {cfg.run_dir / 'checkpoints'}")
        return done + 1, weights
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import build_model
    from fedsubtype.train.runtime import seed_everything

    if resume:
        say("no checkpoint found: starting from round 1")
    store.truncate_after(0)
    seed_everything(cfg.seed)
    return 1, get_weights(build_model(cfg.model))


class RoundLoop:
    """The global model between rounds and the steps of one round (train, evaluate, checkpoint)."""

    def __init__(self, grid: Grid, cfg: FederationConfig, strategy: Strategy, store: RunStore,
                 weights: list[np.ndarray]) -> None:
        self.grid, self.cfg, self.strategy, self.store = grid, cfg, strategy, store
        self.layout = layout_of(weights)
        self.arrays = ArrayRecord(pack(weights))  # one array per message: see fedsubtype/federation/transport.py
        self.base = round_config(cfg, run_id_of(cfg.run_dir))
        self.base[LAYOUT_KEY] = self.layout

    def weights(self) -> list[np.ndarray]:
        """The current global weights, one array per tensor."""
        return unpack(self.arrays.to_numpy_ndarrays(), self.layout)

    def train(self, rnd: int) -> RoundRecord:
        """Local training at the sites; the replies that pass the checks are aggregated when enough did, and the
        global model moves only then (and only to finite weights)."""
        cfg = self.cfg
        msgs = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord(dict(self.base)), self.grid))
        if cfg.secure_aggregation.enabled:
            record, ok = self.secure(rnd, msgs)
        else:
            record, ok = run_phase(self.grid, cfg, msgs, rnd, "train")
            ok = self.checked(record, ok)
        if record.accepted:
            new_arrays, agg = self.aggregate(rnd, ok)
            if new_arrays is not None:
                self.arrays = new_arrays
                record.aggregated = {k: float(v) for k, v in (agg or {}).items()}
            else:
                record.accepted = False
        self.store.add(record)
        self.report(rnd, record)
        return record

    def report(self, rnd: int, record: RoundRecord) -> None:
        """The round's progress line and one line per site left out."""
        cfg = self.cfg
        names = ", ".join(r.site for r in record.answered) or "none"
        secure = [line for line in record.failed if line.startswith(SECURE_FAILED)]
        if record.accepted:
            say(f"round {rnd}/{cfg.rounds} train: {len(record.answered)}/{record.asked} sites answered ({names}); "
                + _fmt(record.aggregated, TRAIN_KEYS))
        elif secure:
            say(f"round {rnd}/{cfg.rounds} train: {secure[0]}; global model unchanged")
        else:
            say(f"round {rnd}/{cfg.rounds} train: only {len(record.answered)} of the required {cfg.min_sites} "
                f"sites answered ({names}); global model unchanged")
        for line in record.failed:
            if not line.startswith(SECURE_FAILED):
                say(f"round {rnd}: left out {line}")

    def count_bounds(self) -> dict[int, float]:
        """Node id -> the most examples its training reply may claim (declared, or first reported in this run)."""
        return count_bounds(first_counts(self.store.records), {s.name: s.declared_examples for s in self.cfg.sites},
                            node_names(self.cfg.run_dir))

    def secure(self, rnd: int, msgs: list[Message]) -> tuple[RoundRecord, list[Message]]:
        """The round under secure aggregation: the replies of the summed sites, each carrying the global
        weights plus their mean update, so that the strategy's weighted mean is that mean (Flower's way)."""
        sent = self.arrays.to_numpy_ndarrays()
        record, replies, mean = secure_train(self.grid, self.cfg, msgs, rnd, self.count_bounds(),
                                             [a.shape for a in sent])
        if mean is None:
            return record, []
        merged = ArrayRecord([(s.astype(np.float64) + u).astype(s.dtype) for s, u in zip(sent, mean)])
        for msg in replies:
            msg.content["arrays"] = merged
        return record, replies

    def checked(self, record: RoundRecord, replies: list[Message]) -> list[Message]:
        """The replies that pass the reply checks (clipped when configured); the round counts if enough are left."""
        sent = self.arrays.to_numpy_ndarrays()
        replies = screen_train(record, replies, sent, self.cfg.reply_checks, self.count_bounds())
        ratio = self.cfg.robust.clip_norm_ratio
        if ratio is not None and replies:  # the weights travel packed: one flat array per reply
            base = np.concatenate([np.ravel(a) for a in sent]).astype(np.float64)
            dtypes = [m.content["arrays"].to_numpy_ndarrays()[0].dtype for m in replies]
            clipped = clip_updates([flat_weights(m.content) for m in replies], base, ratio)
            for msg, flat, dtype in zip(replies, clipped, dtypes):
                msg.content["arrays"] = ArrayRecord([flat.astype(dtype)])
        record.accepted = len(replies) >= self.cfg.min_sites
        return replies

    def aggregate(self, rnd: int, replies: list[Message]) -> tuple[ArrayRecord | None, Any]:
        """The strategy's aggregate, or (None, None) when it fails or is not finite (the global model stays)."""
        try:
            new_arrays, agg = self.strategy.aggregate_train(rnd, replies)
        except Exception as exc:  # inconsistent replies: keep the previous global model
            log(WARNING, "round %d: aggregation failed (%s)", rnd, exc)
            return None, None
        if new_arrays is not None and not all(np.isfinite(a).all() for a in new_arrays.to_numpy_ndarrays()):
            log(WARNING, "round %d: the aggregate is not finite; global model unchanged", rnd)
            return None, None
        return new_arrays, agg

    def evaluate(self, rnd: int) -> None:
        """The sites score the global model on their validation splits; the NaN-aware mean is recorded."""
        msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord(dict(self.base)), self.grid))
        record, ok = run_phase(self.grid, self.cfg, msgs, rnd, "evaluate")
        if ok:
            mean = nan_aware_mean([m.content for m in ok], "num-examples")
            record.aggregated = {k: float(v) for k, v in mean.items()}
        self.store.add(record)
        say(f"round {rnd}/{self.cfg.rounds} evaluate: {len(record.answered)}/{record.asked} sites; "
            + _fmt(record.aggregated, EVAL_KEYS))

    def checkpoint(self, rnd: int, train: RoundRecord) -> None:
        """The global weights and the strategy state after round `rnd`."""
        self.store.save_checkpoint(rnd, self.weights(), self.cfg.strategy, strategy_state(self.strategy))
        say(f"round {rnd}/{self.cfg.rounds} checkpoint saved; "
            f"{(train.bytes_down + train.bytes_up) / 1e6:.2f} MB of weights exchanged in training")


def final_metadata(cfg: FederationConfig, store: RunStore) -> dict[str, Any]:
    """What `model.pt` records about the federation that trained it."""
    sites = sorted({a["site"] for r in store.records for a in r["answered"]})
    return {
        "source": "federated", "strategy": cfg.strategy, "rounds": cfg.rounds, "proximal_mu": cfg.proximal_mu,
        "local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps, "lr": cfg.lr, "local_norm": cfg.local_norm,
        "sites": sites, "seed": cfg.seed,
        "thresholds": {t: {"value": 0.5, "method": FIXED_THRESHOLD} for t in ("er", "pr", "her2")},
        "metrics": {"federated_val": store.last_evaluation()},
        "note": "Metrics on the synthetic phantom are engineering evidence, never clinical claims.",
    }


def write_final_model(store: RunStore, cfg: FederationConfig, fallback: list[np.ndarray]) -> Path:
    """`model.pt` from the newest checkpoint (or `fallback` when no round ran), in the centralized format."""
    final = store.latest_checkpoint()
    weights = final[1] if final is not None else fallback
    path = store.save_final_model(weights, cfg.model, cfg.preprocess, final_metadata(cfg, store))
    say(f"done: final model {path}")
    return path


def run_rounds(grid: Grid, cfg: FederationConfig, resume: bool) -> Path:
    """All rounds of a federation with a checkpoint after each; returns the final model's path."""
    store = RunStore(cfg.run_dir)
    strategy = make_strategy(cfg)
    start, weights = starting_point(store, cfg, strategy, resume)
    loop = RoundLoop(grid, cfg, strategy, store, weights)
    say(f"strategy {cfg.strategy}, {cfg.rounds} rounds, waiting for at least {cfg.min_sites} site(s)")
    for rnd in range(start, cfg.rounds + 1):
        train = loop.train(rnd)
        if evaluates_after(rnd, cfg):
            loop.evaluate(rnd)
        loop.checkpoint(rnd, train)
    return write_final_model(store, cfg, loop.weights())
