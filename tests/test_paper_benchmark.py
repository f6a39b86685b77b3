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
    assert main([*args, "--read-out", "statistics", "--epochs", "2", "--lr", "0.002"]) == 1
    err = capsys.readouterr().err.strip()
    assert "model.read_out" in err and "training.epochs" in err and "training.lr" in err and "--out" in err and len(err.splitlines()) == 1
    assert done.stat().st_mtime_ns == stamp
    sized = tmp_path / "sized"
    assert main([*args[:4], "--out", str(sized), *args[6:], "--rows", "full", "--patience", "none",
                 "--epochs", "2", "--ema-decay", "0.9", "--augment-strength", "0.5", "--refit",
                 "--region-statistics", "--statistics-heads", "--peritumoral-profile"]) == 0  # the earlier switches
    stored = yaml.safe_load((sized / "config.yaml").read_text(encoding="utf-8"))
    assert stored["settings_version"] == 2 and stored["training"]["patience"] is None
    assert stored["model"]["read_out"] == "linear_heads_profile" and "statistics_heads" not in stored["model"]
    assert stored["training"]["ema_decay"] == 0.9 and stored["training"]["augment_strength"] == 0.5 and stored["refit"] is True
    run = sized / "runs" / "full" / "seed0"
    assert (run / "done.json").is_file()
    selection = list(csv.DictReader(open(run / "metrics_per_epoch.csv", encoding="utf-8")))
    # the epoch validation chose; a validation split under MIN_SELECTION_CASES keeps the last
    chosen = next((int(r["epoch"]) for r in reversed(selection) if r["best"] == "True"), len(selection))
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


def _folder(tmp_path: Path, stored: dict) -> Path:
    """A benchmark folder whose config.yaml holds `stored` (as an older fedsubtype wrote it)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored), encoding="utf-8")
    return tmp_path


def test_a_folder_from_before_tumour_range_is_not_resumed_with_it(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.data.preprocess import PreprocessConfig

    old = to_dict(PreprocessConfig(size=32))
    del old["keep_tumour_range"]  # written by the code before the setting existed (it clipped the tumour)
    folder = _folder(tmp_path, {"preprocess": old})
    with pytest.raises(UserError, match="preprocess.keep_tumour_range"):
        check_same_settings(folder, {"preprocess": to_dict(PreprocessConfig(size=32))})
    check_same_settings(folder, {"preprocess": to_dict(PreprocessConfig(size=32, keep_tumour_range=False))})


def test_a_folder_from_before_weight_averaging_and_refit_is_not_resumed_with_them(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.train.config import TrainConfig

    then = TrainConfig(epochs=12, ema_decay=None)  # the settings of that time, at their values then
    old = to_dict(then)
    del old["ema_decay"]  # written before either setting existed
    folder = _folder(tmp_path, {"training": old})
    with pytest.raises(UserError, match="refit"):
        check_same_settings(folder, {"training": to_dict(then), "refit": True})
    with pytest.raises(UserError, match="training.ema_decay"):
        check_same_settings(folder, {"training": to_dict(TrainConfig(epochs=12, ema_decay=0.99))})
    check_same_settings(folder, {"training": to_dict(then), "refit": False})


OLD_MODEL = {"variant": "full", "in_channels": 1, "width": 16, "blocks": [1, 1, 1], "groups": 8, "feature_dim": 64,
             "hidden_dim": 64, "dropout": 0.2, "region_channels": True, "mask_input": True, "physical_size": False,
             "stem": "strided", "pooling": "mean", "region_mixing": "softmax_sum", "task_branches": False,
             "region_statistics": True, "statistics_heads": True, "peritumoral_profile": True}
"""The model section of the best configuration's folders before settings version 2."""


def test_an_older_folder_is_resumed_in_todays_options(tmp_path: Path) -> None:
    from fedsubtype.benchmarks.paper import check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.model import ModelConfig

    folder = _folder(tmp_path, {"model": OLD_MODEL})  # no settings_version: version 1
    check_same_settings(folder, {"model": to_dict(ModelConfig(read_out="linear_heads_profile"))})
    with pytest.raises(UserError, match="model.read_out"):
        check_same_settings(folder, {"model": to_dict(ModelConfig(read_out="linear_heads"))})
    older = {k: v for k, v in OLD_MODEL.items() if k not in ("pooling", "stem", "region_statistics",
                                                             "statistics_heads", "peritumoral_profile")}
    check_same_settings(_folder(tmp_path, {"model": older}), {"model": to_dict(ModelConfig(read_out="none"))})  # keys added later


@pytest.mark.parametrize("removed", [{"pooling": "mean_std"}, {"physical_size": True}, {"task_branches": True}])
def test_a_folder_made_with_a_removed_option_is_refused_in_one_line(tmp_path: Path, removed: dict) -> None:
    from fedsubtype.benchmarks.paper import check_same_settings
    from fedsubtype.configio import to_dict
    from fedsubtype.model import ModelConfig

    folder = _folder(tmp_path, {"model": {**OLD_MODEL, **removed}})
    with pytest.raises(UserError, match=f"{next(iter(removed))} = .*removed in settings version 2") as err:
        check_same_settings(folder, {"model": to_dict(ModelConfig(read_out="linear_heads_profile"))})
    assert "\n" not in err.value.line() and str(folder) in err.value.line()
    newer = _folder(tmp_path, {"settings_version": 3, "model": to_dict(ModelConfig())})
    with pytest.raises(UserError, match="settings version 3"):
        check_same_settings(newer, {"model": to_dict(ModelConfig())})


def _settings(*argv: str):
    """The networks' settings `benchmark paper` would use with these flags (nothing run)."""
    from fedsubtype.cli import build_parser
    from fedsubtype.cli.benchmark_cmd import run_settings

    return run_settings(build_parser().parse_args(["benchmark", "paper", *argv]))


BEST = Path(__file__).resolve().parents[1] / "configs" / "best.yaml"


def test_best_config_is_the_headline_command_line() -> None:
    from fedsubtype.train.run_config import load_run_config

    flags = _settings("--size", "64", "--patience", "none", "--ema-decay", "0.995", "--augment-strength", "0.5",
                      "--region-statistics", "--statistics-heads", "--peritumoral-profile")
    from_file = _settings("--config", str(BEST))
    assert from_file == flags
    assert from_file.model.read_out == "linear_heads_profile" and from_file.preprocess.size == 64
    assert from_file.training.epochs == 12 and from_file.training.patience is None and not from_file.training.progress
    trained = load_run_config(BEST)  # what `fedsubtype train --config configs/best.yaml` trains
    assert (trained.model, trained.preprocess) == (from_file.model, from_file.preprocess)
    assert {k: v for k, v in vars(trained.training).items() if k != "progress"} == \
        {k: v for k, v in vars(from_file.training).items() if k != "progress"}


def test_flags_override_the_config_and_default_without_it() -> None:
    plain = _settings()
    assert (plain.preprocess.size, plain.training.epochs, plain.training.patience) == (32, 12, 4)
    assert plain.model.read_out == "none" and plain.training.ema_decay is None
    over = _settings("--config", str(BEST), "--size", "32", "--read-out", "statistics", "--patience", "3")
    assert (over.preprocess.size, over.model.read_out, over.training.patience) == (32, "statistics", 3)
    assert over.training.ema_decay == 0.995  # not overridden: the file's value
    assert _settings("--region-statistics").model.read_out == "statistics"
    assert _settings("--region-statistics", "--statistics-heads").model.read_out == "linear_heads"
    assert _settings("--no-statistics-heads").model.read_out == "none"


def test_read_out_flags_are_checked_in_one_line(capsys) -> None:
    with pytest.raises(UserError, match="--statistics-heads.*does not offer.*linear_heads_profile"):
        _settings("--statistics-heads")  # the read-outs without the statistics are no longer offered
    with pytest.raises(UserError, match="--read-out alone"):
        _settings("--read-out", "statistics", "--region-statistics")
    with pytest.raises(SystemExit):
        _settings("--read-out", "wide")  # argparse's choices: the config module's READ_OUTS
    assert "linear_heads_profile" in capsys.readouterr().err
    for removed in ("--pooling", "--stem", "--physical-size", "--task-branches", "--region-mixing"):
        with pytest.raises(SystemExit):
            _settings(removed, "x")
