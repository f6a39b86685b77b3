"""Which epoch should a run keep? One training run, scored on validation *and* test after every epoch.

`fedsubtype train`'s own steps (usable cases, split, cache, pipeline job) with early stopping off; after each
epoch the validated weights (the moving average when `training.ema_decay` is set) are also scored on the test
split. `--summarize` then reads such runs and reports the test score each selection rule would have kept:
best validation mean AUC with the configured patience (today's rule), lowest validation loss, the last epoch
(a fixed schedule, no selection). Probing only: the product never imports this.

    python -m research.selection_probe --config C.yaml --manifest M --seed 0 --out results/selection/NAME/s0
    python -m research.selection_probe --summarize results/selection
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _scoring_selector(test_data: Any, batch_size: int, device: str) -> type:
    """A Selector that also writes the scored weights' test metrics into each validated history row."""
    from fedsubtype.evaluate.predictions import run_predictions
    from fedsubtype.evaluate.scoring import score_predictions
    from fedsubtype.train.runtime import resolve_device
    from fedsubtype.train.selection import Selector, val_summary

    class TestScoringSelector(Selector):
        def observe(self, row: dict[str, Any], evaluated: bool) -> bool:
            if evaluated:
                preds, _ = run_predictions(self.model, test_data, batch_size, resolve_device(device), None)
                test = val_summary(score_predictions(preds, n_boot=0, seed=0), None)
                row.update({k.replace("val_", "test_", 1): v for k, v in test.items() if k != "val_loss"})
            return super().observe(row, evaluated)

    return TestScoringSelector


def run_probe(config: Path | None, manifest: Path, seed: int, out: Path, epochs: int | None,
              ki67_sd: float | None, ki67_logit: bool = False) -> None:
    """Train once with validation and test scored every epoch; metrics_per_epoch.csv lands in `out`."""
    import fedsubtype.train.loop as loop
    from fedsubtype.cli.train_cmd import _job, _split_cases, usable_cases
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.train.pipeline import train_model
    from fedsubtype.train.run_config import load_run_config

    cfg = load_run_config(config)
    cfg.data.manifest, cfg.training.seed, cfg.training.patience, cfg.training.progress = manifest, seed, None, False
    if epochs is not None:
        cfg.training.epochs = epochs
    if ki67_sd is not None:
        _scale_ki67_loss(ki67_sd)
    if ki67_logit:
        _logit_ki67_loss()
    out.mkdir(parents=True, exist_ok=True)
    cases = usable_cases(manifest, strict=False, progress=False, warn=print)
    splits, _ = _split_cases(cfg, cases, out, print)
    cache = PreprocessCache(cfg.data.cache_dir(), cfg.preprocess)
    cache.warm(cases, workers=1, progress=False)
    job = _job(cfg, splits, "test", cache, print)
    loop.Selector = _scoring_selector(CaseDataset(splits["test"], cache), 16, cfg.training.device)
    train_model(job, out, lambda m: print(m, flush=True))


def _scale_ki67_loss(sd: float) -> None:
    """Probe a standardised Ki-67 term: the squared error divided by sd² (sd on the 0-1 scale)."""
    import fedsubtype.model.loss as loss_mod

    original = loss_mod.JointLoss.__call__

    def scaled(self, outputs, labels, present):  # type: ignore[no-untyped-def]
        out = dict(outputs)
        out["ki67"] = outputs["ki67"] / sd
        labels = labels.clone()
        labels[:, 3] = labels[:, 3] / sd
        return original(self, out, labels, present)

    loss_mod.JointLoss.__call__ = scaled  # type: ignore[method-assign]


def _logit_ki67_loss() -> None:
    """Probe a Ki-67 term on the logit scale: squared error of logit(prediction) against logit(label fraction),
    the label clipped to the read-out fit's range (the scale its ridge regression is fitted on)."""
    import torch

    import fedsubtype.model.loss as loss_mod
    from fedsubtype.model.region_stats import KI67_FIT_RANGE

    original = loss_mod.JointLoss.__call__

    def on_logits(self, outputs, labels, present):  # type: ignore[no-untyped-def]
        total, log = original(self, outputs, labels, present)
        p = outputs["ki67"].clamp(1e-6, 1 - 1e-6)
        target = (labels[:, 3] / 100.0).clamp(*KI67_FIT_RANGE)
        err = (torch.logit(p) - torch.logit(target)) ** 2
        ok = present[:, 3].bool()
        old = torch.where(ok, (p - labels[:, 3] / 100.0) ** 2, torch.zeros_like(p)).sum() / ok.sum().clamp_min(1)
        new = torch.where(ok, err, torch.zeros_like(err)).sum() / ok.sum().clamp_min(1)
        return total + self.task_weights[3] * (new - old), log

    loss_mod.JointLoss.__call__ = on_logits  # type: ignore[method-assign]


RULES = ("val_auc_patience8", "val_auc", "val_loss", "last")


def pick(history: pd.DataFrame, rule: str) -> pd.Series:
    """The history row a selection rule keeps."""
    if rule == "last":
        return history.iloc[-1]
    if rule == "val_loss":
        return history.loc[history["val_loss"].idxmin()]
    rows = history
    if rule == "val_auc_patience8":  # today's default: stop after 8 validations without a better mean AUC
        best, stale, stop = -math.inf, 0, len(history)
        for i, auc in enumerate(history["val_mean_auc"]):
            if auc > best:
                best, stale = auc, 0
            else:
                stale += 1
                if stale >= 8:
                    stop = i + 1
                    break
        rows = history.iloc[:stop]
    return rows.loc[rows["val_mean_auc"].idxmax()]


def summarize(root: Path) -> pd.DataFrame:
    """One row per (configuration, seed, rule): the kept epoch and its test mean AUC and Ki-67 MAE."""
    rows = []
    for csv in sorted(root.glob("*/*/metrics_per_epoch.csv")):
        history = pd.read_csv(csv)
        if "test_mean_auc" not in history:
            continue
        for rule in RULES:
            kept = pick(history, rule)
            rows.append({"config": csv.parent.parent.name, "seed": csv.parent.name, "rule": rule,
                         "epoch": int(kept["epoch"]), "test_mean_auc": kept["test_mean_auc"],
                         "test_ki67_mae": kept["test_ki67_mae"], "val_mean_auc": kept["val_mean_auc"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", type=Path, help="a folder of <config>/<seed>/ probe runs to summarise")
    p.add_argument("--config", type=Path)
    p.add_argument("--manifest", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ki67-sd", type=float, help="probe: divide the Ki-67 error by this sd (0-1 scale)")
    p.add_argument("--ki67-logit", action="store_true", help="probe: the Ki-67 error on the logit scale")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.summarize:
        table = summarize(args.summarize)
        if table.empty:
            print(f"no probe runs under {args.summarize}", file=sys.stderr)
            return 1
        table.to_csv(args.summarize / "selection.csv", index=False)
        agg = table.groupby(["config", "rule"])[["epoch", "test_mean_auc", "test_ki67_mae"]].agg(["mean", "std"])
        print(agg.round(3).to_string())
        return 0
    if args.manifest is None or args.out is None:
        p.error("--manifest and --out are needed (or --summarize)")
    run_probe(args.config, args.manifest, args.seed, args.out, args.epochs, args.ki67_sd, args.ki67_logit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
