"""The coordinator's reply checks and robust aggregation (issue 23 §5-6): every bad reply is left out with one
reason, the run never crashes on it, and the robust strategies' constraints are refused at start."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsubtype.errors import ConfigError
from fedsubtype.federation.config import FederationConfig
from fedsubtype.federation.reply_checks import (ReplyChecksConfig, count_problem, first_counts, metrics_problem,
                                                norm_outliers, screen_train, weights_problem)
from fedsubtype.federation.robust import RobustConfig, clip_updates
from fedsubtype.federation.runstore import RoundRecord, SiteResult

GOOD_TRAIN = {"num-examples": 20.0, "train-loss": 0.5, "steps": 3.0, "samples-seen": 60.0, "seconds": 1.0,
              "proximal-term": float("nan"), "epsilon": float("nan"), "delta": float("nan")}


@pytest.fixture
def flower_ids(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _reply(weights, count=20.0, **metrics) -> Message:
    arrays = ArrayRecord([np.asarray(w) for w in (weights if isinstance(weights, list) else [weights])])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({**GOOD_TRAIN, "num-examples": count,
                                                                           **metrics}),
                               "site": ConfigRecord({"name": "x"})}), dst_node_id=1, message_type="train")


# ------------------------------------------------------------------ single checks
def test_metrics_must_be_allow_listed_numbers_with_a_count():
    assert metrics_problem(GOOD_TRAIN, "train") is None
    assert metrics_problem({"num-examples": 4.0, "mean-auc": 0.7}, "evaluate") is None
    assert "not a number" in metrics_problem({**GOOD_TRAIN, "train-loss": [0.1, 0.2]}, "train")
    assert "extra ['patient-0-label']" in metrics_problem({**GOOD_TRAIN, "patient-0-label": 1.0}, "train")
    assert "missing ['num-examples']" in metrics_problem({"train-loss": 0.1}, "train")
    assert "extra ['train-loss']" in metrics_problem({"num-examples": 4.0, "train-loss": 0.1}, "evaluate")


@pytest.mark.parametrize("count,why", [(-5.0, "not an integer >= 1"), (0.0, "not an integer >= 1"),
                                       (2.5, "not an integer"), (float("nan"), "not an integer"),
                                       (1e12, "above reply_checks.max_examples 100000"),
                                       (21.0, "above the 20 this site declared or first reported")])
def test_implausible_training_counts_are_named(count, why):
    assert why in count_problem(count, "train", 100_000, first=20.0)


def test_plausible_counts_pass_and_an_evaluation_may_have_none():
    assert count_problem(20.0, "train", 100_000, first=20.0) is None
    assert count_problem(7, "train", 100_000) is None
    assert count_problem(0.0, "evaluate", 100_000) is None
    assert count_problem(-1.0, "evaluate", 100_000) is not None


def test_weights_must_be_finite_and_exactly_the_layout_sent(flower_ids):
    shapes = [(6,)]
    ok = _reply(np.ones(6, np.float32))
    assert weights_problem(ok.content, shapes) is None
    assert "NaN" in weights_problem(_reply(np.array([1, np.nan, 1, 1, 1, 1], np.float32)).content, shapes)
    assert "NaN or infinite" in weights_problem(_reply(np.array([np.inf] * 6, np.float32)).content, shapes)
    assert "layout" in weights_problem(_reply(np.ones(5, np.float32)).content, shapes)
    assert "layout" in weights_problem(_reply([np.ones(3, np.float32), np.ones(3, np.float32)]).content, shapes)
    assert "floating" in weights_problem(_reply(np.ones(6, np.int64)).content, shapes)
    extra = _reply(np.ones(6, np.float32))
    extra.content["more"] = ArrayRecord([np.ones(2, np.float32)])
    assert "one array record" in weights_problem(extra.content, shapes)


def test_norm_outliers_are_judged_against_the_rounds_median():
    updates = {1: np.full(4, 1.0), 2: np.full(4, 1.2), 3: np.full(4, 0.9), 4: np.full(4, 100.0)}
    out = norm_outliers(updates, 10.0)
    assert list(out) == [4] and "above 10 × the round's median" in out[4]
    assert norm_outliers(updates, None) == {}
    assert norm_outliers({1: np.zeros(4), 2: np.zeros(4)}, 10.0) == {}  # nobody moved: nothing to compare with


def test_first_counts_come_from_the_runs_own_records():
    records = [{"phase": "train", "answered": [{"node_id": 5, "metrics": {"num-examples": 20}}]},
               {"phase": "evaluate", "answered": [{"node_id": 6, "metrics": {"num-examples": 3}}]},
               {"phase": "train", "answered": [{"node_id": 5, "metrics": {"num-examples": 19}},
                                               {"node_id": 6, "metrics": {"num-examples": 30}}]}]
    assert first_counts(records) == {5: 20.0, 6: 30.0}


def test_screen_moves_each_bad_reply_to_failed_with_one_reason(flower_ids):
    base = np.zeros(6, np.float32)
    replies = {11: _reply(np.full(6, 0.1, np.float32)), 12: _reply(np.full(6, 0.12, np.float32)),
               13: _reply(np.full(6, np.nan, np.float32)), 14: _reply(np.full(6, 0.11, np.float32), count=1e12),
               15: _reply(np.full(6, 50.0, np.float32)), 16: _reply(np.full(6, 0.09, np.float32))}
    record = RoundRecord(round=1, phase="train", asked=6,
                         answered=[SiteResult(f"s{n}", n, dict(m.content["metrics"])) for n, m in replies.items()])
    kept = screen_train(record, list(replies.values()), [base], ReplyChecksConfig(), {})
    assert [r.node_id for r in record.answered] == [11, 12, 16] and len(kept) == 3
    assert [line.split(":")[0] for line in record.failed] == ["s13", "s14", "s15"]
    assert "NaN" in record.failed[0] and "max_examples" in record.failed[1] and "norm" in record.failed[2]


# ------------------------------------------------------------------ the three attacks, end to end
class _Grid:
    """Three honest sites and one whose reply is `bad(reply)`; answers in-process (no network)."""

    SITES = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-evil"}
    last_sent: np.ndarray | None = None

    def __init__(self, bad):
        self.bad, self.pushed, self.ids = bad, {}, itertools.count()

    def get_node_ids(self):
        return list(self.SITES)

    def push_messages(self, messages):
        ids = [f"msg-{next(self.ids)}" for _ in messages]
        for message_id, m in zip(ids, messages):
            m.metadata.__dict__["_message_id"] = message_id  # the SuperLink's job
        self.pushed.update(zip(ids, messages))
        return ids

    def pull_messages(self, ids):
        return [self._answer(self.pushed.pop(i)) for i in ids]

    def _answer(self, m: Message) -> Message:
        node = int(m.metadata.dst_node_id)
        site = ConfigRecord({"name": self.SITES[node]})
        if not m.metadata.message_type.startswith("train"):
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "mean-auc": 0.6}), "site": site}),
                           reply_to=m)
        sent = _Grid.last_sent = m.content["arrays"].to_numpy_ndarrays()[0]
        new = (sent * 0.95 + 0.001 * (node - 10)).astype(np.float32)
        reply = Message(RecordDict({"arrays": ArrayRecord([new]), "metrics": MetricRecord({**GOOD_TRAIN}),
                                    "site": site}), reply_to=m)
        return self.bad(reply) if node == 14 else reply


def _nan(reply):
    w = reply.content["arrays"].to_numpy_ndarrays()[0]
    reply.content["arrays"] = ArrayRecord([np.full_like(w, np.nan)])
    return reply


def _count(value):
    def bad(reply):
        reply.content["metrics"]["num-examples"] = value
        return reply
    return bad


def _list_metric(reply):
    reply.content["metrics"]["train-loss"] = [0.1, 0.2]
    return reply


def _tiny_cfg(run_dir, **kw) -> FederationConfig:
    cfg = FederationConfig(run_dir=run_dir, **{"rounds": 2, "strategy": "fedavg", "min_sites": 3, "seed": 3, **kw})
    cfg.model.width, cfg.model.groups, cfg.model.feature_dim, cfg.model.hidden_dim = 8, 4, 16, 16
    return cfg


def _final(run_dir):
    import torch

    payload = torch.load(run_dir / "checkpoints" / "round_002.pt", weights_only=True)
    return np.concatenate([t.numpy().ravel() for t in payload["weights"]])


@pytest.mark.parametrize("attack,why", [(_nan, "NaN"), (_count(1e12), "max_examples"),
                                        (_count(-50.0), "not an integer >= 1"), (_list_metric, "not a number")])
def test_a_bad_site_is_left_out_and_the_model_is_the_honest_sites(tmp_path, flower_ids, attack, why):
    from fedsubtype.federation.rounds import run_rounds

    run_rounds(_Grid(attack), _tiny_cfg(tmp_path / "attacked"), resume=False)
    honest = _tiny_cfg(tmp_path / "honest", min_sites=3)
    grid = _Grid(lambda r: r)
    grid.SITES = {k: v for k, v in _Grid.SITES.items() if k != 14}
    run_rounds(grid, honest, resume=False)
    attacked = _final(tmp_path / "attacked")
    assert np.isfinite(attacked).all() and np.array_equal(attacked, _final(tmp_path / "honest"))
    records = json.loads((tmp_path / "attacked" / "rounds.json").read_text(encoding="utf-8"))
    trains = [r for r in records if r["phase"] == "train"]
    assert all(r["accepted"] and len(r["failed"]) == 1 and r["failed"][0].startswith("site-evil:")
               and why in r["failed"][0] for r in trains)
    assert (tmp_path / "attacked" / "model.pt").is_file()


@pytest.mark.parametrize("attack", [_nan, _count(1e12), _count(-50.0)])
def test_without_the_checks_flowers_fedavg_is_poisoned(flower_ids, attack):
    """The attacks the checks stop: the same replies straight into Flower's FedAvg break the model."""
    from flwr.serverapp.strategy import FedAvg

    grid = _Grid(attack)
    sent = np.ones(8, np.float32)
    msgs = [Message(RecordDict({"arrays": ArrayRecord([sent]), "config": ConfigRecord({})}), dst_node_id=n,
                    message_type="train") for n in grid.SITES]
    replies = grid.pull_messages(grid.push_messages(msgs))
    agg = FedAvg().aggregate_train(1, replies)[0].to_numpy_ndarrays()[0]
    honest = [m.content["arrays"].to_numpy_ndarrays()[0] for m in replies[:3]]
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)
    assert not np.isfinite(agg).all() or (agg < lo - 1e-6).any() or np.allclose(agg, replies[3].content["arrays"]
                                                                                   .to_numpy_ndarrays()[0], atol=1e-6)


def test_too_few_valid_replies_keep_the_previous_global_model(tmp_path, flower_ids):
    from fedsubtype.federation.rounds import run_rounds

    cfg = _tiny_cfg(tmp_path, min_sites=4)
    run_rounds(_Grid(_nan), cfg, resume=False)
    records = json.loads((tmp_path / "rounds.json").read_text(encoding="utf-8"))
    assert [r["accepted"] for r in records if r["phase"] == "train"] == [False, False]
    from fedsubtype.federation.rounds import starting_point
    from fedsubtype.federation.runstore import RunStore
    from fedsubtype.federation.strategy import make_strategy

    initial = np.concatenate([w.ravel() for w in starting_point(RunStore(tmp_path / "fresh"), cfg,
                                                                make_strategy(cfg), False)[1]])
    assert np.array_equal(_final(tmp_path), initial)


# ------------------------------------------------------------------ robust strategies and their constraints
@pytest.mark.parametrize("strategy,min_sites,f,match", [
    ("krum", 4, 1, "needs min_sites >= 2f \\+ 3 = 5"), ("multikrum", 6, 2, "2f \\+ 3 = 7"),
    ("bulyan", 6, 1, "needs min_sites >= 4f \\+ 3 = 7")])
def test_byzantine_strategies_refuse_too_few_sites_at_start(strategy, min_sites, f, match):
    with pytest.raises(ConfigError, match=match):
        FederationConfig(strategy=strategy, min_sites=min_sites, robust=RobustConfig(num_malicious=f)).validate()
    FederationConfig(strategy=strategy, min_sites=4 * f + 3, robust=RobustConfig(num_malicious=f)).validate()


@pytest.mark.parametrize("section,match", [
    ({"trim_beta": 0.5}, "trim_beta must be in \\[0, 0.5\\)"), ({"trim_beta": -0.1}, "trim_beta"),
    ({"num_malicious": -1}, "num_malicious"), ({"clip_norm_ratio": 0}, "clip_norm_ratio"),
    ({"multikrum_keep": 0}, "multikrum_keep")])
def test_robust_settings_are_checked_when_the_file_is_read(tmp_path, section, match):
    from fedsubtype.federation.config import load_federation_config

    path = tmp_path / "federation.yaml"
    path.write_text(json.dumps({"strategy": "fedtrimmedavg", "robust": section}), encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_federation_config(path)


@pytest.mark.parametrize("section,match", [({"max_norm_ratio": 0.5}, "max_norm_ratio"),
                                           ({"max_examples": 0}, "max_examples")])
def test_reply_check_knobs_are_checked_when_the_file_is_read(tmp_path, section, match):
    from fedsubtype.federation.config import load_federation_config

    path = tmp_path / "federation.yaml"
    path.write_text(json.dumps({"reply_checks": section}), encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_federation_config(path)
    path.write_text(json.dumps({"reply_checks": {"max_norm_ratio": None, "max_examples": 5000}}), encoding="utf-8")
    assert load_federation_config(path).reply_checks.max_norm_ratio is None


def test_multikrum_keep_cannot_exceed_the_honest_sites():
    with pytest.raises(ConfigError, match="multikrum_keep 5 is more than"):
        FederationConfig(strategy="multikrum", min_sites=5, robust=RobustConfig(multikrum_keep=5)).validate()


def test_robust_strategies_are_flowers_own_with_the_configured_settings():
    from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

    from fedsubtype.federation.strategy import make_strategy

    robust = RobustConfig(num_malicious=1, trim_beta=0.3)
    built = {name: make_strategy(FederationConfig(strategy=name, min_sites=7, robust=robust))
             for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")}
    assert [type(s) for s in built.values()] == [FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan]
    assert built["fedtrimmedavg"].beta == 0.3 and built["krum"].num_malicious_nodes == 1
    assert built["multikrum"].num_nodes_to_select == 6 and built["bulyan"].num_malicious_nodes == 1
    assert all(s.min_train_nodes == 7 for s in built.values())


def test_robust_strategies_resist_one_scaled_update_on_the_packed_array(flower_ids):
    """They aggregate the one packed array the transport sends; one ×100 update moves FedAvg, not them."""
    from fedsubtype.federation.strategy import make_strategy

    rng = np.random.default_rng(0)
    honest = [(1.0 + 0.01 * rng.normal(size=64)).astype(np.float32) for _ in range(6)]
    evil = np.full(64, 100.0, np.float32)
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)
    robust = RobustConfig(num_malicious=1, trim_beta=0.2)
    for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        strategy = make_strategy(FederationConfig(strategy=name, min_sites=7, robust=robust))
        agg = strategy.aggregate_train(1, [_reply(w) for w in honest + [evil]])[0].to_numpy_ndarrays()  # pops arrays
        assert len(agg) == 1 and agg[0].shape == (64,), name
        assert ((agg[0] >= lo - 1e-6) & (agg[0] <= hi + 1e-6)).all(), name
    fedavg = make_strategy(FederationConfig(strategy="fedavg", min_sites=7))
    assert (fedavg.aggregate_train(1, [_reply(w) for w in honest + [evil]])[0].to_numpy_ndarrays()[0] > hi + 1).all()


def test_server_side_clipping_bounds_each_update_by_the_median_norm():
    base = np.zeros(4)
    flat = [np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32), np.full(4, 100.0, np.float32)]
    out = clip_updates(flat, base, 2.0)
    assert out[0] is flat[0] and out[1] is flat[1]  # within 2 × the median norm: untouched
    assert np.linalg.norm(out[2] - base) == pytest.approx(2.0 * np.linalg.norm(flat[1]), rel=1e-5)
    assert out[2].dtype == np.float32 and np.allclose(out[2] / out[2][0], 1.0)  # direction kept


def test_clipping_is_applied_before_aggregation(tmp_path, flower_ids):
    from fedsubtype.federation.rounds import run_rounds

    def scaled(reply):  # a ×5 update: under reply_checks.max_norm_ratio 10, so only clipping bounds it
        sent = _Grid.last_sent
        w = reply.content["arrays"].to_numpy_ndarrays()[0]
        reply.content["arrays"] = ArrayRecord([(sent + 5.0 * (w - sent)).astype(np.float32)])
        return reply

    run_rounds(_Grid(scaled), _tiny_cfg(tmp_path / "plain", min_sites=4), resume=False)
    run_rounds(_Grid(scaled), _tiny_cfg(tmp_path / "clipped", min_sites=4,
                                        robust=RobustConfig(clip_norm_ratio=1.5)), resume=False)
    honest = _tiny_cfg(tmp_path / "honest")
    grid = _Grid(lambda r: r)
    grid.SITES = {k: v for k, v in _Grid.SITES.items() if k != 14}
    run_rounds(grid, honest, resume=False)
    ref = _final(tmp_path / "honest")
    dist = {name: np.linalg.norm(_final(tmp_path / name) - ref) for name in ("plain", "clipped")}
    records = json.loads((tmp_path / "clipped" / "rounds.json").read_text(encoding="utf-8"))
    assert all(r["accepted"] and not r["failed"] for r in records)  # the ×5 site was clipped, not left out
    assert dist["clipped"] < dist["plain"] / 2


# ------------------------------------------------------------------ the simulation-only fault hook
def test_the_fault_sweep_keeps_the_clean_runs_identity():
    from simulation.scenario import load_scenario

    path = "simulation/scenarios/byzantine.yaml"
    scen = load_scenario(path)
    settings = dict(scen.settings())
    assert list(settings) == ["fault=none", "fault=sign_flip"]
    assert settings["fault=none"].fault is None and settings["fault=sign_flip"].fault.kind == "sign_flip"
    clean = load_scenario(path, {"sweep": None, "fault": None})
    assert settings["fault=none"].config_hash() == clean.config_hash()  # same runs as a scenario without faults
    assert settings["fault=sign_flip"].config_hash() != clean.config_hash()
    with pytest.raises(ConfigError, match="unknown fault 'melt'"):
        load_scenario(path, {"sweep.values": ["melt"]}).settings()


@pytest.mark.parametrize("kind", ["nan", "sign_flip", "scale", "inflate_examples"])
def test_the_fault_hook_corrupts_only_the_chosen_sites_training_reply(flower_ids, kind):
    from types import SimpleNamespace

    from simulation.flower_sim import PARTITION_ID_KEY, SiteNodeClientApp
    from simulation.scenario import FaultSpec

    sent = np.ones(4, np.float32)

    def app(message, context):
        return Message(RecordDict({"arrays": ArrayRecord([sent + 0.5]), "metrics": MetricRecord({**GOOD_TRAIN})}),
                       reply_to=message)

    wrapped = SiteNodeClientApp(app, {0: {}, 1: {}}, FaultSpec(kind=kind, site=1, factor=100))
    out = {}
    for partition, mtype in ((0, "train"), (1, "train"), (1, "evaluate")):
        msg = Message(RecordDict({"arrays": ArrayRecord([sent])}), dst_node_id=5, message_type=mtype)
        reply = wrapped(msg, SimpleNamespace(node_config={PARTITION_ID_KEY: partition}))
        out[(partition, mtype)] = (reply.content["arrays"].to_numpy_ndarrays()[0],
                                   reply.content["metrics"]["num-examples"])
    honest = (sent + 0.5, 20.0)
    for untouched in ((0, "train"), (1, "evaluate")):
        assert np.array_equal(out[untouched][0], honest[0]) and out[untouched][1] == honest[1]
    weights, count = out[(1, "train")]
    expected = {"nan": (np.full(4, np.nan), 20.0), "sign_flip": (sent - 50.0, 20.0), "scale": (sent + 50.0, 20.0),
                "inflate_examples": (sent + 0.5, 2000.0)}[kind]
    assert np.array_equal(weights, expected[0].astype(np.float32), equal_nan=True) and count == expected[1]


@pytest.mark.slow
def test_a_site_sending_nan_weights_on_the_real_engine_leaves_a_finite_model(tmp_path, phantom_cohort):
    """Real Flower simulation engine, real ClientApp/ServerApp: one of three sites sends NaN every round."""
    import torch
    import yaml

    from simulation.runner import run_study
    from simulation.scenario import load_scenario

    scenario = {
        "name": "nan-site", "output_dir": str(tmp_path / "out"),
        "data": {"manifest": str(phantom_cohort), "cache_dir": str(tmp_path / "cache"), "cache_workers": 1},
        "partition": {"kind": "natural", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
        "preprocess": {"size": 16}, "model": {"width": 4, "groups": 2, "feature_dim": 8, "hidden_dim": 8},
        "training": {"batch_size": 4, "augment": False},
        "federation": {"budget_epochs": 2, "local_epochs": 1, "min_sites": 2},
        "fault": {"kind": "nan", "site": 0}, "methods": [{"name": "fedavg"}], "seeds": [0],
        "ray": {"num_cpus": 2, "client_cpus": 1}, "evaluate_every_round": False,
    }
    (tmp_path / "scenario.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    outcome = run_study(load_scenario(tmp_path / "scenario.yaml"), say=lambda _: None)
    server = next((tmp_path / "out" / "runs").rglob("server"))
    trains = [r for r in json.loads((server / "rounds.json").read_text(encoding="utf-8")) if r["phase"] == "train"]
    assert [r["round"] for r in trains] == [1, 2] and all(r["accepted"] for r in trains)
    for r in trains:
        assert len(r["answered"]) == 2 and len(r["failed"]) == 1
        assert r["failed"][0].endswith("weights contain NaN or infinite values")
        assert r["failed"][0].split(":")[0] not in {a["site"] for a in r["answered"]}
    state = torch.load(server / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if torch.is_floating_point(t))
    assert outcome.ran == 1


def test_evaluation_replies_are_checked_too(flower_ids):
    from fedsubtype.federation.phase import reply_problem

    def evaluation(**metrics):
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=1, message_type="evaluate")

    assert reply_problem(evaluation(**{"num-examples": 6, "mean-auc": 0.7}), "evaluate", 100) is None
    assert "not a number" in reply_problem(evaluation(**{"num-examples": 6, "mean-auc": [0.7, 0.1]}), "evaluate", 100)
    assert "max_examples" in reply_problem(evaluation(**{"num-examples": 1e9}), "evaluate", 100)
    two = evaluation(**{"num-examples": 6})
    two.content["more"] = MetricRecord({"num-examples": 1})
    assert "one metric record" in reply_problem(two, "evaluate", 100)


def test_a_count_declared_at_enrolment_bounds_replies_from_the_first_round():
    from fedsubtype.federation.reply_checks import count_bounds

    bounds = count_bounds({5: 20.0}, {"site1": 50, "site2": 10, "site3": None}, {5: "site1", 6: "site2", 7: "site3"})
    assert bounds == {5: 20.0, 6: 10.0}  # the tighter of first and declared; no bound where nothing is known
    assert count_problem(4900, "train", 100_000, bounds.get(6)) is not None  # inflated from round 1: caught
    assert count_problem(10, "train", 100_000, bounds.get(6)) is None
    # the name a reply gives is not trusted: bounds follow the registered node ids only
    assert count_bounds({}, {"site1": 5}, {}) == {}


def test_declared_examples_must_be_positive(tmp_path):
    from fedsubtype.errors import ConfigError
    from fedsubtype.federation.config import FederationConfig, SiteEntry

    cfg = FederationConfig(run_dir=tmp_path, min_sites=1,
                           sites=[SiteEntry("site1", tmp_path / "k.pub", declared_examples=0)])
    with pytest.raises(ConfigError, match="declared_examples"):
        cfg.validate("federation.yaml")
