"""The site's privacy settings: one-line errors for settings that cannot be right, before any data is read."""

from __future__ import annotations

import pytest

from fedsubtype.configio import from_dict
from fedsubtype.errors import ConfigError
from fedsubtype.privacy import PrivacyConfig
from fedsubtype.privacy.accounting import epsilon_for, make_plan
from fedsubtype.privacy.site import startup_check


@pytest.mark.parametrize("raw, key", [
    ({"target_epsilon": 0}, "target_epsilon"),
    ({"target_epsilon": -1.5}, "target_epsilon"),
    ({"delta": 0}, "delta"),
    ({"delta": 1}, "delta"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"noise_multiplier": 0}, "noise_multiplier"),
    ({"enabled": True}, "target_epsilon"),
    ({"accountant": "gdp"}, "accountant"),
    ({"epsilon": 3}, "privacy"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        from_dict(PrivacyConfig, raw, "site.yaml:privacy")
    line = str(info.value)
    assert "\n" not in line
    assert key in line


def test_defaults_are_off_with_prv_accountant():
    cfg = from_dict(PrivacyConfig, {}, "privacy")
    assert cfg.enabled is False and cfg.accountant == "prv" and cfg.max_grad_norm == 1.0


def test_default_delta_is_far_below_one_over_n():
    cfg = PrivacyConfig(enabled=True, target_epsilon=8)
    assert cfg.resolved_delta(130) == pytest.approx(1e-5)
    assert cfg.resolved_delta(1_000_000) == pytest.approx(1e-7)  # 1/(10 n) for big sites
    for n in (10, 130, 5000):
        assert cfg.resolved_delta(n) <= 1 / (10 * n)


def test_delta_not_below_one_over_n_is_refused_once_n_is_known():
    cfg = from_dict(PrivacyConfig, {"enabled": True, "target_epsilon": 8, "delta": 0.01}, "privacy")
    with pytest.raises(ConfigError, match="1/n") as info:
        startup_check(cfg, n_train=130, batch_size=8)
    assert "privacy.delta" in str(info.value)
    assert cfg.resolved_delta(99) == 0.01  # allowed for n < 100


def test_budget_too_small_for_one_round_is_a_startup_error():
    cfg = PrivacyConfig(enabled=True, target_epsilon=0.5, noise_multiplier=0.8)
    with pytest.raises(ConfigError, match="too small for even one round") as info:
        startup_check(cfg, n_train=130, batch_size=8)
    assert "\n" not in str(info.value)


def test_planned_noise_meets_the_budget_and_is_close_to_it():
    cfg = PrivacyConfig(enabled=True, target_epsilon=3.0)
    plan = make_plan(cfg, n_train=130, batch_size=16, rounds=4, local_epochs=1)
    total = plan.steps_per_round * plan.rounds
    assert plan.steps_per_round == int(130 / 16)
    eps = epsilon_for([(plan.noise_multiplier, plan.sample_rate, total)], plan.delta, "prv")
    assert eps <= 3.0
    assert eps >= 3.0 * 0.97  # not wastefully noisy
    assert plan.planned_epsilon == pytest.approx(eps)
    assert plan.affordable_rounds == 4


def test_given_noise_that_covers_only_some_rounds_is_planned_and_said():
    cfg = PrivacyConfig(enabled=True, target_epsilon=6.0, noise_multiplier=1.0)
    plan = make_plan(cfg, n_train=130, batch_size=16, rounds=50, local_epochs=1)
    assert 1 <= plan.affordable_rounds < 50
    assert f"only {plan.affordable_rounds} of 50 rounds" in plan.summary()
    spent = epsilon_for([(1.0, plan.sample_rate, plan.affordable_rounds * plan.steps_per_round)], plan.delta)
    over = epsilon_for([(1.0, plan.sample_rate, (plan.affordable_rounds + 1) * plan.steps_per_round)], plan.delta)
    assert spent <= 6.0 < over


def _site_with_manifest(tmp_path, privacy, cases=20):
    from fedsubtype.federation.site_config import SiteConfig

    rows = ["case_id,image,mask,site,er,pr,her2,ki67"]
    rows += [f"c{i},img{i}.nii.gz,mask{i}.nii.gz,A,1,0,1,20" for i in range(cases)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return SiteConfig(name="a", manifest=tmp_path / "manifest.csv", privacy=privacy)


def test_site_startup_line_checks_privacy_from_the_manifest_table_alone(tmp_path):
    from fedsubtype.privacy.site import site_startup_line

    # the images named in the manifest do not even exist: nothing but the table is read
    bad = _site_with_manifest(tmp_path, PrivacyConfig(enabled=True, target_epsilon=8, delta=0.1, accountant="rdp"))
    with pytest.raises(ConfigError, match="not below 1/n"):
        site_startup_line(bad)
    good = _site_with_manifest(tmp_path, PrivacyConfig(enabled=True, target_epsilon=8, accountant="rdp"))
    line = site_startup_line(good)
    assert line.startswith("privacy: DP-SGD") and "budget ε = 8" in line and "\n" not in line
    off = _site_with_manifest(tmp_path, PrivacyConfig())
    assert "disabled" in site_startup_line(off)
