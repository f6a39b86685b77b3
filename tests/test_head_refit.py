"""Refitting a trained network's task heads as per-task logistic regressions on its frozen features, and
splitting a wide-and-deep network's logits into its statistics read-out and its deep path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedsubtype.cli import main


@pytest.fixture(scope="module")
def trained_folder(phantom_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refit") / "paper"
    assert main(["benchmark", "paper", "--manifest", str(phantom_cohort), "--out", str(out), "--cache",
                 str(out.parent / "cache"), "--seeds", "0", "--rows", "full", "--size", "16", "--epochs", "1",
                 "--n-boot", "10", "--read-out", "linear_heads"]) == 0
    return out


def test_refit_reports_the_trained_auc_and_a_refitted_one(trained_folder: Path, capsys) -> None:
    from research.head_refit import main as refit_main

    assert refit_main([str(trained_folder)]) == 0
    assert "refitted heads" in capsys.readouterr().out
    table = pd.read_csv(trained_folder / "head_refit_full.csv")
    assert list(table.seed) == [0]
    metrics = json.loads((trained_folder / "table.json").read_text(encoding="utf-8"))["rows"]["full"]
    for task in ("er", "pr", "her2"):  # the "trained" column re-scores the row's own test predictions
        assert table[f"{task}_trained"][0] == pytest.approx(metrics[task][0], abs=1e-9)  # NaN fails here
        assert 0.0 <= table[f"{task}_refit"][0] <= 1.0
    refits = [table[f"{task}_refit"][0] for task in ("er", "pr", "her2")]
    assert table.avg_refit[0] == pytest.approx(np.mean(refits))


def test_frozen_features_are_the_representation_and_the_region_statistics(trained_folder: Path) -> None:
    import torch

    from research.head_refit import frozen_features
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.configio import from_dict
    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.model.region_stats import STATS_PER_REGION
    from fedsubtype.data.preprocess import PreprocessConfig

    cfg = yaml.safe_load((trained_folder / "config.yaml").read_text(encoding="utf-8"))
    model = build_model(from_dict(ModelConfig, cfg["model"]))
    state = torch.load(trained_folder / "runs" / "full" / "seed0" / "best_weights.pt", weights_only=True)
    model.load_state_dict(state["state_dict"])
    cases = read_manifest(cfg["manifest"])[:4]
    feats = frozen_features(model, cases, PreprocessCache(Path(cfg["cache_dir"]), from_dict(PreprocessConfig, cfg["preprocess"])))
    assert feats.shape == (4, model.cfg.hidden_dim + 3 * STATS_PER_REGION) and np.isfinite(feats).all()


def test_a_folder_without_trained_networks_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from research.head_refit import main as refit_main

    (tmp_path / "config.yaml").write_text("model: {}\n", encoding="utf-8")
    assert refit_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no finished runs/full" in err and len(err.splitlines()) == 1
    assert refit_main([str(tmp_path / "nowhere")]) == 1
    assert "no config.yaml" in capsys.readouterr().err


def test_read_out_share_splits_each_logit_into_read_out_and_deep_path(trained_folder: Path, capsys) -> None:
    from research.head_refit import trained_runs
    from research.read_out_share import logit_parts
    from research.read_out_share import main as share_main

    run = next(trained_runs(trained_folder))
    parts = logit_parts(run)
    trained = pd.read_csv(run.folder / "test.csv")
    assert list(trained.case_id) == [c.case_id for c in run.splits["test"]]  # the benchmark's own test split
    for j, task in enumerate(("er", "pr", "her2")):
        p = parts[task]
        np.testing.assert_allclose(p["read_out"] + p["deep"], p["total"], atol=1e-6)
        # the whole logit is what the benchmark scored for that case
        np.testing.assert_allclose(1 / (1 + np.exp(-p["total"])), trained[f"{task}_prob"], atol=1e-5)
    assert share_main([str(trained_folder)]) == 0
    table = pd.read_csv(trained_folder / "read_out_share_full.csv")
    assert list(table.task) == ["er", "pr", "her2"] and (table.sd_read_out >= 0).all()
    capsys.readouterr()
    plain = trained_folder.parent / "plain"
    manifest = yaml.safe_load((trained_folder / "config.yaml").read_text(encoding="utf-8"))["manifest"]
    assert main(["benchmark", "paper", "--manifest", str(manifest), "--out", str(plain), "--cache",
                 str(trained_folder.parent / "cache"), "--seeds", "0", "--rows", "full", "--size", "16",
                 "--epochs", "1", "--n-boot", "10"]) == 0
    capsys.readouterr()
    assert share_main([str(plain)]) == 1  # a network without read-outs: one line naming the fix
    err = capsys.readouterr().err.strip()
    assert "--read-out linear_heads" in err and len(err.splitlines()) == 1
