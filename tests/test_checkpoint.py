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
    # the plain network: what a version-1 file with the old keys at their defaults describes
    mcfg = ModelConfig(variant="full", width=8, groups=4, feature_dim=16, hidden_dim=16, read_out="none")
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


V1_MODEL_KEYS = {"physical_size": False, "stem": "strided", "pooling": "mean", "region_mixing": "softmax_sum",
                 "task_branches": False, "region_statistics": False, "statistics_heads": False,
                 "peritumoral_profile": False}
"""The options a settings-version-1 model file could hold besides today's, at their default values."""


def _as_version_1(path: Path, out: Path, **switches) -> Path:
    """`path` rewritten as fedsubtype wrote it before settings version 2: format version 1, the old options."""
    payload = torch.load(path, weights_only=True)
    old = {k: v for k, v in payload["model_config"].items() if k != "read_out"}
    return _rewrite(path, out, format_version=1, model_config={**old, **V1_MODEL_KEYS, **switches})


def test_new_model_files_store_the_settings_version(saved) -> None:
    from fedsubtype.migrate import SETTINGS_VERSION

    payload = torch.load(saved[0], weights_only=True)
    assert FORMAT_VERSION == SETTINGS_VERSION == payload["format_version"] == 2
    assert payload["model_config"]["read_out"] == "none" and "statistics_heads" not in payload["model_config"]


def test_version_1_model_file_with_the_old_keys_at_their_defaults_loads(saved, tmp_path: Path) -> None:
    path, model, mcfg, _ = saved
    old = _as_version_1(path, tmp_path / "v1.pt")
    loaded, bundle = load_model(old)
    assert bundle.model_config == mcfg and bundle.format_version == 1
    image, regions = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(image, regions)["logits"], model(image, regions)["logits"])
    # written before some of those keys existed: a missing key means the network from before it
    payload = torch.load(old, weights_only=True)
    older = {k: v for k, v in payload["model_config"].items() if k not in ("pooling", "statistics_heads", "stem")}
    assert read_bundle(_rewrite(old, tmp_path / "older.pt", model_config=older))[1].model_config == mcfg


def test_version_1_read_out_switches_become_the_read_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = dict(width=8, groups=4, feature_dim=16, hidden_dim=16)
    best = ModelConfig(**small, read_out="linear_heads_profile")
    path = tmp_path / "best.pt"
    save_model(path, build_model(best), model_config=best, preprocess_config=PreprocessConfig(size=S), metadata={})
    old = _as_version_1(path, tmp_path / "v1.pt", region_statistics=True, statistics_heads=True, peritumoral_profile=True)
    model, bundle = load_model(old)  # the stored weights fit the network the three switches built
    assert bundle.model_config == best and model.statistics_heads is not None


@pytest.mark.parametrize(("switches", "named"), [
    ({"pooling": "mean_std"}, "pooling"), ({"physical_size": True}, "physical_size"),
    ({"task_branches": True}, "task_branches"), ({"stem": "deep"}, "stem"), ({"region_mixing": "gated_concat"}, "region_mixing"),
    ({"statistics_heads": True}, "statistics_heads=True"),  # the read-outs without the statistics: not offered
])
def test_version_1_file_with_a_removed_option_is_refused_in_one_line(saved, tmp_path: Path, switches, named) -> None:
    old = _as_version_1(saved[0], tmp_path / "v1.pt", **switches)
    _assert_one_line(old, f"{named}.*settings version 2")


def test_version_1_preprocessing_keeps_its_clipping(saved, tmp_path: Path) -> None:
    old = _as_version_1(saved[0], tmp_path / "v1.pt")
    payload = torch.load(old, weights_only=True)
    prep = {k: v for k, v in payload["preprocess_config"].items() if k != "keep_tumour_range"}
    _, bundle = read_bundle(_rewrite(old, tmp_path / "v1-prep.pt", preprocess_config=prep))
    assert bundle.preprocess_config.keep_tumour_range is False  # the value before the key existed
    assert read_bundle(saved[0])[1].preprocess_config.keep_tumour_range is True


def test_weights_that_do_not_fit(saved, tmp_path: Path) -> None:
    payload = torch.load(saved[0], weights_only=True)
    bad = _rewrite(saved[0], tmp_path / "wider.pt", model_config=dict(payload["model_config"], width=16, hidden_dim=32))
    _assert_one_line(bad, "do not fit")
