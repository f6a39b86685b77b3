"""Site-level DP at the coordinator: Flower's clipping wrappers from federation.yaml, and the client mod."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fs

from fedsubtype.configio import from_dict
from fedsubtype.errors import ConfigError
from fedsubtype.privacy import SiteLevelDPConfig
from fedsubtype.privacy.site_level import ROUND_KEY, round_config_entries, site_level_clipping_mod, wrap_strategy


@pytest.mark.parametrize("clipping, side, cls", [
    ("fixed", "server", fs.DifferentialPrivacyServerSideFixedClipping),
    ("fixed", "client", fs.DifferentialPrivacyClientSideFixedClipping),
    ("adaptive", "server", fs.DifferentialPrivacyServerSideAdaptiveClipping),
    ("adaptive", "client", fs.DifferentialPrivacyClientSideAdaptiveClipping),
])
def test_each_wrapper_is_selectable(clipping, side, cls):
    cfg = from_dict(SiteLevelDPConfig, {"enabled": True, "clipping": clipping, "side": side,
                                        "noise_multiplier": 0.5, "clipped_count_stddev": 1.0}, "site_level_dp")
    inner = fs.FedProx(proximal_mu=0.01)
    wrapped = wrap_strategy(inner, cfg, num_sampled_sites=3)
    assert isinstance(wrapped, cls)
    assert wrapped.strategy is inner
    assert wrapped.noise_multiplier == pytest.approx(0.5, rel=0.1)  # adaptive: Flower adjusts for the count noise
    assert round_config_entries(cfg) == ({ROUND_KEY: clipping} if side == "client" else {})


def test_disabled_leaves_the_strategy_alone():
    inner = fs.FedAvg()
    assert wrap_strategy(inner, SiteLevelDPConfig(), num_sampled_sites=3) is inner


@pytest.mark.parametrize("raw, key", [
    ({"noise_multiplier": -1}, "noise_multiplier"),
    ({"clipping_norm": 0}, "clipping_norm"),
    ({"target_clipped_quantile": 1.0}, "target_clipped_quantile"),
    ({"num_sampled_sites": 0}, "num_sampled_sites"),
    ({"clipping": "median"}, "clipping"),
])
def test_bad_settings_are_one_line_errors(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(SiteLevelDPConfig, raw, "federation.yaml:site_level_dp")


def test_flower_rejection_becomes_a_config_error():
    cfg = SiteLevelDPConfig(enabled=True, clipping="adaptive", noise_multiplier=1.0)  # too few sites for its noise
    with pytest.raises(ConfigError, match="site_level_dp"):
        wrap_strategy(fs.FedAvg(), cfg, num_sampled_sites=3)


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch):
    """Messages are created inside a Flower task; give this test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _train_message(global_weights, config):
    content = RecordDict({"arrays": ArrayRecord(global_weights), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_client_mod_clips_the_update_when_the_round_asks():
    global_w = [np.zeros(4, dtype=np.float32)]
    msg = _train_message(global_w, {ROUND_KEY: "fixed", "clipping_norm": 1.0})

    def train(m, ctx):  # a site whose update has norm 10
        return Message(RecordDict({"arrays": ArrayRecord([np.full(4, 5.0, dtype=np.float32)]),
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=m)

    out = site_level_clipping_mod(msg, _context(), train)
    update = out.content["arrays"].to_numpy_ndarrays()[0]
    assert np.linalg.norm(update) == pytest.approx(1.0, rel=1e-5)


def test_client_mod_passes_through_without_the_key_and_keeps_declines():
    global_w = [np.zeros(4, dtype=np.float32)]
    big = [np.full(4, 5.0, dtype=np.float32)]

    def train(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord(big), "metrics": MetricRecord({"n": 1})}), reply_to=m)

    out = site_level_clipping_mod(_train_message(global_w, {"lr": 0.1}), _context(), train)
    assert np.allclose(out.content["arrays"].to_numpy_ndarrays()[0], big[0])  # untouched

    def decline(m, ctx):  # a site that declined (no weights): the reply must reach the coordinator as is
        return Message(RecordDict({"metrics": MetricRecord({"budget_exhausted": 1})}), reply_to=m)

    out = site_level_clipping_mod(_train_message(global_w, {ROUND_KEY: "fixed", "clipping_norm": 1.0}),
                                  _context(), decline)
    assert not out.has_error()
    assert out.content["metrics"]["budget_exhausted"] == 1


def test_federation_yaml_section_wraps_the_servers_strategy_and_tells_sites_to_clip() -> None:
    from flwr.serverapp import strategy as fs

    from fedsubtype.configio import from_dict
    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.rounds import round_config
    from fedsubtype.federation.strategy import make_strategy

    plain = from_dict(FederationConfig, {"strategy": "fedavg"})
    assert type(make_strategy(plain)).__name__ == "FedAvg"
    assert "site-dp-clipping" not in dict(round_config(plain))
    client_side = from_dict(FederationConfig, {"strategy": "fedprox", "min_sites": 3, "site_level_dp": {
        "enabled": True, "side": "client", "clipping": "fixed", "noise_multiplier": 0.5, "clipping_norm": 2.0}})
    wrapped = make_strategy(client_side)
    assert isinstance(wrapped, fs.DifferentialPrivacyClientSideFixedClipping)
    assert dict(round_config(client_side))["site-dp-clipping"] == "fixed"
    server_side = from_dict(FederationConfig, {"site_level_dp": {"enabled": True, "clipping": "adaptive",
                                                                 "clipped_count_stddev": 1.0}})
    assert isinstance(make_strategy(server_side), fs.DifferentialPrivacyServerSideAdaptiveClipping)


def _reply(value: float, n: int) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord([np.full(4, value, dtype=np.float32)]),
                               "metrics": MetricRecord({"num-examples": n})}), dst_node_id=1, message_type="train")


def _aggregate(wrapped, replies):
    wrapped.current_arrays = ArrayRecord([np.zeros(4, dtype=np.float32)])  # what configure_train would keep
    arrays, metrics = wrapped.aggregate_train(1, replies)
    return arrays.to_numpy_ndarrays()[0], metrics


def test_site_level_dp_averages_sites_with_equal_weights():
    """The accounting assumes every site weighs the same: a site claiming 1000 cases does not dominate."""
    cfg = SiteLevelDPConfig(enabled=True, noise_multiplier=0.0, clipping_norm=100.0)
    def total(records, key):  # like the ServerApp's metric aggregation: keeps the number of examples
        return MetricRecord({key: sum(next(iter(r.metric_records.values()))[key] for r in records)})

    wrapped = wrap_strategy(fs.FedAvg(train_metrics_aggr_fn=total), cfg, num_sampled_sites=2)
    mean, metrics = _aggregate(wrapped, [_reply(1.0, 1), _reply(3.0, 1000)])
    np.testing.assert_allclose(mean, 2.0)
    assert metrics["num-examples"] == 1001  # the reported total stays the real one


def test_site_level_noise_is_not_the_runs_seeded_noise():
    """Seeding NumPy with the run's seed (as the coordinator does) no longer fixes the noise; other draws keep it."""
    cfg = SiteLevelDPConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0)
    wrapped = wrap_strategy(fs.FedAvg(), cfg, num_sampled_sites=2)
    outs = []
    for _ in range(2):
        np.random.seed(0)
        outs.append(_aggregate(wrapped, [_reply(0.5, 5), _reply(0.5, 5)])[0])
        assert np.random.rand() == np.random.RandomState(0).rand()  # the global stream is left as seeded
    assert not np.array_equal(outs[0], outs[1])
