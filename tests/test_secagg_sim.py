"""Secure aggregation in `fedsubtype-sim` (issue 25): one switch in the scenario, the same ClientApp and
ServerApp on Flower's simulation engine, every round aggregated under SecAgg+."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsubtype.errors import ConfigError
from simulation.scenario import load_scenario

from simutil import write_scenario


def _scenario(tmp: Path, phantom: Path, methods: list[dict], **federation) -> Path:
    """The tiny two-site study, only `methods`, no leave-one-site-out."""
    return write_scenario(tmp, phantom, methods=methods, leave_one_site_out=False, loso_methods=[],
                          federation={"budget_epochs": 2, "local_epochs": 1, **federation})


def test_the_switch_changes_the_run_identity_only_when_on(tmp_path, tiny_phantom):
    plain = load_scenario(_scenario(tmp_path, tiny_phantom, [{"name": "fedavg"}]))
    secure = load_scenario(_scenario(tmp_path, tiny_phantom, [{"name": "fedavg"}], secure_aggregation=True))
    off = load_scenario(_scenario(tmp_path, tiny_phantom, [{"name": "fedavg"}], secure_aggregation=False))
    assert plain.config_hash() == off.config_hash() != secure.config_hash()


def test_a_robust_method_with_secure_aggregation_is_refused(tmp_path, tiny_phantom):
    from simulation.runner import run_study

    scen = load_scenario(_scenario(tmp_path, tiny_phantom, [{"name": "fedmedian"}], secure_aggregation=True))
    with pytest.raises(ConfigError, match="fedmedian needs each site's update"):
        run_study(scen, say=lambda line: None)


@pytest.mark.slow
def test_fedavg_with_secure_aggregation_on_the_simulation_engine(tmp_path, tiny_phantom):
    from simulation.runner import run_study

    scen = load_scenario(_scenario(tmp_path, tiny_phantom, [{"name": "fedavg"}], secure_aggregation=True))
    study = run_study(scen, say=lambda line: None)
    assert study.ran == 1
    server = next((tmp_path / "out" / "runs").rglob("server"))
    train = [r for r in json.loads((server / "rounds.json").read_text(encoding="utf-8")) if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and all(r["accepted"] for r in train), train
    assert all(len(r["answered"]) == 2 and not r["failed"] for r in train)
    assert (server / "model.pt").is_file()
