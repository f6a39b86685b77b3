"""Refit the task heads of a trained network as per-task logistic regressions on its frozen features.

Jointly trained, every head of the full model reads the same shared direction (one score per case, see
`prediction_structure`). This asks what the same trained network gives when each task gets its own linear
read-out of the frozen representation (and of the region statistics, when the model has them), fitted
on train + validation the way the radiomics rows are: scaling, class-balanced logistic regression with C
chosen by 5-fold cross-validation on ROC AUC. It reads a `fedsubtype benchmark paper` folder (its
config.yaml and the `runs/<row>/seed<k>/best_weights.pt` the networks kept) and rebuilds the same splits.

    python -m research.head_refit results/paper-v7 [--row full]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.errors import UserError


@dataclass
class TrainedRun:
    """One seed of a trained network row: the network with its kept weights, that seed's splits, the cache."""

    seed: int
    model: Any
    splits: dict[str, list]
    cache: Any
    folder: Path


def _settings(results: Path) -> dict[str, Any]:
    import yaml

    path = results / "config.yaml"
    if not path.is_file():
        raise UserError("no config.yaml", "pass a `fedsubtype benchmark paper` output folder", where=str(results))
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def frozen_features(model, cases, cache, batch_size: int = 32) -> np.ndarray:
    """[N, F] what the task heads of `model` read for each case: the shared representation, plus the region
    statistics when its read-out feeds them to the representation (a model with one extractor)."""
    import torch
    from torch.utils.data import DataLoader

    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.model.regions_pool import region_masks

    if len(getattr(model, "extractors", ())) != 1:
        raise UserError("only a network with one shared representation can be refitted",
                        "use a row with one feature extractor (e.g. full)")
    data = CaseDataset(list(cases), cache)
    reps: list[torch.Tensor] = []
    hook = model.representation.register_forward_hook(lambda module, inputs, output: reps.append(output.detach()))
    stats = []
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
                image, regions = batch["image"], batch["regions"]
                model(image, regions)
                if model.cfg.read_out_parts.statistics:
                    stats.append(model.input_statistics(image, region_masks(regions, model.spec.regions)))
    finally:
        hook.remove()
    parts = [torch.cat(reps)] + ([torch.cat(stats)] if stats else [])
    return torch.cat(parts, dim=1).double().numpy()


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
    folds = int(min(5, np.bincount(y_train.astype(int), minlength=2).min()))
    if folds < 2:  # too few cases of a class to choose C by cross-validation (tiny cohorts): C = 1
        return pipe.fit(x_train, y_train).predict_proba(x_test)[:, 1]
    grid = GridSearchCV(pipe, {"logisticregression__C": list(np.logspace(-4, 1, 6))}, scoring="roc_auc",
                        cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)
    return grid.fit(x_train, y_train).predict_proba(x_test)[:, 1]


def trained_runs(results: str | Path, row: str = "full") -> Iterator[TrainedRun]:
    """Each finished seed of a network row in a `fedsubtype benchmark paper` folder: its kept weights in a
    rebuilt network, and the benchmark's splits of that seed rebuilt from the folder's config."""
    import torch

    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.configio import from_dict
    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.migrate import migrate_result_settings
    from fedsubtype.data.splits import stratified_split
    from fedsubtype.benchmarks.paper import split_external

    results = Path(results)
    cfg = migrate_result_settings(_settings(results), str(results / "config.yaml"))  # older folders too
    runs = [p.parent / "best_weights.pt" for p in (results / "runs" / row).glob("seed*/done.json")]
    if not runs or not all(p.is_file() for p in runs):
        raise UserError(f"no finished runs/{row}/seed<k> with best_weights.pt", "run the benchmark's network rows "
                        "first", where=str(results))
    runs.sort(key=lambda p: int(p.parent.name.removeprefix("seed")))  # seed 9 before seed 10
    model_cfg = from_dict(ModelConfig, {**cfg["model"], "variant": row}, "model")
    cache = PreprocessCache(Path(cfg["cache_dir"]), from_dict(PreprocessConfig, cfg["preprocess"]))
    _, internal, _ = split_external(read_manifest(cfg["manifest"]), cfg.get("external_site"), where=cfg["manifest"])
    for path in runs:
        seed = int(path.parent.name.removeprefix("seed"))
        splits = stratified_split(internal, (0.7, 0.1, 0.2), seed=seed)
        model = build_model(model_cfg)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        yield TrainedRun(seed, model.eval(), splits, cache, path.parent)


def refit_heads(results: str | Path, row: str = "full") -> pd.DataFrame:
    """One line per seed: internal-test AUC per task of the row as trained and with refitted linear heads."""
    from sklearn.metrics import roc_auc_score

    lines = []
    for run in trained_runs(results, row):
        fit_cases, test_cases = run.splits["train"] + run.splits["val"], run.splits["test"]
        x_fit, x_test = frozen_features(run.model, fit_cases, run.cache), frozen_features(run.model, test_cases, run.cache)
        trained = pd.read_csv(run.folder / "test.csv").set_index("case_id")
        line: dict[str, Any] = {"seed": run.seed}
        for j, task in enumerate(CLASSIFICATION_TASKS):
            y_fit = np.array([c.label_vector()[j] for c in fit_cases], dtype=float)
            y_test = np.array([c.label_vector()[j] for c in test_cases], dtype=float)
            ok_fit, ok_test = ~np.isnan(y_fit), ~np.isnan(y_test)
            if len(np.unique(y_fit[ok_fit])) < 2 or len(np.unique(y_test[ok_test])) < 2:
                line[f"{task}_trained"] = line[f"{task}_refit"] = float("nan")  # no AUC without both classes
                continue
            prob = _fit_predict(x_fit[ok_fit], y_fit[ok_fit], x_test[ok_test], run.seed)
            ids = [c.case_id for c, ok in zip(test_cases, ok_test) if ok]
            line[f"{task}_trained"] = roc_auc_score(y_test[ok_test], trained.loc[ids, f"{task}_prob"])
            line[f"{task}_refit"] = roc_auc_score(y_test[ok_test], prob)
        for kind in ("trained", "refit"):
            line[f"avg_{kind}"] = float(np.nanmean([line[f"{t}_{kind}"] for t in CLASSIFICATION_TASKS]))
        lines.append(line)
    return pd.DataFrame(lines)


def folder_tool(argv: list[str] | None, prog: str, doc: str, row_help: str,
                compute: Callable[[Path, str], pd.DataFrame], csv_stem: str) -> pd.DataFrame | None:
    """Command line of a per-seed tool over a benchmark folder: parse `results [--row]`, compute the table,
    print it and write `<results>/<csv_stem>_<row>.csv`; None after a one-line error."""
    from fedsubtype.configio import atomic_write_text

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a `fedsubtype benchmark paper` output folder")
    parser.add_argument("--row", default="full", help=row_help)
    args = parser.parse_args(argv)
    try:
        table = compute(args.results, args.row)
    except UserError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        return None
    print(table.round(3).to_string(index=False))
    atomic_write_text(Path(args.results) / f"{csv_stem}_{args.row}.csv", table.to_csv(index=False))
    return table


def main(argv: list[str] | None = None) -> int:
    table = folder_tool(argv, "python -m research.head_refit", __doc__,
                        "network row whose heads are refitted (default: full)", refit_heads, "head_refit")
    if table is None:
        return 1
    print(f"\nmean over {len(table)} seeds: trained {table.avg_trained.mean():.3f} ± {table.avg_trained.std(ddof=1):.3f}, "
          f"refitted heads {table.avg_refit.mean():.3f} ± {table.avg_refit.std(ddof=1):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
