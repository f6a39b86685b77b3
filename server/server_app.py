"""Flower ServerApp: builds the model and the strategy from the run's federation config, runs the rounds,
and writes the run folder (per-round metrics, a checkpoint after every round, the final `model.pt`).

The round loop drives the strategy's own configure/aggregate steps so that every round can be
checkpointed and resumed, and a round counts only when at least `min_sites` sites answered.
Started by `fedsubtype-server` (which writes <run-dir>/launch.json) or by plain `flwr run .`
(settings then come from [tool.flwr.app.config]).
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from fedsubtype import __version__
from fedsubtype.configio import from_dict, to_dict
from fedsubtype.federation.config import FederationConfig
from fedsubtype.privacy.site_level import round_config_entries, wrap_strategy
from fedsubtype.federation.runstore import RoundRecord, RunStore, SiteResult
from fedsubtype.federation.transport import LAYOUT_KEY, layout_of, pack, unpack

app = ServerApp()
PROGRESS = "[fedsubtype]"
"""Prefix of the progress lines `fedsubtype-server` shows."""
STATE_ATTRS = ("m_t", "v_t")
"""Strategy attributes saved in checkpoints (FedAdam/FedYogi moments)."""
POLL_S = 0.2
"""How often replies are pulled from the SuperLink (Grid.send_and_receive sleeps 3 s between pulls)."""


def say(msg: str) -> None:
    """A progress line (streamed to the coordinator's terminal by `flwr run --stream`)."""
    log(INFO, "%s %s", PROGRESS, msg)


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


def load_federation(context: Context) -> tuple[FederationConfig, bool]:
    """The federation config and the resume flag: from <run-dir>/launch.json, else from the run config."""
    rc = context.run_config
    run_dir = Path(str(rc.get("run-dir", "runs/federation"))).resolve()
    launch = run_dir / "launch.json"
    if launch.is_file():
        data = json.loads(launch.read_text(encoding="utf-8"))
        return from_dict(FederationConfig, data["federation"], where=str(launch)), bool(data.get("resume"))
    cfg = FederationConfig(run_dir=run_dir, rounds=int(rc.get("num-server-rounds", 3)),
                           strategy=str(rc.get("strategy", "fedprox")),  # type: ignore[arg-type]
                           proximal_mu=float(rc.get("proximal-mu", 0.01)), local_epochs=int(rc.get("local-epochs", 1)),
                           lr=float(rc.get("learning-rate", 1e-3)), fraction_train=float(rc.get("fraction-train", 1.0)),
                           min_sites=int(rc.get("min-train-nodes", 2)))
    cfg.model.variant = str(rc.get("model-variant", cfg.model.variant))
    cfg.validate("run config")
    return cfg, False


def make_strategy(cfg: FederationConfig):
    """The configured strategy (wrapped for site-level DP when enabled); sampling waits for `min_sites` sites."""
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0, min_train_nodes=cfg.min_sites,
                  min_evaluate_nodes=cfg.min_sites, min_available_nodes=cfg.min_sites,
                  train_metrics_aggr_fn=nan_aware_mean, evaluate_metrics_aggr_fn=nan_aware_mean)
    if cfg.strategy == "fedprox":
        base = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedavg":
        base = FedAvg(**common)
    elif cfg.strategy == "fedadam":
        base = FedAdam(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau, **common)
    else:
        base = FedYogi(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau, **common)
    return wrap_strategy(base, cfg.site_level_dp, num_sampled_sites=cfg.min_sites)


def run_id_of(run_dir: Path) -> str:
    """The run's id, created once and kept across --resume (a DP site keys its privacy ledger on it)."""
    import uuid

    from fedsubtype.configio import atomic_write_text

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


def _node_names(run_dir: Path) -> dict[int, str]:
    """Registered node id -> site name (written by fedsubtype-server at registration), for readable logs."""
    path = Path(run_dir) / "nodes.json"
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError):
        return {}


def exchange(grid: Grid, messages: list[Message], timeout: float, poll_s: float = POLL_S) -> list[Message]:
    """Push `messages` and pull their replies until all arrived or `timeout` passed."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies


def evaluates_after(rnd: int, cfg: FederationConfig) -> bool:
    """Whether the global model after round `rnd` is scored at the sites (always after the last round)."""
    return rnd == cfg.rounds or (cfg.evaluate_every > 0 and rnd % cfg.evaluate_every == 0)


def _phase(grid: Grid, cfg: FederationConfig, messages: list[Message], rnd: int, phase: str) -> tuple[RoundRecord, list[Message]]:
    """Send one phase's messages, wait up to the round timeout, and sort replies into answers and failures."""
    t0 = time.perf_counter()
    names = _node_names(cfg.run_dir)
    down = sum(m.content.array_records["arrays"].count_bytes() for m in messages if "arrays" in m.content.array_records)
    replies = exchange(grid, messages, cfg.round_timeout_s) if messages else []
    target = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
    answers, failed, seen = [], [], set()
    for msg in replies:
        node = target.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
        seen.add(node)
        who = names.get(node, f"node {node}")
        if msg.has_error():
            failed.append(f"{who}: {msg.error.reason}")
            continue
        name = str(msg.content["site"]["name"]) if "site" in msg.content.config_records else who
        metrics = {k: float(v) for k, v in next(iter(msg.content.metric_records.values())).items()}
        answers.append((SiteResult(name, node, metrics), msg))
    # replies come in arrival order; a fixed order makes the weighted float sums of aggregation reproducible
    answers.sort(key=lambda pair: (pair[0].site, pair[0].node_id))
    results, ok = [r for r, _ in answers], [m for _, m in answers]
    failed += [f"{names.get(n, f'node {n}')}: no answer within {cfg.round_timeout_s:g} s"
               for n in target.values() if n not in seen]
    up = sum(r.count_bytes() for m in ok for r in m.content.array_records.values())
    record = RoundRecord(round=rnd, phase=phase, asked=len(messages), answered=results, failed=failed,
                         accepted=len(ok) >= cfg.min_sites, seconds=time.perf_counter() - t0,
                         bytes_down=int(down), bytes_up=int(up))
    return record, ok


def _fmt(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics and math.isfinite(float(metrics[k]))]
    return ", ".join(parts) or "no finite metrics"


def run_federation(grid: Grid, cfg: FederationConfig, resume: bool) -> Path:
    """All rounds with checkpoints; returns the final model path."""
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import build_model
    from fedsubtype.train.loop import seed_everything

    store = RunStore(cfg.run_dir)
    strategy = make_strategy(cfg)
    start = 1
    checkpoint = store.latest_checkpoint() if resume else None
    if checkpoint is not None:
        done, weights, strat_name, state = checkpoint
        if strat_name != cfg.strategy:
            raise ValueError(f"checkpoint strategy {strat_name} differs from the config's {cfg.strategy}")
        for name, value in state.items():
            setattr(strategy, name, value)
        start = done + 1
        store.truncate_after(done)
        say(f"resuming after round {done} of {cfg.rounds} from {cfg.run_dir / 'checkpoints'}")
    else:
        if resume:
            say("no checkpoint found: starting from round 1")
        store.truncate_after(0)
        seed_everything(cfg.seed)
        weights = get_weights(build_model(cfg.model))
    layout = layout_of(weights)
    arrays = ArrayRecord(pack(weights))  # one array per message: see fedsubtype/transport.py
    base = round_config(cfg, run_id_of(cfg.run_dir))
    base[LAYOUT_KEY] = layout
    say(f"strategy {cfg.strategy}, {cfg.rounds} rounds, waiting for at least {cfg.min_sites} site(s)")

    for rnd in range(start, cfg.rounds + 1):
        train_msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(base)), grid))
        train_rec, ok = _phase(grid, cfg, train_msgs, rnd, "train")
        if train_rec.accepted:
            try:
                new_arrays, agg = strategy.aggregate_train(rnd, ok)
            except Exception as exc:  # inconsistent replies: keep the previous global model
                log(WARNING, "round %d: aggregation failed (%s)", rnd, exc)
                new_arrays, agg = None, None
            if new_arrays is not None:
                arrays = new_arrays
                train_rec.aggregated = {k: float(v) for k, v in (agg or {}).items()}
            else:
                train_rec.accepted = False
        store.add(train_rec)
        names = ", ".join(r.site for r in train_rec.answered) or "none"
        if train_rec.accepted:
            say(f"round {rnd}/{cfg.rounds} train: {len(train_rec.answered)}/{train_rec.asked} sites answered ({names}); "
                + _fmt(train_rec.aggregated, ("train-loss", "num-examples", "epsilon")))
        else:
            say(f"round {rnd}/{cfg.rounds} train: only {len(train_rec.answered)} of the required {cfg.min_sites} "
                f"sites answered ({names}); global model unchanged")
        for line in train_rec.failed:
            say(f"round {rnd}: left out {line}")

        if evaluates_after(rnd, cfg):
            eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(base)), grid))
            eval_rec, ok = _phase(grid, cfg, eval_msgs, rnd, "evaluate")
            if ok:
                eval_rec.aggregated = {k: float(v) for k, v in
                                       nan_aware_mean([m.content for m in ok], "num-examples").items()}
            store.add(eval_rec)
            say(f"round {rnd}/{cfg.rounds} evaluate: {len(eval_rec.answered)}/{eval_rec.asked} sites; "
                + _fmt(eval_rec.aggregated, ("mean-auc", "er-auc", "pr-auc", "her2-auc", "ki67-mae")))

        state = {name: getattr(strategy, name) for name in STATE_ATTRS if getattr(strategy, name, None) is not None}
        store.save_checkpoint(rnd, unpack(arrays.to_numpy_ndarrays(), layout), cfg.strategy, state)
        say(f"round {rnd}/{cfg.rounds} checkpoint saved; "
            f"{(train_rec.bytes_down + train_rec.bytes_up) / 1e6:.2f} MB of weights exchanged in training")

    final = store.latest_checkpoint()
    final_weights = final[1] if final is not None else unpack(arrays.to_numpy_ndarrays(), layout)
    sites = sorted({a["site"] for r in store.records for a in r["answered"]})
    metadata = {
        "source": "federated", "strategy": cfg.strategy, "rounds": cfg.rounds, "proximal_mu": cfg.proximal_mu,
        "local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps, "lr": cfg.lr, "local_norm": cfg.local_norm,
        "sites": sites, "seed": cfg.seed,
        "thresholds": {t: {"value": 0.5, "method": "fixed (federated: per-case validation predictions stay at the sites)"}
                       for t in ("er", "pr", "her2")},
        "metrics": {"federated_val": store.last_evaluation()},
        "note": "Metrics on the synthetic phantom are engineering evidence, never clinical claims.",
    }
    path = store.save_final_model(final_weights, cfg.model, cfg.preprocess, metadata)
    say(f"done: final model {path}")
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by the SuperLink for a submitted run."""
    cfg, resume = load_federation(context)
    run_federation(grid, cfg, resume)
