"""The oracle: the best a model can do from the latent phenotypes the generator rendered.

Logistic regression (ER, PR, HER2) and ridge regression (Ki-67) on the standardised latent
variables of the training cases. Its AUCs and MAE bound what an image model can reach on the
phantom. Phantom figures are engineering evidence, never clinical claims.

Run: ``python -m fedsubtype.phantom.oracle COHORT_DIR [--seed 0] [--test-fraction 0.2]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import mean_absolute_error, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import SplineTransformer, StandardScaler

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.errors import UserError
from fedsubtype.phantom.biology import LATENT_COLUMNS


def latent_columns() -> list[str]:
    """Names of the latent phenotype columns in latents.csv that the oracle uses."""
    return list(LATENT_COLUMNS)


def _features(latents: pd.DataFrame | np.ndarray) -> np.ndarray:
    if isinstance(latents, pd.DataFrame):
        missing = [c for c in LATENT_COLUMNS if c not in latents.columns]
        if missing:
            raise UserError(f"latent table lacks column(s) {', '.join(missing)}", "use latents.csv of a phantom cohort")
        return latents[list(LATENT_COLUMNS)].to_numpy(dtype=float)
    arr = np.asarray(latents, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(LATENT_COLUMNS):
        raise ValueError(f"expected an array [n, {len(LATENT_COLUMNS)}] in latent_columns() order, got {arr.shape}")
    return arr


def _labels(labels: pd.DataFrame | np.ndarray, n: int) -> np.ndarray:
    if isinstance(labels, pd.DataFrame):
        return np.column_stack([labels[t].to_numpy(dtype=float) if t in labels else np.full(n, np.nan) for t in TASKS])
    arr = np.asarray(labels, dtype=float)
    if arr.shape != (n, len(TASKS)):
        raise ValueError(f"expected labels [n, 4] in TASKS order, got {arr.shape}")
    return arr


@dataclass
class Oracle:
    """Fitted per-task models on the latents (tasks without enough labels are absent)."""

    models: dict[str, Pipeline] = field(default_factory=dict)

    def predict(self, latents: pd.DataFrame | np.ndarray) -> dict[str, np.ndarray]:
        """Probability of positive status per classification task, Ki-67 in percent."""
        x = _features(latents)
        out = {}
        for task, model in self.models.items():
            out[task] = model.predict_proba(x)[:, 1] if task in CLASSIFICATION_TASKS else np.clip(model.predict(x), 0, 100)
        return out


def _model(task: str, seed: int) -> Pipeline:
    # splines let the oracle use the latents' non-linear links (logistic squashing, clipping)
    if task in CLASSIFICATION_TASKS:
        return make_pipeline(StandardScaler(), SplineTransformer(n_knots=4, degree=2),
                             LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return make_pipeline(StandardScaler(), SplineTransformer(n_knots=4, degree=2), Ridge(alpha=1.0))


def fit_oracle(latents: pd.DataFrame | np.ndarray, labels: pd.DataFrame | np.ndarray, *, seed: int = 0) -> Oracle:
    """Fit one model per task on the cases whose label is present (missing labels are skipped)."""
    x = _features(latents)
    y = _labels(labels, len(x))
    oracle = Oracle()
    for j, task in enumerate(TASKS):
        present = np.isfinite(y[:, j])
        if present.sum() < 10 or (task in CLASSIFICATION_TASKS and len(np.unique(y[present, j])) < 2):
            continue
        model = _model(task, seed)
        target = y[present, j].astype(int) if task in CLASSIFICATION_TASKS else y[present, j]
        oracle.models[task] = model.fit(x[present], target)
    return oracle


def score_oracle(oracle: Oracle, latents: pd.DataFrame | np.ndarray, labels: pd.DataFrame | np.ndarray) -> dict:
    """Per-task AUC (er, pr, her2), their mean, and Ki-67 MAE in percentage points on the given cases."""
    x = _features(latents)
    y = _labels(labels, len(x))
    pred = oracle.predict(x)
    out: dict[str, float | int] = {}
    aucs = []
    for j, task in enumerate(TASKS):
        present = np.isfinite(y[:, j])
        key = f"{task}_auc" if task in CLASSIFICATION_TASKS else "ki67_mae"
        out[f"n_{task}"] = int(present.sum())
        if task not in pred or present.sum() == 0:
            out[key] = float("nan")
            continue
        if task in CLASSIFICATION_TASKS:
            ys = y[present, j]
            out[key] = float(roc_auc_score(ys, pred[task][present])) if len(np.unique(ys)) == 2 else float("nan")
            aucs.append(out[key])
        else:
            out[key] = float(mean_absolute_error(y[present, j], pred[task][present]))
    out["avg_auc"] = float(np.nanmean(aucs)) if aucs and np.isfinite(aucs).any() else float("nan")
    return out


def load_cohort_tables(cohort_dir: str | Path) -> pd.DataFrame:
    """manifest.csv joined with latents.csv on case_id (labels NaN where missing)."""
    cohort_dir = Path(cohort_dir)
    manifest, latents = cohort_dir / "manifest.csv", cohort_dir / "latents.csv"
    for f in (manifest, latents):
        if not f.is_file():
            raise UserError(f"{f.name} not found", "point at a folder written by `fedsubtype phantom`", where=str(cohort_dir))
    labels = pd.read_csv(manifest, usecols=["case_id", "site", *TASKS], dtype={"case_id": str})
    lat = pd.read_csv(latents, dtype={"case_id": str})
    return labels.merge(lat.drop(columns=[c for c in ("site",) if c in lat.columns]), on="case_id", how="inner")


def oracle_metrics(cohort_dir: str | Path, train_ids: Sequence[str], test_ids: Sequence[str], seed: int = 0) -> dict:
    """Fit on the latents of `train_ids`, score on `test_ids`: er_auc, pr_auc, her2_auc, avg_auc, ki67_mae, n_*."""
    table = load_cohort_tables(cohort_dir).set_index("case_id")
    unknown = [c for c in [*train_ids, *test_ids] if c not in table.index]
    if unknown:
        raise UserError(f"{len(unknown)} case id(s) not in the cohort, e.g. {unknown[0]!r}",
                        "pass ids from this cohort's manifest", where=str(cohort_dir))
    train, test = table.loc[list(train_ids)], table.loc[list(test_ids)]
    oracle = fit_oracle(train, train, seed=seed)
    return score_oracle(oracle, test, test)


def split_ids(table: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Stratified (by ER/HER2 pattern, missing as its own stratum) train/test split of case ids."""
    strata = table["er"].fillna(-1).astype(int).astype(str) + "_" + table["her2"].fillna(-1).astype(int).astype(str)
    counts = strata.map(strata.value_counts())
    strata = strata.where(counts >= 2, "rare")
    train, test = train_test_split(table["case_id"].tolist(), test_size=test_fraction, random_state=seed,
                                   stratify=strata if strata.value_counts().min() >= 2 else None)
    return train, test


def main(argv: Sequence[str] | None = None) -> int:
    """Print the oracle's figures for a cohort folder (stratified split)."""
    parser = argparse.ArgumentParser(prog="python -m fedsubtype.phantom.oracle", description=__doc__.splitlines()[0])
    parser.add_argument("cohort_dir", type=Path, help="folder written by `fedsubtype phantom`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1, help="repeat with seeds seed..seed+N-1 and report mean ± SD")
    args = parser.parse_args(argv)
    if not 0.05 <= args.test_fraction <= 0.5:
        parser.error("--test-fraction must be in [0.05, 0.5]")
    if not 1 <= args.repeats <= 100:
        parser.error("--repeats must be in [1, 100]")
    from fedsubtype.cli import run_guarded

    def body() -> int:
        table = load_cohort_tables(args.cohort_dir)
        runs = []
        for seed in range(args.seed, args.seed + args.repeats):
            train, test = split_ids(table, args.test_fraction, seed)
            runs.append(oracle_metrics(args.cohort_dir, train, test, seed=seed))
        print(f"oracle on latents ({len(train)} train / {len(test)} test cases, stratified, seed {args.seed}"
              f"{f' .. {args.seed + args.repeats - 1}' if args.repeats > 1 else ''}; "
              "phantom: engineering evidence, not a clinical claim)")

        def fmt(key: str, digits: int) -> str:
            vals = np.array([r[key] for r in runs], dtype=float)
            sd = f" ± {np.nanstd(vals):.{digits}f}" if len(vals) > 1 else ""
            return f"{np.nanmean(vals):.{digits}f}{sd}"

        print(f"  ER AUC {fmt('er_auc', 3)}   PR AUC {fmt('pr_auc', 3)}   HER2 AUC {fmt('her2_auc', 3)}   "
              f"mean {fmt('avg_auc', 3)}   Ki-67 MAE {fmt('ki67_mae', 2)} points")
        return 0

    return run_guarded("oracle", body)


if __name__ == "__main__":
    sys.exit(main())
