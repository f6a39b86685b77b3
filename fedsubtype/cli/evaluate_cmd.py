"""`fedsubtype evaluate`: score a model file on any cohort (metrics.json + predictions.csv)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model.pt on a manifest's cases",
        description="Rebuild the model and its preprocessing from model.pt, predict every usable case of the "
                    "manifest (or one split of it) and write metrics.json and predictions.csv.")
    p.add_argument("--model", type=Path, required=True, help="model.pt from `fedsubtype train` or a federation")
    p.add_argument("--manifest", type=Path, required=True, help="case manifest CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and predictions.csv")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="only the cases of this split (manifest 'split' column)")
    p.add_argument("--cache", type=Path, help="preprocessing cache folder (default: <manifest folder>/.fedsubtype-cache)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for confidence intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prediction batch size (default 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: CUDA when present")
    p.add_argument("--strict", action="store_true", help="stop on any unusable case instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def evaluate_run(model_path: Path, manifest: Path, out: Path, *, split: str | None = None, cache_dir: Path | None = None,
                 n_boot: int = 1000, seed: int = 0, batch_size: int = 16, device: str = "auto", strict: bool = False,
                 overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate a model file on a manifest and write metrics.json and predictions.csv; returns the metrics."""
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.train.checkpoint import load_model
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.errors import UserError
    from fedsubtype.train.run_config import DEFAULT_CACHE_DIRNAME
    from fedsubtype.cli.train_cmd import check_out_dir, usable_cases, write_json
    from fedsubtype.evaluate.predictions import predict_dataset
    from fedsubtype.evaluate.scoring import score_predictions
    from fedsubtype.train.pipeline import PHANTOM_NOTE
    from fedsubtype.train.runtime import resolve_device

    if n_boot < 0:
        raise UserError(f"--n-boot must be >= 0, got {n_boot}", "use e.g. 1000", where="evaluate")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. 16", where="evaluate")
    model, bundle = load_model(model_path, device=str(resolve_device(device)))
    check_out_dir(out, overwrite)
    cases = usable_cases(manifest, strict=strict, progress=progress, warn=log)
    if split is not None:
        cases = [c for c in cases if c.split == split]
        if not cases:
            raise UserError(f"no usable case has split={split!r}", "check the manifest's 'split' column or drop --split",
                            where=str(manifest))
    cache = PreprocessCache(cache_dir or manifest.parent / DEFAULT_CACHE_DIRNAME, bundle.preprocess_config)
    cache.warm(cases, workers=1, progress=progress)
    preds = predict_dataset(model, CaseDataset(cases, cache), batch_size=batch_size, device=device)
    thresholds = bundle.thresholds
    preds.to_csv(out / "predictions.csv", thresholds)
    metrics = score_predictions(preds, n_boot=n_boot, seed=seed, thresholds=thresholds)
    metrics.update(evaluated_on=split or "all", n_cases=len(preds), model=str(model_path),
                   model_source=bundle.metadata.get("source"), thresholds=bundle.metadata.get("thresholds"),
                   note=PHANTOM_NOTE)
    write_json(out / "metrics.json", metrics)
    mean = metrics.get("mean_auc")
    log(f"wrote {out}: {len(preds)} cases, mean AUC {mean if mean is None else round(float(mean), 3)}")
    return metrics


def run(args: argparse.Namespace) -> int:
    evaluate_run(args.model, args.manifest.absolute(), args.out, split=args.split, cache_dir=args.cache,
                 n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size, device=args.device,
                 strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
                 log=lambda m: print(m, file=sys.stderr))
    return 0
