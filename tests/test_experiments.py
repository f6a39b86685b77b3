"""What the paper benchmark and the simulation study share: finished-run markers, the settings guard, mean ± sd, ROC."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsubtype.errors import UserError
from fedsubtype.evaluate.experiments import (flat_settings, mark_finished, mean_sd, pyplot, read_finished,
                                             refuse_other_settings, roc_points, save_png)


def test_a_run_is_finished_once_its_marker_is_written_and_matches(tmp_path: Path) -> None:
    marker = tmp_path / "result.json"
    assert read_finished(marker) is None
    marker.write_text('{"config_hash": "ab', encoding="utf-8")  # half-written
    assert read_finished(marker) is None
    mark_finished(marker, {"config_hash": "abc", "value": np.float64(0.5)}, indent=1, default=float)
    assert read_finished(marker) == {"config_hash": "abc", "value": 0.5}
    assert read_finished(marker, {"config_hash": "abc"}) is not None
    assert read_finished(marker, {"config_hash": "other"}) is None


def test_settings_guard_refuses_other_results_and_fills_legacy_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    old = {"model": {"variant": "full"}, "training": {"lr": 0.001, "device": "cpu"}, "seeds": [0]}
    path.write_text(yaml.safe_dump(old), encoding="utf-8")
    keys, ignore = ("model", "training"), {"training": ("device",)}
    assert flat_settings(old, keys, ignore) == {"model.variant": "full", "training.lr": 0.001}
    same = {"model": {"variant": "full"}, "training": {"lr": 0.001, "device": "cuda"}, "seeds": [1, 2]}
    refuse_other_settings(path, same, keys, ignore=ignore)  # machine settings and seeds may change
    with pytest.raises(UserError, match=r"other settings \(training.lr\)"):
        refuse_other_settings(path, {**same, "training": {"lr": 0.01}}, keys, ignore=ignore)
    newer = {**same, "training": {"lr": 0.001, "ema_decay": 0.99}}
    refuse_other_settings(path, {**same, "training": {"lr": 0.001, "ema_decay": None}}, keys,
                          legacy={"training.ema_decay": None})
    with pytest.raises(UserError, match="training.ema_decay"):
        refuse_other_settings(path, newer, keys, legacy={"training.ema_decay": None})


def test_mean_sd_over_finite_values() -> None:
    assert mean_sd([0.6, None, float("nan"), 0.8]) == pytest.approx((0.7, math.sqrt(0.02), 2))
    assert mean_sd([0.5]) == (0.5, 0.0, 1)
    m, s, n = mean_sd([None])
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_roc_points_leave_out_missing_cases_and_need_both_classes(tmp_path: Path) -> None:
    fpr, tpr = roc_points(np.array([0, 1, np.nan, 1, 0]), np.array([0.1, 0.9, 0.5, np.nan, 0.2]))
    assert fpr[-1] == 1 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert roc_points(np.array([1.0, 1.0, np.nan]), np.array([0.2, 0.3, 0.4])) is None
    fig, ax = pyplot().subplots()
    ax.plot(fpr, tpr)
    save_png(fig, tmp_path / "roc.png", tight=True)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
