"""The simulation harness end to end: a tiny phantom, two sites, two rounds through Flower's real simulation
engine (Ray), pooled and local baselines, the report, resumability, and one-line errors for bad scenarios."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsubtype.errors import ConfigError
from simulation.scenario import load_scenario

from simutil import TINY_MODEL, write_scenario as _scenario


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_two_sites_two_rounds_end_to_end_then_resume(tmp_path: Path, tiny_phantom: Path) -> None:
    from simulation.runner import run_study

    scen = load_scenario(_scenario(tmp_path, tiny_phantom))
    lines: list[str] = []
    first = run_study(scen, say=lines.append)
    root = tmp_path / "out"
    assert first.ran == 5 and first.skipped == 0  # pooled, local, fedavg + pooled without each of the 2 sites

    # the federated run went through the real apps: both virtual sites answered in both rounds
    fed = next(r for r in first.records if r["method"] == "fedavg")
    rounds = json.loads((Path(fed_dir := next((root / "runs").rglob("server"))) / "rounds.json").read_text(encoding="utf-8"))
    train_rounds = [r for r in rounds if r["phase"] == "train"]
    assert [r["round"] for r in train_rounds] == [1, 2]
    sites = sorted({a["site"] for r in train_rounds for a in r["answered"]})
    assert sites == sorted({r["site"] for r in _rows(root / "partition.csv")})
    assert len(fed["history"]["global"]) == 2 and (fed_dir / "model.pt").is_file()

    # equal budget: every method saw the same number of training samples (2 epochs of the training cases)
    partition = _rows(root / "partition.csv")
    n_train = sum(1 for r in partition if r["split"] == "train")
    pooled = next(r for r in first.records if r["method"] == "pooled" and r["holdout"] == "none")
    local = next(r for r in first.records if r["method"] == "local")
    assert pooled["samples_seen"]["global"] == 2 * n_train
    assert sum(local["samples_seen"].values()) == 2 * n_train
    assert fed["samples_seen"]["global"] == 2 * n_train

    # results.csv: every method scored on every site's test split and on the pooled test split
    results = _rows(root / "results.csv")
    assert {r["method"] for r in results} == {"pooled", "local", "fedavg"}
    for method in ("pooled", "fedavg"):
        tested = {r["test_site"] for r in results if r["method"] == method}
        assert tested == set(sites) | {"pooled"}
    assert all(r["config_hash"] == scen.config_hash() for r in results)
    report = (root / "report.md").read_text(encoding="utf-8")
    assert "engineering evidence, not clinical claims" in report
    for png in ("labels_per_site.png", "per_site_auc.png", "roc.png", "ki67_scatter.png", "convergence.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"
    assert any("run 5/5" in line for line in lines)

    # leave-one-site-out: each held-out model trained on the other site only, and scored on the held-out one
    for held in sites:
        rec = next(r for r in first.records if r["holdout"] == held)
        assert rec["train_sites"] == [s for s in sites if s != held]
        assert held in rec["evaluations"][0]["metrics"]
    assert "## Leave-one-site-out" in report and (root / "loso_drop.png").is_file()

    # resumable: a second run skips every finished run and reproduces the same table
    second = run_study(scen, say=lambda _: None)
    assert second.ran == 0 and second.skipped == 5
    assert _rows(root / "results.csv") == results


@pytest.mark.parametrize("change, needle", [
    ({"methods": [{"name": "fedsgd"}]}, "unknown method 'fedsgd'"),
    ({"partition": {"kind": "dirichlet", "sites": 2, "alpha": 0}}, "alpha must be > 0"),
    ({"partition": {"kind": "voronoi"}}, "unknown partitioner 'voronoi'"),
    ({"sweep": {"param": "partition.alpha", "values": [1, -0.5]}}, "alpha must be > 0"),
    ({"federation": {"budget_epochs": 5, "local_epochs": 2}}, "not a multiple of local_epochs"),
    ({"seedz": [1]}, "unknown key 'seedz'"),
    ({"training": {"ema_decay": 0.99}}, "keep no weight average"),
])
def test_bad_scenarios_are_one_line_errors(tmp_path: Path, change: dict, needle: str) -> None:
    path = _scenario(tmp_path, tmp_path / "nowhere", **change)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert needle in err.value.line() and "\n" not in err.value.line()


def test_cli_reports_bad_input_on_one_line_and_exits_1(tmp_path: Path) -> None:
    path = _scenario(tmp_path, tmp_path / "nowhere", methods=[{"name": "fedsgd"}])
    proc = subprocess.run([sys.executable, "-m", "fedsubtype.cli.sim_cli", "--scenario", str(path)],
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "unknown method 'fedsgd'" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "fedsubtype.cli.sim_cli", "--scenario", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert missing.returncode == 1 and "file not found" in missing.stderr


def test_shipped_scenarios_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "simulation" / "scenarios"
    for name in ("quick", "paper", "heterogeneity", "privacy"):
        scen = load_scenario(root / f"{name}.yaml")
        assert scen.name == name and scen.settings()


def test_a_library_default_is_part_of_the_run_identity(tmp_path: Path) -> None:
    """Runs are reused by config hash; an unstated default must count, or a changed default reuses stale runs."""
    phantom = tmp_path / "ph"
    hashes = {}
    for label, prep in (("unstated", {"size": 16}), ("stated", {"size": 16, "keep_tumour_range": True}),
                        ("other", {"size": 16, "keep_tumour_range": False})):
        (tmp_path / label).mkdir()
        hashes[label] = load_scenario(_scenario(tmp_path / label, phantom, preprocess=prep)).config_hash()
    assert hashes["unstated"] == hashes["stated"] != hashes["other"]


def test_a_key_added_later_at_its_legacy_value_keeps_the_run_identity(tmp_path: Path, monkeypatch) -> None:
    """A model key added with the value that reproduces the network before it must not invalidate finished runs;
    set otherwise, it must."""
    from fedsubtype import migrate

    phantom = tmp_path / "ph"
    hashes = {}
    plain = {**TINY_MODEL, "read_out": "none"}  # the network before the read-outs existed
    for label, model in (("before", plain), ("on", {**TINY_MODEL, "read_out": "statistics"})):
        (tmp_path / label).mkdir()
        hashes[label] = load_scenario(_scenario(tmp_path / label, phantom, model=model)).config_hash()
    assert hashes["before"] != hashes["on"]
    added = {k: v for k, v in migrate.MODEL_V1_ADDED.items() if k != "region_statistics"}
    monkeypatch.setattr(migrate, "MODEL_V1_ADDED", added)  # as if the key were part of the original network
    (tmp_path / "counted").mkdir()
    assert load_scenario(_scenario(tmp_path / "counted", phantom, model=plain)).config_hash() != hashes["before"]


def test_the_run_identity_of_the_pruned_model_is_the_one_hashed_before_it() -> None:
    """Runs finished before `read_out` replaced the switches (and five options went) keep their identity."""
    from fedsubtype.configio import to_dict
    from fedsubtype.migrate import run_identity
    from fedsubtype.model import ModelConfig

    small = dict(width=8, groups=4, feature_dim=32, hidden_dim=32)
    before = {"variant": "full", "in_channels": 1, "width": 8, "blocks": [1, 1, 1], "groups": 4, "feature_dim": 32,
              "hidden_dim": 32, "dropout": 0.2, "region_channels": True, "mask_input": True, "physical_size": False}
    assert run_identity("model", to_dict(ModelConfig(**small, read_out="none"))) == before  # what quick hashed
    best = run_identity("model", to_dict(ModelConfig(**small, read_out="linear_heads_profile")))
    assert best == {**before, "region_statistics": True, "statistics_heads": True, "peritumoral_profile": True}
    assert run_identity("preprocess", {"size": 32, "keep_tumour_range": False}) == {"size": 32}


def _sweep_record(setting: str, seed: int, auc: float, eps: float | None) -> dict:
    metrics = {"pooled": {"mean_auc": auc, "er": {"auc": auc}, "pr": {"auc": auc}, "her2": {"auc": auc},
                          "ki67": {"mae": 10.0 + seed}}}
    history = [{"round": 1, "epoch_equiv": 1, **({"epsilon": eps} if eps is not None else {})}]
    return {"setting": setting, "method": "fedavg", "family": "fedavg", "holdout": "none", "seed": seed,
            "history": {"global": history}, "evaluations": [{"model": "global", "metrics": metrics}]}


def test_a_sweep_gets_a_table_of_spent_epsilon_and_a_plot(tmp_path: Path) -> None:
    from simulation.report import plot_sweep, sweep_table

    records = [_sweep_record("eps=inf", s, 0.80 + 0.01 * s, None) for s in (0, 1)]
    records += [_sweep_record("eps=3", s, 0.70 + 0.01 * s, 2.9 + 0.1 * s) for s in (0, 1)]
    table = sweep_table(records).splitlines()
    assert table[2].startswith("| eps=inf | fedavg | 2 | — (no DP) | 0.805 ± 0.007 |")
    assert table[3].startswith("| eps=3 | fedavg | 2 | 2.95 ± 0.07 | 0.705 ± 0.007 |")
    assert plot_sweep(records, tmp_path / "sweep.png") and (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_sweep(records[:2], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_pooled_predictions_carry_the_partitions_virtual_sites(tmp_path: Path, tiny_phantom: Path) -> None:
    """Leave-one-site-out pairs cases by site: with a Dirichlet split the virtual site is not the manifest's."""
    import torch

    from fedsubtype.model import ModelConfig, build_model
    from simulation.cohort import evaluate_everywhere, load_cohort

    scen = load_scenario(_scenario(tmp_path, tiny_phantom, partition={
        "kind": "dirichlet", "sites": 2, "alpha": 0.5, "min_cases": 4, "val_fraction": 0.2, "test_fraction": 0.3,
        "seed": 0}))
    cohort = load_cohort(scen, scen.partition, say=lambda _: None)
    torch.manual_seed(0)
    metrics, pooled = evaluate_everywhere(build_model(ModelConfig(**TINY_MODEL)), cohort, n_boot=10, seed=0)
    assert pooled.sites == [cohort.partition.site[c] for c in pooled.case_ids]
    manifest_site = {c.case_id: c.site for c in cohort.cases}
    assert any(manifest_site[c] != cohort.partition.site[c] for c in pooled.case_ids)  # the test means something
    assert set(metrics) == set(cohort.partition.sites) | {"pooled"}


class _RecordingApp:
    """Stands in for the ClientApp: remembers the node config each call saw (picklable, as Ray needs)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, message, context):
        self.seen.append(dict(context.node_config))
        return message


def test_the_engine_adapter_gives_each_virtual_node_its_own_site_and_the_ray_options() -> None:
    import pickle
    from types import SimpleNamespace

    from simulation.flower_sim import SiteNodeClientApp, backend_config
    from simulation.scenario import RaySpec

    inner = _RecordingApp()
    app = SiteNodeClientApp(inner, {0: {"site-config": "/a/site.yaml"}, 1: {"site-config": "/b/site.yaml"}})
    for partition in (1, 0):
        app("msg", SimpleNamespace(node_config={"partition-id": partition, "num-partitions": 2}))
    assert [c["site-config"] for c in inner.seen] == ["/b/site.yaml", "/a/site.yaml"]
    assert pickle.loads(pickle.dumps(app)).node_configs == app.node_configs
    joined = backend_config(RaySpec(address="ray://head:10001", client_cpus=0.5))
    assert joined == {"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                      "init_args": {"address": "ray://head:10001"}}
    assert backend_config(RaySpec(num_cpus=3))["init_args"] == {"num_cpus": 3}
