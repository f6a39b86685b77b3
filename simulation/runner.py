"""The FLamby-style protocol: every (setting, method, seed, held-out site) run, resumable, into results.csv.

A run writes `result.json` (and `predictions.npz`) atomically in its own folder and is skipped when that
file exists, so an interrupted study continues where it stopped. Every model is scored on every site's
test split and on the pooled test split; local-only trains one model per site.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.configio import atomic_write_bytes, atomic_write_text, dump_yaml, from_dict
from fedsubtype.evaluate.experiments import mark_finished

from .cohort import POOLED, Cohort, evaluate_everywhere, load_cohort
from .report import run_value, write_report
from .runs import ALL_SITES, RunKey, load_record
from .scenario import FEDERATED, Scenario

RESULT_COLUMNS = ("setting", "method", "seed", "holdout", "train_sites", "test_site", "metric", "value", "config_hash")


def plan_runs(scen: Scenario, setting: str, sites: list[str]) -> list[RunKey]:
    """Every run of one setting, cheap families first (so early results appear early)."""
    holdouts = ([ALL_SITES] if scen.include_all_sites else []) + (list(sites) if scen.leave_one_site_out else [])
    keys = []
    for seed in scen.seeds:
        for holdout in holdouts:
            for method in scen.methods:
                if holdout != ALL_SITES and (method.name == "local" or (
                        scen.loso_methods is not None and method.name not in scen.loso_methods)):
                    continue  # a local model never sees the held-out site anyway
                for label, params in method.variants():
                    keys.append(RunKey(setting, label, method.name, tuple(sorted(params.items())), seed, holdout))
    return keys


def initial_model(scen: Scenario, seed: int) -> Any:
    """The same initial weights for every method of a seed."""
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.train.runtime import seed_everything

    seed_everything(seed)  # as the ServerApp does before building the initial global model
    return build_model(from_dict(ModelConfig, copy.deepcopy(scen.model), "scenario.model"))


def _metric_rows(key: RunKey, train_sites: list[str], metrics: dict[str, dict[str, Any]], config_hash: str) -> list[dict[str, Any]]:
    rows = []
    for test_site, m in metrics.items():
        flat: dict[str, Any] = {"mean_auc": m.get("mean_auc")}
        for task in CLASSIFICATION_TASKS:
            entry = m.get(task) or {}
            flat[f"{task}_auc"] = entry.get("auc")
            ci = entry.get("auc_ci") or (None, None)
            flat[f"{task}_auc_lo"], flat[f"{task}_auc_hi"] = (ci[0], ci[1]) if len(ci) == 2 else (None, None)
            flat[f"{task}_n"] = entry.get("n")
        ki = m.get("ki67") or {}
        flat["ki67_mae"], flat["ki67_r"], flat["ki67_n"] = ki.get("mae"), ki.get("pearson_r"), ki.get("n")
        for metric, value in flat.items():
            rows.append({"setting": key.setting, "method": key.method, "seed": key.seed, "holdout": key.holdout,
                         "train_sites": "+".join(train_sites), "test_site": test_site, "metric": metric,
                         "value": "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else value,
                         "config_hash": config_hash})
    return rows


def _save_predictions(path: Path, models: dict[str, Any]) -> None:
    """Pooled-test predictions of each model of a run (for ROC curves and the Ki-67 scatter)."""
    arrays = {}
    for name, preds in models.items():
        arrays[f"{name}__probs"] = preds.probs
        arrays[f"{name}__ki67"] = preds.ki67
        arrays[f"{name}__labels"] = preds.labels
        arrays[f"{name}__sites"] = np.asarray(preds.sites, dtype=str)  # virtual sites of the partition
        arrays[f"{name}__case_ids"] = np.asarray(preds.case_ids, dtype=str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def execute_run(key: RunKey, scen: Scenario, cohort: Cohort, root: Path, config_hash: str,
                say: Callable[[str], None], verbose: bool = False) -> dict[str, Any]:
    """Train and score one run; write result.json last (its presence marks the run finished)."""
    from .baselines import train_on

    folder = key.folder(root)
    if (folder / "result.json").is_file():  # finished under another configuration: start clean
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    internal = cohort.partition.internal_sites()
    train_sites = [s for s in internal if s != key.holdout]
    init = initial_model(scen, key.seed)
    n_boot = 200
    trained: dict[str, Any] = {}
    if key.family == "pooled":
        trained["global"] = train_on(train_sites, cohort, scen, init, key.seed, folder / "pooled", say)
    elif key.family == "local":
        for site in train_sites:
            say(f"  local model of {site}")
            trained[site] = train_on([site], cohort, scen, init, key.seed, folder / f"local-{site}", say)
    elif key.family in FEDERATED:
        from .engine import run_simulated_federation

        trained.update(run_simulated_federation(key, scen, cohort, train_sites, init, folder / "federation", say, verbose))
    else:  # guarded by the scenario schema
        raise ValueError(key.family)
    evaluations, rows, pooled_preds = [], [], {}
    for name, tm in trained.items():
        metrics, preds = evaluate_everywhere(tm.model, cohort, n_boot=n_boot, seed=key.seed)
        evaluations.append({"model": name, "train_sites": tm.train_sites, "metrics": metrics})
        rows += _metric_rows(key, tm.train_sites, metrics, config_hash)
        pooled_preds[name] = preds
    record = {
        "setting": key.setting, "method": key.method, "family": key.family, "params": dict(key.params),
        "seed": key.seed, "holdout": key.holdout, "train_sites": train_sites, "config_hash": config_hash,
        "samples_seen": {name: tm.samples_seen for name, tm in trained.items()},
        "history": {name: tm.history for name, tm in trained.items()},
        "evaluations": evaluations, "rows": rows, "wall_s": time.perf_counter() - t0,
    }
    _save_predictions(folder / "predictions.npz", pooled_preds)
    mark_finished(folder / "result.json", record, indent=1, default=_jsonable)
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_results_csv(records: list[dict[str, Any]], path: Path) -> None:
    """results.csv: one row per (run, model, test site, metric)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        for row in rec["rows"]:
            writer.writerow({k: row.get(k, "") for k in RESULT_COLUMNS})
    atomic_write_text(path, buf.getvalue())


@dataclass
class StudyOutcome:
    """What a study produced: where, the records, and how many runs were done now vs reused."""

    root: Path
    records: list[dict[str, Any]]
    ran: int
    skipped: int


def _setting_cohorts(scen: Scenario, say: Callable[[str], None], warm: bool) -> Iterator[tuple[str, Scenario, Cohort]]:
    for setting, sub in scen.settings():
        yield setting, sub, load_cohort(sub, sub.partition, say, warm=warm)


def _partition_name(setting: str) -> str:
    return "partition.csv" if setting == "default" else f"partition-{setting.replace('=', '')}.csv"


def plan_study(scen: Scenario, say: Callable[[str], None] = print) -> list[RunKey]:
    """Validate, partition (writing the partition CSVs) and list every run with its state; trains nothing."""
    root = Path(scen.output_dir)
    keys: list[RunKey] = []
    for setting, sub, cohort in _setting_cohorts(scen, say, warm=False):
        cohort.partition.write_csv(root / _partition_name(setting))
        for site, row in cohort.partition.label_table().items():
            say(f"[{setting}] {site}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        for key in plan_runs(sub, setting, cohort.partition.internal_sites()):
            state = "finished" if load_record(key, root, sub.config_hash()) else "to run"
            say(f"{key.label()}: {state}")
            keys.append(key)
    say(f"{len(keys)} run(s); results in {root}")
    return keys


def report_only(scen: Scenario, say: Callable[[str], None] = print) -> Path:
    """Rebuild results.csv and report.md from the finished runs."""
    root = Path(scen.output_dir)
    dump_yaml(scen, root / "scenario.resolved.yaml")
    records, partitions = [], {}
    for setting, sub, cohort in _setting_cohorts(scen, say, warm=False):
        partitions[setting] = cohort.partition
        cohort.partition.write_csv(root / _partition_name(setting))
        records += [r for key in plan_runs(sub, setting, cohort.partition.internal_sites())
                    if (r := load_record(key, root)) is not None]  # whatever finished; hashes are in the table
    write_results_csv(records, root / "results.csv")
    path = write_report(scen, records, partitions, root)
    say(f"report: {path} ({len(records)} finished runs)")
    return path


def run_study(scen: Scenario, *, root: Path | None = None, say: Callable[[str], None] = print,
              report: bool = True, verbose: bool = False) -> StudyOutcome:
    """Run every planned run of every setting (skipping finished ones), then write results.csv and the report."""
    root = Path(root or scen.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    dump_yaml(scen, root / "scenario.resolved.yaml")
    records: list[dict[str, Any]] = []
    ran = skipped = 0
    partitions: dict[str, Any] = {}
    t_study = time.perf_counter()
    for setting, sub, cohort in _setting_cohorts(scen, say, warm=True):
        partitions[setting] = cohort.partition
        cohort.partition.write_csv(root / _partition_name(setting))
        keys = plan_runs(sub, setting, cohort.partition.internal_sites())
        config_hash = sub.config_hash()
        for i, key in enumerate(keys, start=1):
            done = load_record(key, root, config_hash)
            if done is not None:
                say(f"run {i}/{len(keys)} {key.label()}: finished earlier — skipped")
                records.append(done)
                skipped += 1
                continue
            say(f"run {i}/{len(keys)} {key.label()}: training ...")
            rec = execute_run(key, sub, cohort, root, config_hash, say, verbose)
            pooled = run_value(rec, POOLED, "mean_auc")
            summary = f"pooled-test mean AUC {pooled:.3f}" if np.isfinite(pooled) else "done"
            say(f"run {i}/{len(keys)} {key.label()}: {summary} in {rec['wall_s']:.0f} s "
                f"(study {time.perf_counter() - t_study:.0f} s)")
            records.append(rec)
            ran += 1
        write_results_csv(records, root / "results.csv")
    if report:
        write_report(scen, records, partitions, root)
        say(f"report: {root / 'report.md'}")
    return StudyOutcome(root, records, ran, skipped)
