"""Radiomics baselines: real MIRP features from real NIfTI files, leak-free scikit-learn pipelines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("mirp", reason="radiomics extra not installed: pip install 'fedsubtype[radiomics]'")

from fedsubtype.data.imageio import write_image  # noqa: E402
from fedsubtype.data.manifest import Case  # noqa: E402
from fedsubtype.evaluate.radiomics import RadiomicsBaseline, RadiomicsConfig, extract_case_features, feature_matrix  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402


def _case(tmp: Path, name: str, radius_mm: float, texture: float, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    spacing = (0.8, 0.8, 2.0)  # x, y, z
    shape = (24, 56, 56)  # z, y, x
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing[::-1])), indexing="ij")
    centre = [n * s / 2 for n, s in zip(shape, spacing[::-1])]
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    body = np.where(r <= 21.0, 100.0 + rng.normal(0, 5, shape), np.abs(rng.normal(0, 3, shape)))  # tissue in air
    tumour = r <= radius_mm
    body[tumour] = 300.0 + texture * rng.normal(0, 60, tumour.sum())
    img = sitk.GetImageFromArray(body.astype(np.float32))
    img.SetSpacing(spacing)
    mask = sitk.GetImageFromArray(tumour.astype(np.uint8))
    mask.CopyInformation(img)
    write_image(img, tmp / f"{name}.nii.gz")
    write_image(mask, tmp / f"{name}_mask.nii.gz")
    return Case(name, tmp / f"{name}.nii.gz", tmp / f"{name}_mask.nii.gz", "A", {"er": None, "pr": None, "her2": None, "ki67": None})


def test_features_cover_tumour_and_peritumoral_shell_with_physical_shape(tmp_path: Path) -> None:
    case = _case(tmp_path, "c0", radius_mm=9.0, texture=1.0, seed=0)
    feats = extract_case_features(case, RadiomicsConfig())
    assert any(k.startswith("tumour__") for k in feats) and any(k.startswith("peritumoral__") for k in feats)
    analytic_ml = 4 / 3 * math.pi * 9.0**3 / 1000
    assert feats["tumour__shape_volume_ml"] == pytest.approx(analytic_ml, rel=0.1)
    assert all(np.isfinite(v) for k, v in feats.items() if "shape" in k)
    assert sum(k.startswith("tumour__stat_") for k in feats) > 5  # MIRP intensity statistics
    assert any("cm_" in k for k in feats)  # MIRP GLCM texture


def test_feature_cache_is_reused_and_keyed_by_settings(tmp_path: Path) -> None:
    cases = [_case(tmp_path, f"c{i}", 7.0 + i, 1.0, i) for i in range(2)]
    m1, names1 = feature_matrix(cases, cache_dir=tmp_path / "cache", progress=False)
    files = sorted((tmp_path / "cache" / "radiomics").glob("*.json"))
    assert len(files) == 2
    m2, names2 = feature_matrix(cases, cache_dir=tmp_path / "cache", progress=False)
    assert names1 == names2 and np.allclose(m1, m2, equal_nan=True)
    feature_matrix(cases, RadiomicsConfig(n_bins=16), cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache" / "radiomics").glob("*.json"))) == 4


def test_baseline_learns_signal_per_task_and_skips_missing_labels() -> None:
    rng = np.random.default_rng(0)
    n = 160
    y_er = rng.integers(0, 2, n)
    ki67 = rng.uniform(5, 60, n)
    X = rng.normal(size=(n, 40))
    X[:, 0] += 1.5 * y_er
    X[:, 1] += (ki67 - 30) / 10
    X[rng.random(X.shape) < 0.02] = np.nan  # undefined features are imputed inside the pipeline
    labels = np.full((n, 4), np.nan)
    labels[:, 0] = y_er
    labels[:, 3] = ki67
    labels[:20, 3] = np.nan
    train, test = np.arange(120), np.arange(120, n)
    for kind in ("lr", "svm"):
        model = RadiomicsBaseline(kind, k_features=5, seed=0).fit(X[train], labels[train])
        assert set(model.models_) == {"er", "ki67"}  # PR/HER2 have no labels: not fitted
        probs, pred_ki67 = model.predict(X[test])
        assert probs.shape == (40, 3) and np.isnan(probs[:, 1:]).all()
        assert roc_auc_score(y_er[test], probs[:, 0]) > 0.8
        assert np.mean(np.abs(pred_ki67 - ki67[test])) < np.mean(np.abs(ki67[test] - ki67[train].mean()))


def test_preprocessing_is_fitted_inside_the_cross_validated_pipeline() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 10))
    labels = np.full((60, 4), np.nan)
    labels[:, 0] = rng.integers(0, 2, 60)
    model = RadiomicsBaseline("lr", k_features=3).fit(X, labels)
    steps = [name for name, _ in model.models_["er"].steps]
    assert steps == ["impute", "variance", "scale", "select", "model"]


def test_unknown_model_kind_is_a_user_error() -> None:
    from fedsubtype.errors import UserError

    with pytest.raises(UserError, match="use 'lr' or 'svm'"):
        RadiomicsBaseline("rf")
