"""`fedsubtype train` and `fedsubtype evaluate` end to end on a tiny phantom (real NIfTI files, real cache)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from fedsubtype.cli import main
from fedsubtype.data.manifest import read_manifest, write_manifest

TINY_MODEL = {"width": 8, "groups": 4, "feature_dim": 16, "hidden_dim": 16}
METRIC_KEYS = {"er", "pr", "her2", "ki67", "mean_auc", "subtype"}


N_CASES = 18  # a subset of the shared 30-case phantom keeps preprocessing short


@pytest.fixture(scope="module")
def manifest(phantom_cohort, tmp_path_factory) -> Path:
    """The first N_CASES cases of the session's phantom cohort, as a manifest in its own folder."""
    path = tmp_path_factory.mktemp("cohort") / "manifest.csv"
    write_manifest(read_manifest(phantom_cohort)[:N_CASES], path)
    return path


def _config(tmp: Path, **sections) -> Path:
    cfg = {"model": dict(TINY_MODEL), "training": {"batch_size": 4, "threads": 1, "progress": False},
           "evaluation": {"n_boot": 20}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(manifest, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    rc = main(["train", "--config", str(_config(tmp)), "--manifest", str(manifest),
               "--out", str(out), "--epochs", "2", "--size", "16", "--seed", "0", "--quiet",
               "--cache", str(tmp / "cache")])
    assert rc == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_every_output(run_dir: Path, manifest) -> None:
    for name in ("model.pt", "metrics.json", "predictions.csv", "metrics_per_epoch.csv", "config.yaml", "splits.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert METRIC_KEYS <= set(metrics) and metrics["evaluated_on"] == "test"
    for task in ("er", "pr", "her2"):
        assert {"auc", "auc_ci", "n"} <= set(metrics[task])
    assert {"mae", "mae_ci", "pearson_r", "n"} <= set(metrics["ki67"])
    assert METRIC_KEYS <= set(metrics["val"])
    assert "phantom" in metrics["note"]

    splits = _csv(run_dir / "splits.csv")
    cases = read_manifest(manifest)
    assert sorted(r["case_id"] for r in splits) == sorted(c.case_id for c in cases)
    test_ids = sorted(r["case_id"] for r in splits if r["split"] == "test")
    preds = _csv(run_dir / "predictions.csv")
    assert sorted(r["case_id"] for r in preds) == test_ids
    assert metrics["n_cases"] == len(test_ids) == metrics["er"]["n"] + sum(1 for r in preds if r["er_true"] == "")

    epochs = _csv(run_dir / "metrics_per_epoch.csv")
    assert [r["epoch"] for r in epochs] == ["1", "2"] and "val_mean_auc" in epochs[0]

    used = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert used["training"]["epochs"] == 2 and used["preprocess"]["size"] == 16
    assert used["model"]["width"] == 8 and Path(used["data"]["manifest"]).is_absolute()
    assert not (run_dir / "best_weights.pt").exists()


def test_model_file_carries_what_evaluate_needs(run_dir: Path) -> None:
    from fedsubtype.train.checkpoint import load_model

    _, bundle = load_model(run_dir / "model.pt")
    assert bundle.preprocess_config.size == 16 and bundle.model_config.width == 8
    meta = bundle.metadata
    assert set(meta["thresholds"]) == {"er", "pr", "her2"}
    assert meta["threshold_method"] == "youden" and meta["privacy"] is None
    assert meta["training_cohort"]["n_cases"] == sum(meta["training_cohort"]["sites"].values())
    assert "case_id" not in json.dumps(meta)


def test_refuses_to_overwrite(run_dir: Path, manifest, capsys) -> None:
    rc = main(["train", "--manifest", str(manifest), "--out", str(run_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--overwrite" in err and len(err.splitlines()) == 1


def test_evaluate_reproduces_the_test_predictions(run_dir: Path, manifest, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(run_dir / "model.pt"), "--manifest", str(manifest),
               "--out", str(out), "--n-boot", "20", "--quiet", "--cache", str(run_dir.parent / "cache")])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert METRIC_KEYS <= set(metrics) and metrics["evaluated_on"] == "all"
    everything = {r["case_id"]: r for r in _csv(out / "predictions.csv")}
    assert len(everything) == len(read_manifest(manifest))
    for row in _csv(run_dir / "predictions.csv"):
        again = everything[row["case_id"]]
        assert again["er_prob"] == row["er_prob"] and again["ki67_pred"] == row["ki67_pred"]
        assert again["er_call"] == row["er_call"]


def test_split_column_is_honoured(run_dir: Path, manifest, tmp_path: Path) -> None:
    cases = read_manifest(manifest)
    names = ["train"] * (len(cases) - 4) + ["val", "val", "test", "test"]
    from dataclasses import replace

    split_manifest = manifest.parent / "with_split.csv"
    write_manifest([replace(c, split=s) for c, s in zip(cases, names)], split_manifest)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(_config(tmp_path)), "--manifest", str(split_manifest), "--out", str(out),
               "--max-steps", "1", "--size", "16", "--quiet", "--n-boot", "0", "--cache", str(run_dir.parent / "cache")])
    assert rc == 0
    got = {r["case_id"]: r["split"] for r in _csv(out / "splits.csv")}
    assert got == {c.case_id: s for c, s in zip(cases, names)}
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(out / "model.pt"), "--manifest", str(split_manifest), "--out", str(ev),
                 "--split", "test", "--n-boot", "0", "--quiet", "--cache", str(run_dir.parent / "cache")]) == 0
    assert len(_csv(ev / "predictions.csv")) == 2


@pytest.mark.parametrize("argv,needle", [
    (["train", "--out", "{tmp}/o"], "no manifest"),
    (["train", "--manifest", "{tmp}/missing.csv", "--out", "{tmp}/o"], "manifest not found"),
    (["train", "--manifest", "{manifest}", "--out", "{tmp}/o", "--size", "20"], "multiple of 8"),
    (["train", "--manifest", "{manifest}", "--out", "{tmp}/o", "--epochs", "0"], "training.epochs"),
    (["train", "--manifest", "{manifest}", "--out", "{tmp}/o", "--variant", "huge"], "unknown variant"),
    (["train", "--config", "{tmp}/bad.yaml", "--manifest", "{manifest}", "--out", "{tmp}/o"], "unknown key 'epoch'"),
    (["evaluate", "--model", "{tmp}/bad.yaml", "--manifest", "{manifest}", "--out", "{tmp}/o"], "not a fedsubtype model"),
    (["evaluate", "--model", "{tmp}/none.pt", "--manifest", "{manifest}", "--out", "{tmp}/o"], "model file not found"),
])
def test_bad_inputs_are_one_line_errors(argv, needle, manifest, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("training:\n  epoch: 3\n", encoding="utf-8")
    argv = [a.format(tmp=tmp_path, manifest=manifest) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "model.pt").exists()


def test_strict_stops_on_a_broken_case_and_default_skips_it(run_dir: Path, manifest, tmp_path: Path,
                                                            capsys) -> None:
    from dataclasses import replace

    cases = read_manifest(manifest)
    broken = replace(cases[0], case_id="broken", image=tmp_path / "does_not_exist.nii.gz")
    broken_manifest = manifest.parent / "with_broken.csv"
    write_manifest([broken, *cases], broken_manifest)
    common = ["--config", str(_config(tmp_path)), "--manifest", str(broken_manifest), "--size", "16", "--quiet",
              "--n-boot", "0", "--max-steps", "1", "--cache", str(run_dir.parent / "cache")]
    assert main(["train", *common, "--out", str(tmp_path / "strict"), "--strict"]) == 1
    assert "--strict" in capsys.readouterr().err
    assert main(["train", *common, "--out", str(tmp_path / "lenient")]) == 0
    err = capsys.readouterr().err
    assert "broken" in err and "skipping 1 unusable case" in err
    assert "broken" not in (tmp_path / "lenient" / "splits.csv").read_text(encoding="utf-8")


def test_documented_config_lists_every_key_with_its_default() -> None:
    import dataclasses

    from fedsubtype.configio import to_dict
    from fedsubtype.train.run_config import RunConfig, load_run_config

    path = Path(__file__).parents[1] / "configs" / "train_default.yaml"
    documented = to_dict(load_run_config(path))
    defaults = to_dict(RunConfig())
    assert documented.pop("data").pop("manifest") and defaults["data"].pop("manifest") is None
    documented_data = yaml.safe_load(path.read_text(encoding="utf-8"))["data"]
    assert set(documented_data) == {f.name for f in dataclasses.fields(RunConfig().data)}
    for section in ("preprocess", "model", "training", "evaluation"):
        assert set(yaml.safe_load(path.read_text(encoding="utf-8"))[section]) == set(defaults[section]), section
    defaults.pop("data")
    assert documented == defaults


def test_config_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    from fedsubtype.train.run_config import load_run_config

    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("data:\n  manifest: ../data/m.csv\n  cache: cache\nout: ../runs/a\n", encoding="utf-8")
    cfg = load_run_config(path)
    assert cfg.data.manifest == tmp_path / "cfg" / "../data/m.csv"
    assert cfg.data.cache == tmp_path / "cfg" / "cache" and cfg.out == tmp_path / "cfg" / "../runs/a"
    assert cfg.data.cache_dir() == cfg.data.cache
