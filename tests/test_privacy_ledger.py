"""One ledger per site for the whole federation run: persists across rounds and restarts, enforces the budget."""

from __future__ import annotations

import json

import pytest

from fedsubtype.errors import ConfigError
from fedsubtype.privacy import PrivacyConfig
from fedsubtype.privacy.accounting import epsilon_for
from fedsubtype.privacy.ledger import PrivacyLedger
from fedsubtype.privacy.site import PrivacyBudgetExhausted, SitePrivacy, privacy_overrides

Q = 8 / 130


def test_ledger_survives_a_restart_with_the_same_epsilon(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, "run-1", delta=1e-5, target_epsilon=8.0, site="a")
    e1 = ledger.record(1, [(1.1, Q, 16)])
    e2 = ledger.record(2, [(1.1, Q, 16)])
    assert 0 < e1 < e2
    assert e2 == pytest.approx(epsilon_for([(1.1, Q, 32)], 1e-5))  # composed over rounds, not reset
    reopened = PrivacyLedger(path, "run-1", delta=1e-5, target_epsilon=8.0)
    assert reopened.history == [(1.1, Q, 32)]
    assert reopened.spent() == pytest.approx(e2)
    assert [r["round"] for r in reopened.rounds] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind


def test_runs_are_kept_apart_and_can_be_composed(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, "run-1", delta=1e-5, accountant="rdp").record(1, [(1.1, Q, 16)])
    other = PrivacyLedger(path, "run-2", delta=1e-5, accountant="rdp")
    assert other.spent() == 0.0
    other.record(1, [(1.1, Q, 16)])
    assert other.epsilon_all_runs() == pytest.approx(epsilon_for([(1.1, Q, 32)], 1e-5, "rdp"))
    assert set(json.loads(path.read_text(encoding="utf-8"))["runs"]) == {"run-1", "run-2"}


def test_changing_delta_mid_run_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, "run-1", delta=1e-5).record(1, [(1.1, Q, 16)])
    with pytest.raises(ConfigError, match="delta"):
        PrivacyLedger(path, "run-1", delta=1e-6)


def test_corrupt_ledger_is_a_one_line_error(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyLedger(path, "run-1", delta=1e-5)


def _site(tmp_path, **kw):
    """A site planned with the RDP accountant (fast; PRV's agreement is tested in test_privacy_accounting)."""
    cfg = PrivacyConfig(enabled=True, target_epsilon=kw.pop("eps", 4.0), noise_multiplier=kw.pop("sigma", 1.0),
                        accountant="rdp")
    return SitePrivacy.start(cfg, site="a", n_train=130, batch_size=8, rounds=kw.pop("rounds", 10), run_id="run-1",
                             state_dir=tmp_path, **kw)


def test_budget_exhaustion_declines_before_training(tmp_path):
    site = _site(tmp_path)
    affordable = site.plan.affordable_rounds
    assert 1 <= affordable < 10
    for rnd in range(1, affordable + 1):
        assert site.check(rnd) is None
        site.ledger.record(rnd, site.round_entries())
    assert site.ledger.spent() <= 4.0
    reason = site.check(affordable + 1)
    assert reason is not None and "budget exhausted" in reason
    with pytest.raises(PrivacyBudgetExhausted) as info:
        site.require_budget(affordable + 1)
    assert info.value.metrics["budget_exhausted"] == 1
    assert info.value.metrics["epsilon_spent"] == pytest.approx(site.ledger.spent())
    assert "\n" not in info.value.line()
    # a restarted site reads the same ledger and still declines
    again = _site(tmp_path)
    assert again.plan == site.plan
    assert again.check(affordable + 1) is not None


def test_restarted_site_keeps_the_runs_planned_noise(tmp_path):
    first = _site(tmp_path, sigma=None, eps=3.0, rounds=4)
    first.ledger.record(1, first.round_entries())
    # the coordinator now claims a different number of rounds: the site keeps its plan and its spend
    second = _site(tmp_path, sigma=None, eps=3.0, rounds=40)
    assert second.plan.noise_multiplier == first.plan.noise_multiplier
    assert second.ledger.spent() == pytest.approx(first.ledger.spent())
    assert "already spent" in second.summary()


def test_site_metrics_are_aggregate_numbers_only(tmp_path):
    site = _site(tmp_path)
    metrics = site.metrics()
    assert set(metrics) == {"dp_enabled", "epsilon_spent", "epsilon_budget", "dp_delta", "dp_steps",
                            "dp_noise_multiplier", "budget_exhausted"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_coordinator_privacy_keys_are_recognised():
    cfg = {"lr": 0.01, "local-epochs": 1, "target_epsilon": 50, "noise-multiplier": 0.1, "max-grad-norm": 10,
           "privacy": "off", "clipping_norm": 0.5}
    assert privacy_overrides(cfg) == ["max-grad-norm", "noise-multiplier", "privacy", "target_epsilon"]


def test_disabled_privacy_has_no_site_privacy(tmp_path):
    assert SitePrivacy.start(PrivacyConfig(), site="a", n_train=10, batch_size=8, rounds=3, run_id="r",
                             state_dir=tmp_path) is None


def test_two_processes_of_one_site_extend_one_history(tmp_path):
    """Two ledger objects on one file (e.g. two simulation workers) never lose each other's rounds."""
    path = tmp_path / "ledger.json"
    a = PrivacyLedger(path, "run-1", delta=1e-5, target_epsilon=8.0, accountant="rdp")
    b = PrivacyLedger(path, "run-1", delta=1e-5, target_epsilon=8.0, accountant="rdp")
    a.record(1, [(1.1, Q, 16)])
    b.record(2, [(1.1, Q, 16)])  # b was opened before round 1 was written
    a.record(3, [(1.1, Q, 16)])
    assert [r["round"] for r in a.rounds] == [1, 2, 3]
    assert a.history == b.history == [(1.1, Q, 48)]
    assert a.spent() == pytest.approx(epsilon_for([(1.1, Q, 48)], 1e-5, "rdp"))
