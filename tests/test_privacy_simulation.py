"""A DP federation through Flower's real simulation engine: each virtual site runs the deployment's
ClientApp → SiteAlgo → Opacus, spends from its own ledger, and declines the round past its budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

TINY_MODEL = {"width": 4, "groups": 2, "feature_dim": 8, "hidden_dim": 8, "blocks": [1, 1, 1]}
BUDGET = 4.0


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedsubtype.phantom import generate_cohort

    root = tmp_path_factory.mktemp("phantom")
    generate_cohort(root / "cohort", cases=24, sites=2, seed=3, workers=1, progress=False)
    return root / "cohort"


@pytest.mark.slow
def test_dp_sites_in_simulation_spend_one_budget_and_decline_past_it(tmp_path: Path, tiny_phantom: Path) -> None:
    from simulation.runner import run_study
    from simulation.scenario import load_scenario

    scenario = {
        "name": "tiny-dp", "output_dir": str(tmp_path / "out"),
        "data": {"manifest": str(tiny_phantom / "manifest.csv"), "cache_dir": str(tiny_phantom.parent / "cache"),
                 "cache_workers": 1},
        "partition": {"kind": "natural", "val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
        "preprocess": {"size": 16}, "model": TINY_MODEL, "training": {"batch_size": 4, "augment": False},
        # the sites plan their noise for 2 rounds; the coordinator runs 3: the third must be declined
        "privacy": {"enabled": True, "target_epsilon": BUDGET, "rounds": 2, "accountant": "rdp"},
        "federation": {"budget_epochs": 3, "local_epochs": 1},
        "methods": [{"name": "fedavg"}], "seeds": [0], "ray": {"num_cpus": 2, "client_cpus": 1},
    }
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
    run_study(load_scenario(path), say=lambda _: None)

    server_dir = next((tmp_path / "out" / "runs").rglob("server"))
    rounds = [r for r in json.loads((server_dir / "rounds.json").read_text(encoding="utf-8")) if r["phase"] == "train"]
    by_round = {r["round"]: r for r in rounds}
    for rnd in (1, 2):  # both sites trained with DP and reported ε spent so far
        answered = by_round[rnd]["answered"]
        assert len(answered) == 2
        assert all(0 < a["metrics"]["epsilon"] <= BUDGET for a in answered)
    assert not by_round[3]["answered"]
    assert len(by_round[3]["failed"]) == 2
    assert all("privacy budget exhausted" in line for line in by_round[3]["failed"])
    ledgers = list((tmp_path / "out").rglob("privacy_ledger.json"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        run = next(iter(json.loads(ledger.read_text(encoding="utf-8"))["runs"].values()))
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        assert run["rounds"][-1]["epsilon_after"] <= BUDGET
