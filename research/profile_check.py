"""Does the peritumoral profile help a linear reader? The per-task linear fits that start the network's
statistics read-outs (`fit_statistics_heads`), on the 21 region statistics with and without the 7-number
peritumoral profile, against radiomics (LR) on the same splits (analysis script, phantom only).

Run from the repository root (seconds per seed; needs the radiomics features cached by a paper benchmark):

    python -m research.profile_check --cache cache/sim-64 --size 64 --seeds 0,1,2,3,4,5

Phantom figures are engineering evidence, never clinical claims.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.benchmarks.paper import split_external, statistics_features
from fedsubtype.data.cache import PreprocessCache
from fedsubtype.data.manifest import Case, read_manifest
from fedsubtype.model.region_stats import linear_read_outs
from fedsubtype.data.preprocess import PreprocessConfig
from fedsubtype.evaluate.radiomics import RadiomicsBaseline, feature_matrix
from fedsubtype.data.splits import stratified_split

warnings.filterwarnings("ignore")


def _labels(cases: list[Case]) -> np.ndarray:
    """[N, 4] labels in TASKS order, NaN where missing."""
    return np.stack([c.label_vector() for c in cases]).astype(float)


def _aucs(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    ok = ~np.isnan(labels)
    return [roc_auc_score(labels[ok[:, j], j], scores[ok[:, j], j]) for j in range(len(CLASSIFICATION_TASKS))]


def _read_out(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    """Test scores of the per-task logistic regressions the network's read-outs start from."""
    centre, scale, fits = linear_read_outs(x_train, y_train, CLASSIFICATION_TASKS, seed)
    return np.stack([(x_test - centre) / scale @ fits[t][0] + fits[t][1] for t in CLASSIFICATION_TASKS], 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.profile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="data/phantom/manifest.csv")
    ap.add_argument("--cache", default="cache/sim-64")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    args = ap.parse_args(argv)
    cases = read_manifest(args.manifest)
    _, internal, _ = split_external(cases, None)
    cache = PreprocessCache(Path(args.cache), PreprocessConfig(size=args.size))
    stats = {"21 region statistics": statistics_features(cases, cache),
             "+ peritumoral profile (28)": statistics_features(cases, cache, profile=True)}
    matrix, _ = feature_matrix(cases, cache_dir=args.cache, progress=False)
    radiomics = {c.case_id: matrix[i] for i, c in enumerate(cases)}
    results: dict[str, list[list[float]]] = {}
    for seed in map(int, args.seeds.split(",")):
        splits = stratified_split(internal, (0.7, 0.1, 0.2), seed=seed)
        train, test = splits["train"] + splits["val"], splits["test"]
        y_train, y_test = _labels(train), _labels(test)
        for name, feats in stats.items():
            x_train, x_test = (np.stack([feats[c.case_id] for c in part]) for part in (train, test))
            results.setdefault(f"read-out fits, {name}", []).append(
                _aucs(y_test, _read_out(x_train, y_train, x_test, seed)))
        x_train, x_test = (np.stack([radiomics[c.case_id] for c in part]) for part in (train, test))
        probs, _ = RadiomicsBaseline("lr", seed=seed).fit(x_train, y_train).predict(x_test)
        results.setdefault("radiomics (LR)", []).append(_aucs(y_test, probs))
    print(f"internal test split, seeds {args.seeds}, {args.size}³: AUC ER / PR / HER2, Avg (per seed)")
    for name, per_seed in results.items():
        a = np.array(per_seed)
        print(f"{name:44s} {' / '.join(f'{v:.3f}' for v in a.mean(0))}  {a.mean():.3f} ± {a.mean(1).std(ddof=1):.3f}"
              f"  ({' / '.join(f'{v:.3f}' for v in a.mean(1))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
