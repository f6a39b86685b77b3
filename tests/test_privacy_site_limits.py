"""What a site lets the coordinator ask, and what leaves it: the site's limits (declined before any data is read),
per-run request counts, metrics over enough cases only, the lifetime ε budget, and DP noise seeded from entropy."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from fedsubtype.configio import from_dict
from fedsubtype.errors import ConfigError, UserError
from fedsubtype.federation.site_algo import EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS, SiteAlgo, check_metrics
from fedsubtype.federation.site_config import SiteConfig, load_site_config
from fedsubtype.privacy import PrivacyConfig
from fedsubtype.privacy.limits import RoundDeclined, SiteLimits, check_round
from fedsubtype.privacy.metrics_gate import releasable_eval_metrics
from fedsubtype.privacy.requests import RunRequests
from fedsubtype.privacy.site import PrivacyBudgetExhausted, SitePrivacy

TINY_MODEL = {"width": 8, "groups": 4, "feature_dim": 16, "hidden_dim": 16}
ASK = {"server_round": 1, "num_rounds": 5, "local_epochs": 1, "local_steps": None, "batch_size": 8,
       "input_size": 32, "model_config": TINY_MODEL}


@pytest.mark.parametrize("change, line", [
    ({"batch_size": 2}, "batch size 2 below the site's min_batch_size 4"),
    ({"local_epochs": 6}, "local epochs 6 above the site's max_local_epochs 5"),
    ({"local_steps": 2001}, "local steps 2001 above the site's max_local_steps 2000"),
    ({"num_rounds": 101}, "rounds in the run 101 above the site's max_rounds_per_run 100"),
    ({"server_round": 101}, "round number 101 above the site's max_rounds_per_run 100"),
    ({"input_size": 256}, "input size 256 not in the site's allowed_input_sizes"),
    ({"model_config": {**TINY_MODEL, "width": 256}}, "above the site's max_parameters 5000000"),
])
def test_each_default_limit_declines_with_its_line(change, line):
    check_round(SiteLimits(), ASK, "train")  # the baseline fits
    with pytest.raises(RoundDeclined) as err:
        check_round(SiteLimits(), {**ASK, **change}, "train")
    assert line in err.value.line() and "\n" not in err.value.line()


def test_allowed_variants_and_evaluation_checks():
    limits = from_dict(SiteLimits, {"allowed_variants": ["full"]}, "site.yaml:limits")
    with pytest.raises(RoundDeclined, match="variant 'core_only'"):
        check_round(limits, {**ASK, "model_config": {**TINY_MODEL, "variant": "core_only"}}, "evaluate")
    check_round(limits, {**ASK, "batch_size": 1}, "evaluate")  # evaluation has no training limits
    with pytest.raises(ConfigError, match="allowed_variants"):
        from_dict(SiteLimits, {"allowed_variants": ["huge"]}, "site.yaml:limits")
    with pytest.raises(ConfigError, match="min_batch_size"):
        from_dict(SiteLimits, {"min_batch_size": 0}, "site.yaml:limits")


def _round(**extra) -> dict:
    return {"server-round": 1, "local-epochs": 1, "batch-size": 8, "run-id": "r1", "num-rounds": 2,
            "model-config": json.dumps(TINY_MODEL), "preprocess-config": json.dumps({"size": 32}), **extra}


def _site(tmp_path: Path, **limits) -> SiteConfig:
    """A site whose manifest does not exist: any read of data would fail with another error."""
    return SiteConfig(name="s1", manifest=tmp_path / "missing.csv", work_dir=tmp_path / "state",
                      limits=SiteLimits(**limits))


def test_a_round_over_the_limits_is_declined_before_any_data_is_read(tmp_path):
    algo = SiteAlgo(_site(tmp_path))
    with pytest.raises(RoundDeclined, match="local epochs 9"):
        algo.train([], _round(**{"local-epochs": 9}))
    with pytest.raises(RoundDeclined, match="input size 40"):
        algo.evaluate([], _round(**{"preprocess-config": json.dumps({"size": 40})}))
    assert not algo.cases and not (tmp_path / "state" / "validated.json").exists()


def test_rounds_and_evaluations_are_counted_per_run_id(tmp_path):
    algo = SiteAlgo(_site(tmp_path, max_rounds_per_run=2, max_evaluations_per_run=1))
    for rnd in (1, 2):  # admitted, then the data read fails (no manifest): the request still counts
        with pytest.raises(UserError) as err:
            algo.train([], _round(**{"server-round": rnd}))
        assert not isinstance(err.value, RoundDeclined)
    with pytest.raises(RoundDeclined, match="train request 3 of this run is above the site's max_rounds_per_run 2"):
        algo.train([], _round(**{"server-round": 2}))  # the coordinator asking round 2 again
    with pytest.raises(UserError, match="manifest"):  # another run id has its own count
        algo.train([], _round(**{"run-id": "r2"}))
    with pytest.raises(UserError, match="manifest"):
        algo.evaluate([], _round())
    with pytest.raises(RoundDeclined, match="max_evaluations_per_run 1"):
        algo.evaluate([], _round())
    counts = RunRequests(tmp_path / "state" / "run_requests.json").counts()
    assert counts == {"r1": {"train": 2, "evaluate": 1}, "r2": {"train": 1}}


def test_the_template_and_example_sites_admit_the_federation_and_scenarios():
    """Default limits admit what federation.yaml and every simulation scenario ask for."""
    root = Path(__file__).resolve().parents[1]
    fed = yaml.safe_load((root / "site_configs" / "federation.yaml").read_text(encoding="utf-8"))
    asks = [{"server_round": fed["rounds"], "num_rounds": fed["rounds"], "local_epochs": fed["local_epochs"],
             "local_steps": fed["local_steps"], "batch_size": fed["batch_size"],
             "input_size": fed["preprocess"]["size"], "model_config": fed["model"]}]
    for path in sorted((root / "simulation" / "scenarios").glob("*.yaml")):
        scen = yaml.safe_load(path.read_text(encoding="utf-8"))
        rounds = scen["federation"]["budget_epochs"] // scen["federation"]["local_epochs"]
        asks.append({"server_round": rounds, "num_rounds": rounds, "local_epochs": scen["federation"]["local_epochs"],
                     "batch_size": scen["training"]["batch_size"], "input_size": scen["preprocess"]["size"],
                     "model_config": scen["model"]})
    for site_file in sorted((root / "site_configs").glob("site*.yaml")):
        raw = yaml.safe_load(site_file.read_text(encoding="utf-8"))
        limits = from_dict(SiteLimits, raw.get("limits") or {}, f"{site_file.name}:limits")
        for ask in asks:
            check_round(limits, ask, "train")
            check_round(limits, ask, "evaluate")
    assert len(asks) >= 5


# ---------------------------------------------------------------- metrics that do not leak
def _scores(n_pos: int, n_neg: int, n_ki67: int) -> dict:
    from fedsubtype.evaluate.metrics import compute_metrics

    n = max(n_pos + n_neg, n_ki67)
    rng = np.random.default_rng(0)
    labels = np.full((n, 4), np.nan)
    labels[:n_pos, :3] = 1.0
    labels[n_pos:n_pos + n_neg, :3] = 0.0
    labels[:n_ki67, 3] = rng.uniform(5, 60, n_ki67)
    return compute_metrics(labels, rng.uniform(size=(n, 3)), rng.uniform(5, 60, n), n_boot=0)


@pytest.mark.parametrize("n_pos, n_neg, n_ki67, present", [
    (10, 10, 10, {"er-auc", "pr-auc", "her2-auc", "mean-auc", "ki67-mae"}),
    (10, 9, 10, {"ki67-mae"}),          # one class short: no AUC, hence no mean AUC
    (30, 0, 9, set()),                  # one class only (a NaN AUC would say so): absent; Ki-67 over 9 cases
])
def test_metrics_need_enough_cases_of_each_class(n_pos, n_neg, n_ki67, present):
    out = releasable_eval_metrics(_scores(n_pos, n_neg, n_ki67), n_cases=max(n_pos + n_neg, n_ki67), min_cases=10)
    assert set(out) - set(EVAL_REQUIRED_KEYS) == present
    assert out["metrics-omitted"] == 5 - len(present)
    assert all(math.isfinite(v) for v in out.values())
    assert check_metrics(out, EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS) == out


def test_the_reply_allow_list_refuses_unknown_and_requires_the_counts():
    ok = {"num-examples": 12.0, "metrics-omitted": 5.0}
    assert check_metrics(ok, EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS) == ok
    with pytest.raises(ValueError, match="extra"):
        check_metrics({**ok, "case-ki67": 40.0}, EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS)
    with pytest.raises(ValueError, match="missing"):
        check_metrics({"num-examples": 12.0, "mean-auc": 0.7}, EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS)


# ---------------------------------------------------------------- lifetime budget
def _start(tmp_path: Path, run_id: str, **privacy) -> SitePrivacy:
    cfg = PrivacyConfig(enabled=True, target_epsilon=4.0, noise_multiplier=1.0, accountant="rdp", delta=1e-4,
                        **privacy)
    sp = SitePrivacy.start(cfg, site="s1", n_train=100, batch_size=10, rounds=3, run_id=run_id,
                           state_dir=tmp_path, local_epochs=1)
    assert sp is not None
    return sp


def _spend(sp: SitePrivacy, server_round: int) -> None:
    sp.require_budget(server_round)
    sp.record(server_round, SimpleNamespace(entries=sp.round_entries))


def test_a_new_run_id_counts_against_the_lifetime_budget(tmp_path):
    first = _start(tmp_path, "run-1", lifetime_epsilon=4.5)
    for rnd in (1, 2):
        _spend(first, rnd)
    assert first.ledger.spent() <= 4.0
    second = _start(tmp_path, "run-2", lifetime_epsilon=4.5)  # a fresh run id: fresh per-run budget ...
    assert second.ledger.spent() == 0.0
    rnd = 1
    with pytest.raises(PrivacyBudgetExhausted) as err:  # ... but not a fresh lifetime
        while rnd < 10:
            _spend(second, rnd)
            rnd += 1
    assert "lifetime privacy budget exhausted" in err.value.line() and "run run-2" in err.value.line()
    assert isinstance(err.value, RoundDeclined) and "\n" not in err.value.line()
    assert rnd == 2 and second.ledger.spent() <= 4.0  # declined by the lifetime, within its run's budget
    assert second.ledger.epsilon_all_runs() <= 4.5 < second.ledger.epsilon_all_runs_if(second.round_entries())


def test_by_default_the_lifetime_budget_is_the_run_budget(tmp_path):
    first = _start(tmp_path, "run-1")
    for rnd in (1, 2):
        _spend(first, rnd)
    second = _start(tmp_path, "run-2")
    assert second.check(1) is not None and "lifetime" in second.check(1)


def test_privacy_report_prints_each_run_and_the_total(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main

    first = _start(tmp_path / "state", "run-1")
    _spend(first, 1)
    _spend(_start(tmp_path / "state", "run-2"), 1)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s1", "manifest": "missing.csv", "work_dir": str(tmp_path / "state"),
                                    "privacy": {"enabled": True, "target_epsilon": 4.0, "lifetime_epsilon": 9.0}}))
    assert main(["--site", str(site), "--privacy-report"]) == 0
    out = capsys.readouterr().out
    assert "run run-1: ε = " in out and "run run-2: ε = " in out
    assert "all runs together at δ = 0.0001 (rdp)" in out and "lifetime budget 9" in out


# ---------------------------------------------------------------- noise nobody outside the site can reproduce
def test_dp_seeds_come_from_entropy_unless_a_simulation_opts_in(tmp_path):
    a, b = _start(tmp_path / "a", "run"), _start(tmp_path / "b", "run")
    assert a.hook(1).seed != b.hook(1).seed  # identical config, seed, run id, round: different noise
    a, b = (_start(tmp_path / d, "run", reproducible_noise=True) for d in ("c", "d"))
    assert a.hook(1).seed == b.hook(1).seed


def test_fedsubtype_client_refuses_reproducible_noise(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main

    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "s1", "manifest": "missing.csv",
                                    "privacy": {"enabled": True, "target_epsilon": 4.0, "reproducible_noise": True}}))
    assert main(["--site", str(site), "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reproducible_noise is for simulations only" in err[0]


def test_the_simulation_site_files_opt_into_reproducible_noise(tmp_path):
    """simulation.engine writes virtual sites' site.yaml with the opt-in (privacy on) and loads them back."""
    from simulation.engine import write_site_files

    from fedsubtype.data.preprocess import PreprocessConfig

    scen = SimpleNamespace(privacy={"enabled": True, "target_epsilon": 3.0}, ray=SimpleNamespace(threads_per_client=1),
                           data=SimpleNamespace(cache_dir=str(tmp_path / "cache")))
    cohort = SimpleNamespace(cases=[], partition=SimpleNamespace(site={}, split={}),
                             preprocess_config=PreprocessConfig(size=16))
    nodes = write_site_files(scen, cohort, ["v1"], tmp_path)
    site = load_site_config(nodes[0]["site-config"])
    assert site.privacy.reproducible_noise and site.limits.min_cases_per_metric == 1
