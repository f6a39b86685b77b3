"""Federated runs on Flower's simulation engine (Ray backend) with the deployment's own ClientApp and ServerApp.

Each virtual SuperNode gets its site exactly as `fedsubtype-client` gives it to a real one: a `site.yaml`
path in the node config (`site-config`). The ServerApp reads the run's federation config from
`<run-dir>/launch.json`, as under `fedsubtype-server`. Starting the engine itself is simulation/flower_sim.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fedsubtype.configio import dump_yaml, from_dict, to_dict
from fedsubtype.data.manifest import write_manifest
from fedsubtype.errors import UserError
from fedsubtype.federation.launch import write_launch
from fedsubtype.federation.site_node import SITE_CONFIG_KEY

from .baselines import TrainedModel
from .cohort import Cohort
from .flower_sim import ray_start_timeout, run_on_simulation_engine
from .scenario import Scenario

RAY_START_ATTEMPTS = 3


def federation_config(key: Any, scen: Scenario, n_sites: int, run_dir: Path, cohort: Cohort) -> Any:
    """The coordinator's FederationConfig for one run (the same schema `fedsubtype-server` reads)."""
    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.robust import RobustConfig
    from fedsubtype.model import ModelConfig

    from .baselines import train_config

    params = dict(key.params)
    strategy = "fedavg" if key.family == "fedbn" else key.family
    tc = train_config(scen, key.seed, scen.federation.local_epochs)
    cfg = FederationConfig(
        run_dir=run_dir, rounds=scen.federation.rounds, strategy=strategy,  # type: ignore[arg-type]
        proximal_mu=float(params.get("mu", 0.0)), server_lr=float(params.get("server_lr", 0.01)),
        local_epochs=scen.federation.local_epochs, evaluate_every=1 if scen.evaluate_every_round else 0,
        lr=tc.lr, batch_size=tc.batch_size, weight_decay=tc.weight_decay,
        augment=tc.augment, seed=key.seed, min_sites=min(scen.federation.min_sites or n_sites, n_sites),
        fraction_train=scen.federation.fraction_train, local_norm=key.family == "fedbn", insecure=True,
        robust=RobustConfig(num_malicious=int(params.get("f", 1)), trim_beta=float(params.get("beta", 0.2)),
                            clip_norm_ratio=params.get("clip")),
        model=from_dict(ModelConfig, copy.deepcopy(scen.model), "scenario.model"),
        preprocess=cohort.preprocess_config)
    if scen.federation.secure_aggregation:
        secure_aggregation(cfg, cohort)
    return cfg


def secure_aggregation(cfg: Any, cohort: Cohort) -> None:
    """Turn on SecAgg+ for a simulated run, its weights bounded by the largest virtual site's cases."""
    from fedsubtype.errors import ConfigError
    from fedsubtype.federation.secure_aggregation import SecureAggregationConfig

    part = cohort.partition
    sizes: dict[str, int] = {}
    for case_id, split in part.split.items():
        if split in ("train", "val"):
            sizes[part.site[case_id]] = sizes.get(part.site[case_id], 0) + 1
    cfg.secure_aggregation = SecureAggregationConfig(enabled=True, max_weight=max(sizes.values(), default=1))
    cfg.reply_checks.max_norm_ratio = None  # needs each site's update, which secure aggregation hides
    problem = cfg.secure_aggregation_problem()
    if problem:
        key, what, fix = problem
        raise ConfigError(what, fix, where=f"scenario.federation.secure_aggregation ({cfg.strategy}: {key})")


def write_site_files(scen: Scenario, cohort: Cohort, sites: list[str], folder: Path) -> dict[int, dict[str, str]]:
    """One site.yaml per virtual site (its own work folder) over a shared manifest of train/val rows."""
    manifest = folder / "sites" / "manifest.csv"
    part = cohort.partition
    rows = [replace(c, site=part.site[c.case_id], split=part.split[c.case_id])
            for c in cohort.cases if part.site[c.case_id] in sites and part.split[c.case_id] in ("train", "val")]
    write_manifest(rows, manifest)
    node_configs = {}
    for i, site in enumerate(sites):
        site_dir = folder / "sites" / site
        privacy = dict(scen.privacy)
        if privacy.get("enabled"):
            privacy.setdefault("ledger", str((site_dir / "privacy_ledger.json").resolve()))
            privacy.setdefault("reproducible_noise", True)  # phantom sites: same seeds, same study (docs/privacy.md)
        config = {
            "name": site, "manifest": str(manifest.resolve()), "manifest_site": site,
            "cache": str(Path(scen.data.cache_dir).resolve()), "work_dir": str(site_dir.resolve()),
            "threads": scen.ray.threads_per_client, "device": "cpu", "allow_insecure": True,
            "preprocess": to_dict(cohort.preprocess_config), "privacy": privacy,
            "limits": {"min_cases_per_metric": 1},  # phantom: keep the small local validation curves (deployment: 10)
        }
        dump_yaml(config, site_dir / "site.yaml")
        node_configs[i] = {SITE_CONFIG_KEY: str((site_dir / "site.yaml").resolve())}
    return node_configs


BUDGET_EXHAUSTED = "privacy budget exhausted"
"""How a DP site's decline reads in the round record: a legitimate end of training, not a failure."""


def _trained_rounds(run_dir: Path) -> tuple[int, list[str]]:
    """(rounds whose training was accepted, why the others were not) from the ServerApp's rounds.json."""
    path = run_dir / "rounds.json"
    if not path.is_file():
        return 0, []
    records = [r for r in json.loads(path.read_text(encoding="utf-8")) if r["phase"] == "train"]
    failed = [f"round {r['round']}: {(r['failed'] or ['too few sites answered'])[0]}" for r in records if not r["accepted"]]
    return sum(1 for r in records if r["accepted"]), failed


def _history(run_dir: Path, local_epochs: int) -> tuple[list[dict[str, Any]], int]:
    """Per-round history (aggregated validation metrics, training loss) and training samples seen."""
    path = run_dir / "rounds.json"
    records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    rows: dict[int, dict[str, Any]] = {}
    samples = 0
    for r in records:
        row = rows.setdefault(r["round"], {"round": r["round"], "epoch_equiv": r["round"] * local_epochs})
        agg = r.get("aggregated") or {}
        if r["phase"] == "train":
            row["train_loss"] = agg.get("train-loss")
            row["sites_answered"] = len(r["answered"])
            samples += int(sum((a["metrics"].get("samples-seen") or 0) for a in r["answered"]))
            row["epsilon"] = agg.get("epsilon")
        else:
            row["val_mean_auc"] = agg.get("mean-auc")
            row["val_ki67_mae"] = agg.get("ki67-mae")
            for task in ("er", "pr", "her2"):
                row[f"val_{task}_auc"] = agg.get(f"{task}-auc")
    return [rows[k] for k in sorted(rows)], samples


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest.json").is_file()


def _run_with_ray_retries(cfg: Any, run_dir: Path, node_configs: dict[int, dict[str, str]], scen: Scenario,
                          folder: Path, say: Callable[[str], None], verbose: bool) -> None:
    """Run the federation on the engine; retry (resuming from the last checkpoint) when Ray starts too slowly."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            run_on_simulation_engine(str(run_dir), node_configs, scen.ray, verbose, fault=scen.fault)
            return
        except (RuntimeError, SystemExit) as exc:
            if ray_start_timeout(exc) and attempt < RAY_START_ATTEMPTS:
                say(f"  Ray did not start within its 30 s limit (busy machine); retry {attempt}/{RAY_START_ATTEMPTS - 1}")
                write_launch(run_dir, cfg, _has_checkpoint(run_dir))
                continue
            raise UserError(f"the federated run failed ({exc})", "rerun with -v to see the engine's log",
                            where=str(folder)) from None


def _check_rounds(cfg: Any, run_dir: Path, folder: Path, say: Callable[[str], None], faulty: bool = False) -> Path:
    """The final model's path, once every round trained (or the rest were declined for spent privacy budgets, or,
    with a simulated faulty site, left the global model unchanged for want of enough valid replies)."""
    trained, failed = _trained_rounds(run_dir)
    if faulty and failed:
        say(f"  {len(failed)} round(s) kept the previous global model ({failed[0]})")
    elif trained and failed and all(BUDGET_EXHAUSTED in f for f in failed):
        say(f"  {len(failed)} round(s) declined: the sites' privacy budgets were spent; the model stands as of round {trained}")
    elif trained < cfg.rounds:
        why = failed[0] if failed else "no round record"
        raise UserError(f"only {trained} of {cfg.rounds} rounds were trained ({why})",
                        "rerun the study (finished runs are kept); with -v the engine's log shows why sites did not answer",
                        where=str(folder))
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise UserError("the federation finished without a final model", "rerun with -v to see the engine's log",
                        where=str(run_dir))
    return model_path


def run_simulated_federation(key: Any, scen: Scenario, cohort: Cohort, sites: list[str], init_model: Any,
                             folder: Path, say: Callable[[str], None], verbose: bool = False) -> dict[str, TrainedModel]:
    """One federated run of `key` over `sites` as virtual SuperNodes on Flower's simulation engine.

    Returns the final global model as "global"; under FedBN also each site's personalised model (the
    global weights with the site's own normalisation layers) under the site's name.
    """
    from fedsubtype.train.checkpoint import load_model

    folder.mkdir(parents=True, exist_ok=True)
    run_dir = (folder / "server").resolve()
    if _trained_rounds(run_dir)[1]:  # an earlier attempt had rounds nobody trained: never resume from those
        import shutil

        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    cfg = federation_config(key, scen, len(sites), run_dir, cohort)
    cfg.validate("scenario federation")
    resume = _has_checkpoint(run_dir)
    write_launch(run_dir, cfg, resume)
    node_configs = write_site_files(scen, cohort, sites, folder)
    say(f"  Flower simulation engine: {len(sites)} virtual SuperNodes ({', '.join(sites)}), {cfg.rounds} rounds of "
        f"{cfg.strategy}{' + local norm' if cfg.local_norm else ''}" + (" (resuming)" if resume else ""))
    if scen.fault is not None:
        say(f"  simulation-only fault: {sites[scen.fault.site]} sends {scen.fault.kind} replies")
    _run_with_ray_retries(cfg, run_dir, node_configs, scen, folder, say, verbose)
    model, _bundle = load_model(_check_rounds(cfg, run_dir, folder, say, scen.fault is not None))
    history, samples = _history(run_dir, cfg.local_epochs)
    out = {"global": TrainedModel(model, list(sites), history, samples)}
    if cfg.local_norm:
        out.update(_personalised(model, sites, folder, samples))
    return out


def _personalised(model: Any, sites: list[str], folder: Path, samples: int) -> dict[str, TrainedModel]:
    """FedBN: each site's model = global weights + the normalisation layers the site kept locally."""
    import torch

    out = {}
    for site in sites:
        path = folder / "sites" / site / "local_norm.pt"  # where SiteAlgo keeps a site's local layers
        if not path.is_file():
            continue
        local = copy.deepcopy(model)
        state = local.state_dict()
        state.update(torch.load(path, map_location="cpu", weights_only=True))
        local.load_state_dict(state)
        out[site] = TrainedModel(local.eval(), [site], [], samples)
    return out

