"""The one train → predict → threshold → score → save pipeline, and the model preparation hook `fit` calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsubtype.evaluate.predictions import Predictions, predict_dataset
from fedsubtype.model import ModelConfig, build_model
from fedsubtype.train.checkpoint import load_model
from fedsubtype.train.config import TrainConfig
from fedsubtype.train.loop import fit
from fedsubtype.train.pipeline import PipelineJob, RunFolder, run_pipeline, save_run_model
from fedsubtype.data.preprocess import PreprocessConfig
from test_training import TensorCases

MODEL = ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16, blocks=(1, 1, 1))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=3e-3, progress=False, patience=None, augment=False, threads=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data() -> dict[str, TensorCases]:
    return {"train": TensorCases(16, seed=1), "val": TensorCases(8, seed=2), "test": TensorCases(6, seed=3)}


def _job(data, **kw) -> PipelineJob:
    return PipelineJob(lambda: build_model(MODEL), data["train"], data["val"], _cfg(), **kw)


def test_pipeline_equals_seeding_building_fitting_and_predicting_by_hand(data) -> None:
    result = run_pipeline(_job(data, predict={"test": data["test"]}))
    torch.manual_seed(7)
    by_hand = fit(build_model(MODEL), data["train"], data["val"], _cfg())
    expected = predict_dataset(by_hand.model, data["test"], device="cpu")
    assert np.array_equal(result.predictions["test"].probs, expected.probs)
    assert result.thresholds is None and result.metrics == {}  # no threshold method: predictions only


def test_thresholds_are_chosen_on_validation_and_every_prediction_is_scored(data) -> None:
    result = run_pipeline(_job(data, predict={"test": data["test"]}, thresholds="youden", n_boot=0))
    assert result.val_predictions is not None and len(result.val_predictions) == 8
    assert {t["method"] for t in result.thresholds.values()} <= {"youden", "fixed (validation labels of one class or missing)"}
    assert result.val_metrics is not None and "mean_auc" in result.metrics["test"]
    without_val = run_pipeline(PipelineJob(lambda: build_model(MODEL), data["train"], None, _cfg(epochs=1),
                                           predict={"test": data["test"]}, thresholds="youden", n_boot=0))
    assert {t["method"] for t in without_val.thresholds.values()} == {"fixed (no validation split)"}
    assert without_val.val_metrics is None


def test_refit_trains_a_fresh_model_for_the_chosen_epochs(tmp_path: Path, data) -> None:
    result = run_pipeline(_job(data, refit_on=data["train"], predict={"test": data["test"]}), out_dir=tmp_path)
    assert (tmp_path / "metrics_per_epoch.csv").is_file() and (tmp_path / "refit" / "metrics_per_epoch.csv").is_file()
    assert result.trained.best_val is None  # the refit has no validation: its last weights are kept
    assert len(result.trained.history) >= 1


def test_a_recorded_run_writes_the_run_folder(tmp_path: Path, data) -> None:
    record = RunFolder(MODEL, PreprocessConfig(size=16), "test", cohorts={"training_cohort": {"cases": 16}})
    run_pipeline(_job(data, predict={"test": data["test"]}, thresholds="youden", n_boot=0), out_dir=tmp_path,
                 record=record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics_per_epoch.csv", "model.pt",
                                                          "predictions.csv"]
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["evaluated_on"] == "test" and metrics["n_cases"] == 6 and metrics["val"] is not None
    assert len(Predictions.read_csv(tmp_path / "predictions.csv")) == 6
    _, bundle = load_model(tmp_path / "model.pt")
    assert bundle.metadata["source"] == "centralized" and bundle.metadata["training_cohort"] == {"cases": 16}
    assert set(bundle.metadata["metrics"]) == {"test", "val"}


def test_save_run_model_replaces_best_weights(tmp_path: Path) -> None:
    (tmp_path / "best_weights.pt").write_bytes(b"stale")
    path = save_run_model(tmp_path, build_model(MODEL), model_config=MODEL, preprocess_config=PreprocessConfig(size=16),
                          metadata={"source": "federated"})
    assert path == tmp_path / "model.pt" and not (tmp_path / "best_weights.pt").exists()
    assert load_model(path)[1].metadata["source"] == "federated"


class _Prepared(torch.nn.Module):
    """A model whose preparation hook records how `fit` called it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model(MODEL)
        self.calls: list[tuple[int, bool, int]] = []

    def prepare_for_training(self, train_data, *, private: bool, seed: int) -> None:
        self.calls.append((len(train_data), private, seed))

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_fit_calls_the_models_preparation_hook_once(data) -> None:
    model = _Prepared()
    fit(model, data["train"], None, _cfg(epochs=1))
    assert model.calls == [(16, False, 7)]
