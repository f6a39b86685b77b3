"""`fedsubtype train`: validate, split, cache, train, select on validation, score on test, write the run folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from fedsubtype.errors import UserError

RUN_FILES: tuple[str, ...] = ("model.pt", "metrics.json", "predictions.csv", "metrics_per_epoch.csv", "config.yaml",
                              "splits.csv")
PHANTOM_NOTE = ("Metrics on the synthetic phantom are engineering evidence, never clinical claims; "
                "on real data they describe this cohort and split only.")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a manifest (centralized)",
        description="Train the spatial multi-task model on a manifest's cases. Without --config the defaults are "
                    "used; flags override the config. A 'split' column in the manifest is honoured, otherwise a "
                    "stratified 70/10/20 split is made and written to splits.csv.")
    p.add_argument("--config", type=Path, help="run config YAML (see configs/train_default.yaml)")
    p.add_argument("--manifest", type=Path, help="case manifest CSV (overrides data.manifest)")
    p.add_argument("--out", type=Path, help="run folder to create (overrides out)")
    p.add_argument("--epochs", type=int, help="training epochs (overrides training.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, help="batch size (overrides training.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (overrides training.lr)")
    p.add_argument("--seed", type=int, help="seed for split, initialisation, shuffling and augmentation")
    p.add_argument("--size", type=int, help="input edge in voxels (overrides preprocess.size; multiple of 8)")
    p.add_argument("--variant", help="model variant / ablation row (overrides model.variant)")
    p.add_argument("--cache", type=Path, help="preprocessing cache folder (default: <manifest folder>/.fedsubtype-cache)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto: CUDA when present)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples for confidence intervals")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--strict", action="store_true", help="stop on any unusable case instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="write into an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _apply_overrides(cfg: Any, args: argparse.Namespace) -> None:
    overrides = {
        ("data", "manifest"): args.manifest, ("data", "cache"): args.cache,
        ("training", "epochs"): args.epochs, ("training", "max_steps"): args.max_steps,
        ("training", "batch_size"): args.batch_size, ("training", "lr"): args.lr,
        ("training", "seed"): args.seed, ("training", "device"): args.device, ("training", "threads"): args.threads,
        ("preprocess", "size"): args.size, ("model", "variant"): args.variant, ("evaluation", "n_boot"): args.n_boot,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if args.out is not None:
        cfg.out = args.out
    if args.no_augment:
        cfg.training.augment = False
    if args.strict:
        cfg.data.strict = True
    if args.quiet:
        cfg.training.progress = False


def revalidate(cfg: Any) -> Any:
    """Validate a run config after CLI overrides, through the same schema as the YAML file."""
    from fedsubtype.configio import from_dict, to_dict
    from fedsubtype.train.run_config import RunConfig

    return from_dict(RunConfig, to_dict(cfg), where="config (after command-line flags)")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that is a file, or exists and is not empty (unless `overwrite`); created on first write."""
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", "choose another --out", where=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError("run folder already exists and is not empty", "choose another --out or pass --overwrite",
                        where=str(out))


def usable_cases(manifest: Path, *, strict: bool, progress: bool, warn: Callable[[str], None]) -> list:
    """Validate every row and image; skip unusable cases with one line each (or stop when `strict`)."""
    from fedsubtype.data.validation import validate_manifest

    report = validate_manifest(manifest, progress=progress)
    for line in report.problem_lines():
        warn(line)
    if strict and report.errors:
        raise UserError(f"{len(report.errors)} problem(s) found (listed above)",
                        "fix them or run without --strict to skip unusable cases", where=str(manifest))
    if not report.cases:
        raise UserError("no usable cases", "run `fedsubtype validate` on the manifest", where=str(manifest))
    skipped = report.rows - len(report.cases)
    if skipped > 0:
        warn(f"skipping {skipped} unusable case(s) of {report.rows}")
    return report.cases


def write_json(path: Path, data: Any) -> None:
    """JSON (NaN written as null), atomically."""
    from fedsubtype.train.checkpoint import json_safe
    from fedsubtype.configio import atomic_write_text

    atomic_write_text(path, json.dumps(json_safe(data), indent=2) + "\n")


def train_run(cfg: Any, *, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run a whole training from a validated RunConfig and write the run folder; returns its path."""
    import torch

    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.train.checkpoint import save_model
    from fedsubtype.configio import dump_yaml
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.model import build_model, count_parameters
    from fedsubtype.data.splits import cohort_summary, stratified_split, write_split_csv
    from fedsubtype.train.loop import (choose_thresholds, fit, fixed_thresholds, predict_dataset, resolve_device,
                            score_predictions, seed_everything)

    if cfg.data.manifest is None:
        raise UserError("no manifest given", "pass --manifest M or set data.manifest in the config", where="train")
    if cfg.out is None:
        raise UserError("no output folder given", "pass --out DIR or set out in the config", where="train")
    out = Path(cfg.out)
    manifest = Path(cfg.data.manifest)
    tc = cfg.training
    check_out_dir(out, overwrite)
    resolve_device(tc.device)  # a missing GPU is reported before any work
    cases = usable_cases(manifest, strict=cfg.data.strict, progress=tc.progress, warn=log)

    split_seed = tc.seed if cfg.data.split_seed is None else cfg.data.split_seed
    splits = stratified_split(cases, cfg.data.split_fractions, seed=split_seed, stratify_on=cfg.data.stratify_on)
    write_split_csv(splits, out / "splits.csv")
    log("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    if not splits["train"]:
        raise UserError("the training split is empty", "add cases or change data.split_fractions", where=str(manifest))
    eval_name = "test" if splits["test"] else "val"
    if not splits[eval_name]:
        raise UserError("both validation and test splits are empty", "add cases or change data.split_fractions",
                        where=str(manifest))
    if not splits["test"]:
        log("warning: the test split is empty; metrics.json reports the validation split")

    cache = PreprocessCache(cfg.data.cache_dir(), cfg.preprocess)
    cache.warm(cases, workers=cfg.data.cache_workers, progress=tc.progress)
    datasets = {name: CaseDataset(split_cases, cache) for name, split_cases in splits.items()}
    dump_yaml(cfg, out / "config.yaml")

    seed_everything(tc.seed)
    model = build_model(cfg.model)
    log(f"model {cfg.model.variant}: {count_parameters(model):,} parameters")
    result = fit(model, datasets["train"], datasets["val"] if splits["val"] else None, tc, out_dir=out, log=log)
    (out / "best_weights.pt").unlink(missing_ok=True)  # superseded by model.pt

    ev = cfg.evaluation
    device = tc.device
    metrics: dict[str, Any] = {}
    thresholds_meta: dict[str, Any]
    if splits["val"]:
        val_preds = predict_dataset(result.model, datasets["val"], batch_size=ev.batch_size, device=device)
        thresholds_meta = choose_thresholds(val_preds, ev.thresholds)
        thresholds = {t: v["value"] for t, v in thresholds_meta.items()}
        val_metrics = score_predictions(val_preds, n_boot=ev.n_boot, seed=tc.seed, thresholds=thresholds)
    else:
        thresholds_meta = fixed_thresholds("fixed (no validation split)")
        thresholds = {t: v["value"] for t, v in thresholds_meta.items()}
        val_metrics = None
    test_preds = predict_dataset(result.model, datasets[eval_name], batch_size=ev.batch_size, device=device)
    test_preds.to_csv(out / "predictions.csv", thresholds)
    metrics.update(score_predictions(test_preds, n_boot=ev.n_boot, seed=tc.seed, thresholds=thresholds))
    metrics.update(evaluated_on=eval_name, n_cases=len(test_preds), val=val_metrics, best_epoch=result.best_epoch,
                   thresholds=thresholds_meta, note=PHANTOM_NOTE)
    write_json(out / "metrics.json", metrics)

    metadata = {
        "source": "centralized",
        "thresholds": thresholds_meta,
        "threshold_method": ev.thresholds,
        "training_cohort": cohort_summary(splits["train"]),
        "validation_cohort": cohort_summary(splits["val"]),
        "test_cohort": cohort_summary(splits["test"]),
        "metrics": {"test" if eval_name == "test" else "val_as_test": _headline(metrics), "val": _headline(val_metrics)},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "training_config": tc,
        "privacy": None,
        "torch_version": torch.__version__,
    }
    save_model(out / "model.pt", result.model, model_config=cfg.model, preprocess_config=cfg.preprocess,
               metadata=metadata)
    log(f"wrote {out} ({_headline_line(metrics)}; {PHANTOM_NOTE.split(';')[0]})")
    return out


def _headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    keep = {"mean_auc": metrics.get("mean_auc")}
    for t in ("er", "pr", "her2"):
        keep[t] = {k: (metrics.get(t) or {}).get(k) for k in ("auc", "auc_ci", "n")}
    keep["ki67"] = {k: (metrics.get("ki67") or {}).get(k) for k in ("mae", "mae_ci", "pearson_r", "n")}
    return keep


def _headline_line(metrics: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        try:
            return format(float(v), spec)
        except (TypeError, ValueError):
            return "n/a"
    aucs = ", ".join(f"{t} AUC {fmt((metrics.get(t) or {}).get('auc'), '.3f')}" for t in ("er", "pr", "her2"))
    return (f"{metrics.get('evaluated_on', 'test')}: mean AUC {fmt(metrics.get('mean_auc'), '.3f')}, {aucs}, "
            f"Ki-67 MAE {fmt((metrics.get('ki67') or {}).get('mae'), '.1f')}")


def run(args: argparse.Namespace) -> int:
    from fedsubtype.train.run_config import load_run_config

    cfg = load_run_config(args.config)
    _apply_overrides(cfg, args)
    cfg = revalidate(cfg)
    if cfg.data.manifest is not None:
        cfg.data.manifest = Path(cfg.data.manifest).absolute()
    if cfg.out is not None:
        cfg.out = Path(cfg.out).absolute()
    if cfg.data.cache is None and cfg.data.manifest is not None:
        cfg.data.cache = cfg.data.cache_dir()
    train_run(cfg, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    return 0
