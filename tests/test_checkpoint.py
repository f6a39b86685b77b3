"""model.pt: round trip, and one-line errors for corrupt, foreign and incompatible files."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsubtype import __version__
from fedsubtype.train.checkpoint import FORMAT_VERSION, load_model, read_bundle, save_model
from fedsubtype.errors import ModelFileError
from fedsubtype.model import ModelConfig, build_model
from fedsubtype.data.preprocess import PreprocessConfig

S = 16


def _model_and_configs() -> tuple[torch.nn.Module, ModelConfig, PreprocessConfig]:
    torch.manual_seed(0)
    mcfg = ModelConfig(variant="full", width=8, groups=4, feature_dim=16, hidden_dim=16)
    return build_model(mcfg).eval(), mcfg, PreprocessConfig(size=S)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 1, S, S, S, generator=g)
    regions = torch.randint(0, 4, (3, S, S, S), generator=g)
    return image, regions


@pytest.fixture()
def saved(tmp_path: Path):
    model, mcfg, pcfg = _model_and_configs()
    path = tmp_path / "model.pt"
    meta = {"thresholds": {"er": {"value": 0.4, "method": "youden"}, "pr": {"value": 0.5, "method": "fixed"},
                           "her2": {"value": np.float32(0.25), "method": "youden"}},
            "training_cohort": {"n_cases": 10, "sites": {"a": 10}}, "metrics": {"mean_auc": float("nan")},
            "privacy": None, "path": tmp_path}
    save_model(path, model, model_config=mcfg, preprocess_config=pcfg, metadata=meta)
    return path, model, mcfg, pcfg


def test_round_trip_predictions_identical(saved) -> None:
    path, model, mcfg, pcfg = saved
    loaded, bundle = load_model(path)
    image, regions = _inputs()
    with torch.no_grad():
        a, b = model(image, regions), loaded(image, regions)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["ki67"], b["ki67"])
    assert bundle.model_config == mcfg and bundle.preprocess_config == pcfg
    assert bundle.thresholds == {"er": 0.4, "pr": 0.5, "her2": pytest.approx(0.25)}
    assert bundle.metadata["metrics"]["mean_auc"] is None  # NaN stored as null, JSON-safe
    assert bundle.metadata["training_cohort"]["sites"] == {"a": 10}
    assert bundle.format_version == FORMAT_VERSION and bundle.fedsubtype_version == __version__
    assert bundle.created.endswith("+00:00")
    assert not loaded.training


def test_file_is_weights_only_loadable(saved) -> None:
    path = saved[0]
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "fedsubtype-model"
    state, _ = read_bundle(path)
    assert set(state) == set(saved[1].state_dict())


def _assert_one_line(path: Path, pattern: str) -> None:
    with pytest.raises(ModelFileError, match=pattern) as err:
        load_model(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_one_line(tmp_path / "nope.pt", "not found")


def test_truncated_file(saved, tmp_path: Path) -> None:
    data = saved[0].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    _assert_one_line(bad, "corrupt or truncated")


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a model at all\n" * 10)
    _assert_one_line(bad, "corrupt|not a fedsubtype")


def test_foreign_torch_file(tmp_path: Path) -> None:
    foreign = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), foreign)
    _assert_one_line(foreign, "not a fedsubtype model file")


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    import argparse

    evil = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format": "fedsubtype-model", "obj": argparse.Namespace(cmd="echo")}, buf, pickle_module=pickle)
    evil.write_bytes(buf.getvalue())
    _assert_one_line(evil, "not a fedsubtype model file|corrupt")


def _rewrite(path: Path, out: Path, **changes) -> Path:
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, out)
    return out


def test_newer_format_version(saved, tmp_path: Path) -> None:
    bad = _rewrite(saved[0], tmp_path / "future.pt", format_version=FORMAT_VERSION + 1)
    _assert_one_line(bad, "format version")


def test_incompatible_config(saved, tmp_path: Path) -> None:
    payload = torch.load(saved[0], weights_only=True)
    cfg = dict(payload["model_config"], attention_heads=4)
    bad = _rewrite(saved[0], tmp_path / "oddcfg.pt", model_config=cfg)
    _assert_one_line(bad, "attention_heads")


def test_model_file_from_before_tumour_range_keeps_its_clipping(saved, tmp_path: Path) -> None:
    payload = torch.load(saved[0], weights_only=True)
    old = {k: v for k, v in payload["preprocess_config"].items() if k != "keep_tumour_range"}
    _, bundle = read_bundle(_rewrite(saved[0], tmp_path / "old.pt", preprocess_config=old))
    assert bundle.preprocess_config.keep_tumour_range is False  # preprocessed as it was trained
    assert read_bundle(saved[0])[1].preprocess_config.keep_tumour_range is True


def test_model_file_from_before_the_newer_network_options_builds_the_network_it_was_trained_as(saved, tmp_path: Path) -> None:
    from fedsubtype.model.config import LEGACY_DEFAULTS

    payload = torch.load(saved[0], weights_only=True)
    old = {k: v for k, v in payload["model_config"].items() if k not in LEGACY_DEFAULTS}
    path = _rewrite(saved[0], tmp_path / "old.pt", model_config=old)
    _, bundle = read_bundle(path)
    assert {k: getattr(bundle.model_config, k) for k in LEGACY_DEFAULTS} == LEGACY_DEFAULTS
    model, _ = load_model(path)  # the stored weights fit the network rebuilt from the legacy values
    assert not model.training


def test_weights_that_do_not_fit(saved, tmp_path: Path) -> None:
    payload = torch.load(saved[0], weights_only=True)
    bad = _rewrite(saved[0], tmp_path / "wider.pt", model_config=dict(payload["model_config"], width=16, hidden_dim=32))
    _assert_one_line(bad, "do not fit")
