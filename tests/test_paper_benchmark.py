"""`fedsubtype benchmark paper` end to end on a tiny phantom: rows, oracle, DeLong, resumability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from fedsubtype.cli import main
from fedsubtype.errors import UserError

pytest.importorskip("mirp", reason="radiomics extra not installed: pip install 'fedsubtype[radiomics]'")


def test_paper_table_on_a_tiny_phantom_and_resume(phantom_cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "paper"
    args = ["benchmark", "paper", "--manifest", str(phantom_cohort), "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--seeds", "0", "--rows", "full,core_only,radiomics_lr", "--size", "16", "--epochs", "1", "--n-boot", "20"]
    assert main(args) == 0
    table = json.loads((out / "table.json").read_text(encoding="utf-8"))
    assert set(table["rows"]) == {"full", "core_only", "radiomics_lr", "oracle"}
    full = table["rows"]["full"]
    assert 0.0 <= full["avg"][0] <= 1.0 and full["ki67_mae"][0] >= 0
    assert 0.5 < table["rows"]["oracle"]["avg"][0] <= 1.0  # the latents carry real, partial evidence
    md = (out / "table.md").read_text(encoding="utf-8")
    assert "| Method | ER | PR | HER2 | Avg |" in md and "engineering evidence" in md and "External site" in md
    delong = list(csv.DictReader(open(out / "delong.csv", encoding="utf-8")))
    assert {r["row"] for r in delong} <= {"core_only", "radiomics_lr"} and all(0 <= float(r["p"]) <= 1 for r in delong if r["p"])
    assert all((out / f"roc_{t}.png").is_file() for t in ("er", "pr", "her2"))
    done = out / "runs" / "full" / "seed0" / "done.json"
    stamp = done.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # resumed: finished runs are read back, not retrained
    assert done.stat().st_mtime_ns == stamp
    assert json.loads((out / "table.json").read_text(encoding="utf-8"))["rows"]["full"]["avg"] == full["avg"]

    capsys.readouterr()  # other settings would mix two tables in one folder: refused before any training
    assert main([*args, "--physical-size", "--epochs", "2", "--lr", "0.002"]) == 1
    err = capsys.readouterr().err.strip()
    assert "model.physical_size" in err and "training.epochs" in err and "training.lr" in err and "--out" in err and len(err.splitlines()) == 1
    assert done.stat().st_mtime_ns == stamp
    sized = tmp_path / "sized"
    assert main([*args[:4], "--out", str(sized), *args[6:], "--rows", "full", "--physical-size", "--patience", "none",
                 "--epochs", "2", "--ema-decay", "0.9", "--augment-strength", "0.5", "--refit", "--pooling", "mean_std", "--task-branches",
                 "--region-statistics", "--statistics-heads", "--peritumoral-profile"]) == 0
    stored = yaml.safe_load((sized / "config.yaml").read_text(encoding="utf-8"))
    assert stored["model"]["physical_size"] is True and stored["training"]["patience"] is None
    assert stored["model"]["pooling"] == "mean_std" and stored["model"]["task_branches"] is True
    assert stored["model"]["region_statistics"] is True and stored["model"]["statistics_heads"] is True
    assert stored["model"]["peritumoral_profile"] is True
    assert stored["training"]["ema_decay"] == 0.9 and stored["training"]["augment_strength"] == 0.5 and stored["refit"] is True
    run = sized / "runs" / "full" / "seed0"
    assert (run / "done.json").is_file()
    selection = list(csv.DictReader(open(run / "metrics_per_epoch.csv", encoding="utf-8")))
    chosen = [int(r["epoch"]) for r in selection if r["best"] == "True"][-1]
    refit = list(csv.DictReader(open(run / "refit" / "metrics_per_epoch.csv", encoding="utf-8")))
    assert len(selection) == 2 and len(refit) == chosen  # retrained for the epochs validation chose
    assert int(refit[0]["samples_seen"]) > int(selection[0]["samples_seen"])  # on train + validation


def test_statistics_row_reads_the_networks_own_region_statistics(phantom_cohort: Path, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from fedsubtype.benchmarks.paper import statistics_features
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.model.region_stats import PROFILE_STATS, STATS_PER_REGION, peritumoral_profile, region_statistics
    from fedsubtype.model.regions_pool import region_masks
    from fedsubtype.data.preprocess import PreprocessConfig

    out = tmp_path / "stats"
    assert main(["benchmark", "paper", "--manifest", str(phantom_cohort), "--out", str(out), "--cache",
                 str(tmp_path / "cache"), "--seeds", "0", "--rows", "statistics_lr", "--size", "16", "--n-boot", "20"]) == 0
    table = json.loads((out / "table.json").read_text(encoding="utf-8"))
    row = table["rows"]["statistics_lr"]
    assert row["name"] == "region intensity statistics (LR)" and 0.0 <= row["avg"][0] <= 1.0
    test = list(csv.DictReader(open(out / "runs" / "statistics_lr" / "seed0" / "test.csv", encoding="utf-8")))
    assert test and all(0.0 <= float(r["er_prob"]) <= 1.0 for r in test)
    # the features are exactly what a network with model.region_statistics computes from its input
    cases = read_manifest(phantom_cohort)[:3]
    cache = PreprocessCache(tmp_path / "cache", PreprocessConfig(size=16))
    feats = statistics_features(cases, cache)
    pc = cache.get(cases[0])
    masks = region_masks(torch.from_numpy(pc.regions.astype(np.int64))[None], ("core", "rim", "peritumoral"))
    direct = region_statistics(torch.from_numpy(pc.image)[None, None], masks)[0].numpy()
    assert feats[cases[0].case_id].shape == (3 * STATS_PER_REGION,)
    np.testing.assert_allclose(feats[cases[0].case_id], direct, rtol=1e-6)
    # with the profile (--peritumoral-profile): the same 21, then the peritumoral profile's 7
    profiled = statistics_features(cases, cache, profile=True)[cases[0].case_id]
    assert profiled.shape == (3 * STATS_PER_REGION + PROFILE_STATS,)
    np.testing.assert_allclose(profiled[:3 * STATS_PER_REGION], direct, rtol=1e-6)
    names = ("core", "rim", "peritumoral")
    profile = peritumoral_profile(torch.from_numpy(pc.image)[None, None], masks, names)[0].numpy()
    np.testing.assert_allclose(profiled[3 * STATS_PER_REGION:], profile, rtol=1e-6, atol=1e-7)


def test_unknown_row_is_a_one_line_error(phantom_cohort: Path, tmp_path: Path, capsys) -> None:
    code = main(["benchmark", "paper", "--manifest", str(phantom_cohort), "--out", str(tmp_path / "p"),
                 "--rows", "full,transformer"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "unknown row 'transformer'" in err and len(err.splitlines()) == 1


def test_impossible_learning_rate_is_a_one_line_error(phantom_cohort: Path, tmp_path: Path, capsys) -> None:
    code = main(["benchmark", "paper", "--manifest", str(phantom_cohort), "--out", str(tmp_path / "p"), "--lr", "-1"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "lr" in err and "positive" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_a_folder_from_before_tumour_range_is_not_resumed_with_it(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import _check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.data.preprocess import PreprocessConfig

    old = to_dict(PreprocessConfig(size=32))
    del old["keep_tumour_range"]  # written by the code before the setting existed (it clipped the tumour)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"preprocess": old}), encoding="utf-8")
    with pytest.raises(UserError, match="preprocess.keep_tumour_range"):
        _check_same_settings(tmp_path / "config.yaml", {"preprocess": to_dict(PreprocessConfig(size=32))})
    _check_same_settings(tmp_path / "config.yaml", {"preprocess": to_dict(PreprocessConfig(size=32, keep_tumour_range=False))})


def test_a_folder_from_before_weight_averaging_and_refit_is_not_resumed_with_them(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import _check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.train.loop import TrainConfig

    old = to_dict(TrainConfig(epochs=12))
    del old["ema_decay"]  # written before either setting existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"training": old}), encoding="utf-8")
    with pytest.raises(UserError, match="refit"):
        _check_same_settings(tmp_path / "config.yaml", {"training": to_dict(TrainConfig(epochs=12)), "refit": True})
    with pytest.raises(UserError, match="training.ema_decay"):
        _check_same_settings(tmp_path / "config.yaml", {"training": to_dict(TrainConfig(epochs=12, ema_decay=0.99))})
    _check_same_settings(tmp_path / "config.yaml", {"training": to_dict(TrainConfig(epochs=12)), "refit": False})


def test_a_folder_from_before_std_pooling_reads_as_mean_pooling(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import _check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.model import ModelConfig

    old = to_dict(ModelConfig())
    del old["pooling"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": old}), encoding="utf-8")
    _check_same_settings(tmp_path / "config.yaml", {"model": to_dict(ModelConfig(pooling="mean"))})
    with pytest.raises(UserError, match="model.pooling"):
        _check_same_settings(tmp_path / "config.yaml", {"model": to_dict(ModelConfig(pooling="mean_std"))})
