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


def _split_cases(cfg: Any, cases: list, out: Path, log: Callable[[str], None]) -> tuple[dict[str, list], str]:
    """The train/val/test split (written to splits.csv) and the split the run is scored on (test, else val)."""
    from fedsubtype.data.splits import stratified_split, write_split_csv

    manifest = Path(cfg.data.manifest)
    split_seed = cfg.training.seed if cfg.data.split_seed is None else cfg.data.split_seed
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
    return splits, eval_name


def _job(cfg: Any, splits: dict[str, list], eval_name: str, cache: Any, log: Callable[[str], None]) -> Any:
    """The pipeline job of a run config: train on the train split, select on val, score `eval_name`."""
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.model import build_model, count_parameters
    from fedsubtype.train.pipeline import PipelineJob

    datasets = {name: CaseDataset(split_cases, cache) for name, split_cases in splits.items()}

    def make_model() -> Any:
        model = build_model(cfg.model)
        log(f"model {cfg.model.variant}: {count_parameters(model):,} parameters")
        return model

    ev = cfg.evaluation
    return PipelineJob(make_model, datasets["train"], datasets["val"] if splits["val"] else None, cfg.training,
                       predict={eval_name: datasets[eval_name]}, thresholds=ev.thresholds, n_boot=ev.n_boot,
                       batch_size=ev.batch_size)


def train_run(cfg: Any, *, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run a whole training from a validated RunConfig and write the run folder; returns its path."""
    from fedsubtype.configio import dump_yaml
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.data.splits import cohort_summary
    from fedsubtype.train.pipeline import PHANTOM_NOTE, RunFolder, run_pipeline
    from fedsubtype.train.runtime import resolve_device

    if cfg.data.manifest is None:
        raise UserError("no manifest given", "pass --manifest M or set data.manifest in the config", where="train")
    if cfg.out is None:
        raise UserError("no output folder given", "pass --out DIR or set out in the config", where="train")
    out = Path(cfg.out)
    check_out_dir(out, overwrite)
    resolve_device(cfg.training.device)  # a missing GPU is reported before any work
    cases = usable_cases(Path(cfg.data.manifest), strict=cfg.data.strict, progress=cfg.training.progress, warn=log)
    splits, eval_name = _split_cases(cfg, cases, out, log)
    cache = PreprocessCache(cfg.data.cache_dir(), cfg.preprocess)
    cache.warm(cases, workers=cfg.data.cache_workers, progress=cfg.training.progress)
    dump_yaml(cfg, out / "config.yaml")
    record = RunFolder(cfg.model, cfg.preprocess, eval_name, cohorts={
        "training_cohort": cohort_summary(splits["train"]), "validation_cohort": cohort_summary(splits["val"]),
        "test_cohort": cohort_summary(splits["test"])})
    result = run_pipeline(_job(cfg, splits, eval_name, cache, log), out_dir=out, record=record, log=log)
    metrics = {**result.metrics[eval_name], "evaluated_on": eval_name}
    log(f"wrote {out} ({_headline_line(metrics)}; {PHANTOM_NOTE.split(';')[0]})")
    return out


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
