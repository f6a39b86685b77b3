"""The one train → predict → threshold → score → save pipeline behind `fedsubtype train`, the paper benchmark
and the simulation baselines: each caller states what it trains on and what it predicts, the steps are shared."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from fedsubtype.evaluate.predictions import Predictions, predict_dataset
from fedsubtype.evaluate.scoring import score_predictions
from fedsubtype.evaluate.thresholds import choose_thresholds, fixed_thresholds, threshold_values
from fedsubtype.train.config import TrainConfig
from fedsubtype.train.loop import PrivacyHook, TrainResult, fit
from fedsubtype.train.runtime import seed_everything

PHANTOM_NOTE = ("Metrics on the synthetic phantom are engineering evidence, never clinical claims; "
                "on real data they describe this cohort and split only.")


@dataclass
class PipelineJob:
    """What one run trains on and what it predicts afterwards.

    ``make_model`` is called after seeding with ``training.seed`` (again for a refit). With ``thresholds``
    ("youden" or "fixed") they are chosen on the validation predictions and every prediction is scored;
    without, the predictions are returned unscored. ``refit_on``: after validation has chosen the epoch,
    a fresh model is trained on these cases for that many epochs and its last weights are kept.
    """

    make_model: Callable[[], nn.Module]
    train: Dataset
    val: Dataset | None
    training: TrainConfig
    predict: dict[str, Dataset] = field(default_factory=dict)
    thresholds: str | None = None
    n_boot: int = 1000
    batch_size: int = 16
    refit_on: Dataset | None = None
    privacy: PrivacyHook | None = None


@dataclass
class PipelineResult:
    """The trained model and what was predicted and scored with it."""

    trained: TrainResult
    predictions: dict[str, Predictions]
    val_predictions: Predictions | None = None
    thresholds: dict[str, dict[str, Any]] | None = None
    val_metrics: dict[str, Any] | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def threshold_values(self) -> dict[str, float] | None:
        """{task: value} of the chosen thresholds (None when none were chosen)."""
        return threshold_values(self.thresholds) if self.thresholds is not None else None


@dataclass
class RunFolder:
    """How `fedsubtype train` records a run: predictions.csv and metrics.json of `evaluated_on`, and model.pt."""

    model_config: Any
    preprocess_config: Any
    evaluated_on: str
    cohorts: dict[str, Any] = field(default_factory=dict)
    """Summaries stored in model.pt's metadata (training_cohort, validation_cohort, test_cohort)."""


def train_model(job: PipelineJob, out_dir: Path | None, log: Callable[[str], None]) -> TrainResult:
    """Seed, build and fit (history into `out_dir`); with `refit_on`, retrain a fresh model for the chosen epochs."""
    cfg = job.training
    if job.refit_on is not None and job.privacy is not None:
        raise ValueError("a refit would spend the privacy hook's budget twice; refit only without differential privacy")
    seed_everything(cfg.seed)
    result = fit(job.make_model(), job.train, job.val, cfg, privacy=job.privacy, out_dir=out_dir, log=log)
    if job.refit_on is None:
        return result
    log(f"refit on train + validation ({len(job.refit_on)} cases) for the "  # type: ignore[arg-type]
        f"{result.best_epoch} epochs validation chose")
    seed_everything(cfg.seed)
    again = dataclasses.replace(cfg, epochs=result.best_epoch, max_steps=None, patience=None)
    return fit(job.make_model(), job.refit_on, None, again,
               out_dir=None if out_dir is None else Path(out_dir) / "refit", log=log)


def predict_and_score(job: PipelineJob, trained: TrainResult) -> PipelineResult:
    """Predictions of the trained model on every named dataset; with `job.thresholds`, thresholds chosen on
    validation (0.5 without validation cases) and every prediction scored at them."""
    cfg = job.training
    out = PipelineResult(trained, {})

    def predict(data: Dataset) -> Predictions:
        return predict_dataset(trained.model, data, batch_size=job.batch_size, device=cfg.device)

    def score(preds: Predictions) -> dict[str, Any]:
        return score_predictions(preds, n_boot=job.n_boot, seed=cfg.seed, thresholds=out.threshold_values())

    if job.thresholds is not None:
        if job.val is not None and len(job.val) > 0:  # type: ignore[arg-type]
            out.val_predictions = predict(job.val)
            out.thresholds = choose_thresholds(out.val_predictions, job.thresholds)
            out.val_metrics = score(out.val_predictions)
        else:
            out.thresholds = fixed_thresholds("fixed (no validation split)")
    for name, data in job.predict.items():
        out.predictions[name] = predict(data)
        if job.thresholds is not None:
            out.metrics[name] = score(out.predictions[name])
    return out


def run_pipeline(job: PipelineJob, *, out_dir: Path | None = None, record: RunFolder | None = None,
                 log: Callable[[str], None] | None = None) -> PipelineResult:
    """Train, predict, choose thresholds, score and (with `record`) save the run folder `out_dir`.

    `out_dir` receives the training history (metrics_per_epoch.csv, best_weights.pt); None writes nothing.
    """
    say = log or (lambda msg: None)
    result = predict_and_score(job, train_model(job, out_dir, say))
    if record is not None:
        if out_dir is None:
            raise ValueError("saving a run folder needs out_dir")
        save_run(Path(out_dir), result, record, job)
    return result


def save_run(out: Path, result: PipelineResult, record: RunFolder, job: PipelineJob) -> dict[str, Any]:
    """predictions.csv, metrics.json and model.pt of a scored run (what `fedsubtype train` writes); returns the metrics."""
    from fedsubtype.train.checkpoint import json_safe
    from fedsubtype.configio import atomic_write_text

    name = record.evaluated_on
    preds = result.predictions[name]
    preds.to_csv(out / "predictions.csv", result.threshold_values())
    metrics: dict[str, Any] = dict(result.metrics[name])
    metrics.update(evaluated_on=name, n_cases=len(preds), val=result.val_metrics, best_epoch=result.trained.best_epoch,
                   thresholds=result.thresholds, note=PHANTOM_NOTE)
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    save_run_model(out, result.trained.model, model_config=record.model_config,
                   preprocess_config=record.preprocess_config,
                   metadata=run_metadata(result, record, job, metrics))
    return metrics


def run_metadata(result: PipelineResult, record: RunFolder, job: PipelineJob, metrics: dict[str, Any]) -> dict[str, Any]:
    """What model.pt records about a centralized run: thresholds, cohorts, headline metrics, schedule, versions."""
    import torch

    trained = result.trained
    tested = "test" if record.evaluated_on == "test" else "val_as_test"
    return {
        "source": "centralized",
        "thresholds": result.thresholds,
        "threshold_method": job.thresholds,
        **record.cohorts,
        "metrics": {tested: headline(metrics), "val": headline(result.val_metrics)},
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "steps": trained.steps,
        "samples_seen": trained.samples_seen,
        "training_config": job.training,
        "privacy": None,
        "torch_version": torch.__version__,
    }


def save_run_model(out_dir: Path, model: nn.Module, *, model_config: Any, preprocess_config: Any,
                   metadata: dict[str, Any]) -> Path:
    """`out_dir/model.pt` in the one model format (`fedsubtype evaluate/predict` read it); the run's
    best_weights.pt, which it supersedes, is removed. Returns the model file's path."""
    from fedsubtype.train.checkpoint import save_model

    out_dir = Path(out_dir)
    (out_dir / "best_weights.pt").unlink(missing_ok=True)
    path = out_dir / "model.pt"
    save_model(path, model, model_config=model_config, preprocess_config=preprocess_config, metadata=metadata)
    return path


def headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The AUCs (with intervals and counts) and the Ki-67 figures of a metrics dict, for model.pt's metadata."""
    if metrics is None:
        return None
    keep = {"mean_auc": metrics.get("mean_auc")}
    for t in ("er", "pr", "her2"):
        keep[t] = {k: (metrics.get(t) or {}).get(k) for k in ("auc", "auc_ci", "n")}
    keep["ki67"] = {k: (metrics.get("ki67") or {}).get(k) for k in ("mae", "mae_ci", "pearson_r", "n")}
    return keep
