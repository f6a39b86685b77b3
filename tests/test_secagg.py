"""Secure aggregation (issue 25) in-process: the coordinator's SecAgg+ stages against Flower's own
`secaggplus_mod` at the sites (through fedsubtype's adapter), on a grid that delivers every message to a
real ClientApp with its own per-node Context. The aggregate equals the plain weighted mean within the
quantisation bound, dropped sites are unmasked up to the threshold, and a failed round keeps the model."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsubtype.errors import ConfigError
from fedsubtype.federation.config import FederationConfig, load_federation_config
from fedsubtype.federation.secagg_mod import secure_aggregation_mod
from fedsubtype.federation.secure_aggregation import (SecureAggregationConfig, protocol_for, quantization_for,
                                                      threshold_for)

TRAIN_METRICS = {"train-loss": 0.5, "steps": 3.0, "samples-seen": 60.0, "seconds": 1.0,
                 "proximal-term": float("nan"), "epsilon": float("nan"), "delta": float("nan")}


@pytest.fixture
def flower_ids(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def update_of(node: int, size: int) -> np.ndarray:
    """Site `node`'s made-up update: a few hundredths, different per site."""
    return np.random.default_rng(node).normal(0.0, 0.02, size).astype(np.float32)


def fake_site(count: int, inner_mods: tuple = ()) -> ClientApp:
    """A ClientApp with the real SecAgg+ adapter whose training adds `update_of(node)` to the weights sent."""
    app = ClientApp(mods=[secure_aggregation_mod, *inner_mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = msg.content["arrays"].to_numpy_ndarrays()[0]
        new = sent + update_of(context.node_id, sent.size)
        return Message(RecordDict({"arrays": ArrayRecord([new]),
                                   "metrics": MetricRecord({"num-examples": float(count), **TRAIN_METRICS}),
                                   "site": ConfigRecord({"name": f"site{context.node_id}"})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5.0, "mean-auc": 0.6}),
                                   "site": ConfigRecord({"name": f"site{context.node_id}"})}), reply_to=msg)
    return app


def wire_copy(msg: Message) -> Message:
    """The message as it goes over the network (serialised and read back)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(msg))


class AppGrid:
    """Delivers each pushed message to its node's ClientApp, in-process; `drop` makes a node stop answering
    from a SecAgg+ stage on ("setup", "share_keys", "collect_masked_vectors", "unmask")."""

    def __init__(self, apps: dict[int, ClientApp], drop: dict[int, str] | None = None,
                 node_configs: dict[int, dict[str, str]] | None = None) -> None:
        self.apps, self.drop, self.pushed, self.ids = apps, drop or {}, {}, itertools.count()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict((node_configs or {}).get(n, {})),
                                    state=RecordDict(), run_config={}) for n in apps}
        self.dead: set[int] = set()
        self.replies: list[tuple[str, Message]] = []

    def get_node_ids(self):
        return list(self.apps)

    def push_messages(self, messages):
        ids = [f"msg-{next(self.ids)}" for _ in messages]
        for message_id, m in zip(ids, messages):
            m.metadata.__dict__["_message_id"] = message_id
        self.pushed.update(zip(ids, messages))
        return ids

    def pull_messages(self, ids):
        out = []
        for i in list(ids):
            msg = self.pushed.pop(i, None)
            if msg is None:
                continue
            node = int(msg.metadata.dst_node_id)
            stage = msg.content["secaggplus_configs"]["stage"] if "secaggplus_configs" in msg.content else ""
            if self.drop.get(node) == stage:
                self.dead.add(node)
            if node in self.dead:
                continue
            reply = self.apps[node](msg, self.contexts[node])
            self.replies.append((str(stage), wire_copy(reply)))  # as sent: the coordinator may change its own
            out.append(reply)
        return out


def _cfg(tmp_path, **sa) -> FederationConfig:
    cfg = FederationConfig(run_dir=tmp_path, rounds=1, strategy="fedavg", min_sites=2, round_timeout_s=0.5,
                           secure_aggregation=SecureAggregationConfig(enabled=True, **sa))
    cfg.model.width, cfg.model.groups, cfg.model.feature_dim, cfg.model.hidden_dim = 8, 4, 16, 16
    return cfg


def _train_messages(nodes, weights: np.ndarray) -> list[Message]:
    return [Message(RecordDict({"arrays": ArrayRecord([weights]), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train") for n in nodes]


COUNTS = {11: 20, 12: 35, 13: 7, 14: 50, 15: 12}


def _plain_mean(nodes, weights: np.ndarray) -> np.ndarray:
    """The example-weighted mean of the updates the sites send (float32 weights after training, minus the sent)."""
    total = sum(COUNTS[n] for n in nodes)
    sent = weights.astype(np.float64)
    return sum(COUNTS[n] * ((weights + update_of(n, weights.size)).astype(np.float64) - sent) for n in nodes) / total


@pytest.mark.parametrize("nodes,max_weight", [((11, 12, 13), 50), ((11, 12, 13, 14, 15), 50),
                                              ((11, 12, 13), None)])
def test_the_secure_mean_is_the_plain_weighted_mean_within_the_quantisation_bound(tmp_path, flower_ids, nodes,
                                                                                     max_weight):
    from fedsubtype.federation.secagg_round import round_max_weight, secure_train

    cfg = _cfg(tmp_path, max_weight=max_weight)
    weights = np.random.default_rng(0).normal(0, 1, 3000).astype(np.float32)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in nodes})
    record, replies, mean = secure_train(grid, cfg, _train_messages(nodes, weights), 1, {}, [weights.shape])
    assert record.accepted and not record.failed and len(replies) == len(nodes)
    assert sorted(r.node_id for r in record.answered) == sorted(nodes)
    proto = protocol_for(cfg.secure_aggregation, len(nodes), round_max_weight(cfg, list(nodes), {}))
    bound = proto.error_bound([COUNTS[n] for n in nodes], largest_update=0.2)
    error = np.abs(mean[0] - _plain_mean(nodes, weights)).max()
    assert error <= bound, (error, bound)
    assert bound < (1e-5 if max_weight else 1e-3)  # a tight max_weight gives a much finer quantisation


def test_a_first_round_update_with_the_read_outs_fitted_start_is_not_clipped(tmp_path, flower_ids, monkeypatch):
    """Round 1 moves the read-outs from zero to their fit (centres of the region statistics, a log volume
    fraction near -9): the default clipping range must pass such values whole."""
    from fedsubtype.federation.secagg_round import round_max_weight, secure_train

    small = update_of

    def with_fitted_start(node: int, size: int) -> np.ndarray:
        update = small(node, size)
        update[:4] = (-9.0 + node / 10, 4.1, -2.5, 7.0)
        return update

    monkeypatch.setattr(sys.modules[__name__], "update_of", with_fitted_start)
    nodes = (11, 12, 13)
    cfg = _cfg(tmp_path, max_weight=50)
    weights = np.zeros(600, dtype=np.float32)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in nodes})
    record, _, mean = secure_train(grid, cfg, _train_messages(nodes, weights), 1, {}, [weights.shape])
    assert record.accepted
    proto = protocol_for(cfg.secure_aggregation, len(nodes), round_max_weight(cfg, list(nodes), {}))
    error = np.abs(mean[0] - _plain_mean(nodes, weights)).max()
    assert error <= proto.error_bound([COUNTS[n] for n in nodes], largest_update=9.0) < 1e-5


def test_a_site_dropping_after_the_key_shares_is_unmasked_and_left_out(tmp_path, flower_ids):
    from fedsubtype.federation.secagg_round import secure_train

    nodes = (11, 12, 13)
    cfg = _cfg(tmp_path, max_weight=50)
    weights = np.zeros(500, np.float32)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in nodes}, drop={13: "collect_masked_vectors"})
    record, replies, mean = secure_train(grid, cfg, _train_messages(nodes, weights), 1, {}, [weights.shape])
    assert record.accepted, record.failed
    assert sorted(r.node_id for r in record.answered) == [11, 12]
    assert any("node 13: no answer within" in line for line in record.failed), record.failed
    proto = protocol_for(cfg.secure_aggregation, 3, 50)
    assert np.abs(mean[0] - _plain_mean((11, 12), weights)).max() <= proto.error_bound([20, 35], largest_update=0.2)


def test_below_the_threshold_the_round_fails_with_its_reason_and_the_model_stays(tmp_path, flower_ids):
    import torch

    from fedsubtype.federation.rounds import run_rounds

    cfg = _cfg(tmp_path, max_weight=50)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in (11, 12, 13)},
                   drop={12: "collect_masked_vectors", 13: "collect_masked_vectors"})
    run_rounds(grid, cfg, resume=False)
    train = [r for r in json.loads((tmp_path / "rounds.json").read_text(encoding="utf-8")) if r["phase"] == "train"]
    assert not train[0]["accepted"]
    reason = [line for line in train[0]["failed"] if line.startswith("secure aggregation:")]
    assert reason and "reconstruction_threshold" in reason[0], train[0]["failed"]
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import build_model
    from fedsubtype.train.runtime import seed_everything

    seed_everything(cfg.seed)
    initial = get_weights(build_model(cfg.model))
    kept = torch.load(tmp_path / "checkpoints" / "round_001.pt", weights_only=True)["weights"]
    assert all(np.array_equal(a, t.numpy()) for a, t in zip(initial, kept))


def test_replies_in_the_round_carry_only_masked_integers(tmp_path, flower_ids):
    from fedsubtype.federation.secagg_round import secure_train

    nodes = (11, 12, 13)
    weights = np.random.default_rng(1).normal(0, 1, 2000).astype(np.float32)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in nodes})
    secure_train(grid, _cfg(tmp_path, max_weight=50), _train_messages(nodes, weights), 1, {}, [weights.shape])
    masked = [r for stage, r in grid.replies if stage == "collect_masked_vectors"]
    assert len(masked) == 3
    for reply in masked:
        assert not reply.content.array_records  # no weights, no update
        assert set(reply.content.config_records) == {"site", "secaggplus_configs"}
        vector = np.frombuffer(b"".join(reply.content["secaggplus_configs"]["masked_params"]), np.uint8)
        assert weights.nbytes < vector.size < 1.1 * weights.nbytes
    from flwr.common import bytes_to_ndarray

    values = bytes_to_ndarray(masked[0].content["secaggplus_configs"]["masked_params"][1])
    assert values.dtype == np.uint32  # below the 2^32 modulus: 4 bytes a value, as the float32 weights
    # the plain quantised update sits in a narrow band around 2^29 / 2; masked values fill [0, 2^32) evenly
    assert abs(values.mean() / 2**31 - 1) < 0.05 and (values > 2**31).mean() > 0.4


def test_defaults_follow_the_number_of_sites():
    assert threshold_for(3) == 2 and threshold_for(5) == 3 and threshold_for(2) == 2
    assert quantization_for(3) == 2**29 and quantization_for(2) == 2**30 and quantization_for(9) == 2**27
    proto = protocol_for(SecureAggregationConfig(enabled=True), 3, 40)
    assert (proto.num_shares, proto.threshold, proto.quantization_range, proto.max_weight) == (3, 2, 2**29, 40.0)
    assert protocol_for(SecureAggregationConfig(enabled=True, num_shares=4), 7, 40).num_shares == 5  # odd
    assert "at least 2" in protocol_for(SecureAggregationConfig(enabled=True), 1, 40)


@pytest.mark.parametrize("fed,key", [
    ({"strategy": "krum", "min_sites": 5}, "strategy"),
    ({"strategy": "fedmedian"}, "strategy"),
    ({"robust": {"clip_norm_ratio": 2.0}}, "robust.clip_norm_ratio"),
    ({"reply_checks": {"max_norm_ratio": 10.0}}, "reply_checks.max_norm_ratio"),
    ({"site_level_dp": {"enabled": True, "side": "server"}}, "site_level_dp.side"),
    ({"min_sites": 1}, "min_sites"),
    ({"min_sites": 2, "secure_aggregation": {"enabled": True, "reconstruction_threshold": 3}},
     "reconstruction_threshold"),
    ({"secure_aggregation": {"enabled": True, "num_shares": 3, "reconstruction_threshold": 4}},
     "reconstruction_threshold"),
])
def test_combinations_that_cannot_hold_are_refused_in_one_line(tmp_path, fed, key):
    import yaml

    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({"secure_aggregation": {"enabled": True}, "min_sites": 3, **fed}))
    with pytest.raises(ConfigError) as err:
        load_federation_config(path)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_fedavg_fedprox_and_client_side_site_dp_are_accepted(tmp_path):
    import yaml

    for fed in ({"strategy": "fedavg"}, {"strategy": "fedprox"},
                {"site_level_dp": {"enabled": True, "side": "client"}}, {"reply_checks": {"max_norm_ratio": None}}):
        path = tmp_path / "federation.yaml"
        path.write_text(yaml.safe_dump({"secure_aggregation": {"enabled": True}, "min_sites": 3, **fed}))
        assert load_federation_config(path).secure_aggregation.enabled


def _checkpoint(run_dir, rnd: int) -> np.ndarray:
    import torch

    payload = torch.load(run_dir / "checkpoints" / f"round_{rnd:03d}.pt", weights_only=True)
    return np.concatenate([t.numpy().ravel() for t in payload["weights"]])


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_the_round_loop_moves_the_global_model_by_the_secure_mean(tmp_path, flower_ids, strategy):
    from fedsubtype.federation.rounds import run_rounds

    nodes = (11, 12, 13)
    cfg = _cfg(tmp_path, max_weight=50)
    cfg.strategy, cfg.rounds = strategy, 2
    run_rounds(AppGrid({n: fake_site(COUNTS[n]) for n in nodes}), cfg, resume=False)
    records = json.loads((tmp_path / "rounds.json").read_text(encoding="utf-8"))
    train = [r for r in records if r["phase"] == "train"]
    assert all(r["accepted"] and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in train)
    assert train[0]["aggregated"]["num-examples"] == sum(COUNTS[n] for n in nodes)
    first, second = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    bound = protocol_for(cfg.secure_aggregation, 3, 50).error_bound([COUNTS[n] for n in nodes], 0.2)
    assert np.abs((second - first) - _plain_mean(nodes, first)).max() <= bound + 1e-6  # float32 weights
    assert (tmp_path / "model.pt").is_file()


@pytest.fixture(scope="module")
def site_files(phantom_cohort, tmp_path_factory):
    import yaml

    from fedutil import manifest_of

    tmp = tmp_path_factory.mktemp("secagg-sites")
    files = {}
    for node, name in ((21, "site1"), (22, "site2"), (23, "site3")):
        files[node] = tmp / f"{name}.yaml"
        files[node].write_text(yaml.safe_dump({
            "name": name, "manifest": str(manifest_of(phantom_cohort)), "manifest_site": name,
            "cache": str(tmp / "cache"), "work_dir": str(tmp / f"state-{name}"), "threads": 1,
            "preprocess": {"size": 16}}))
    return files


def recording_app(plain: dict[int, tuple[np.ndarray, np.ndarray, float]]) -> ClientApp:
    """The real ClientApp's mods and handlers, plus a probe inside the site (between the SecAgg+ adapter and
    the handler) that keeps each site's plain (sent, trained weights, count) for the test's reference mean."""
    import client.client_app as real

    def probe(msg: Message, ctxt: Context, call_next) -> Message:
        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == "train":
            plain[ctxt.node_id] = (msg.content["arrays"].to_numpy_ndarrays()[0],
                                   reply.content["arrays"].to_numpy_ndarrays()[0],
                                   float(reply.content["metrics"]["num-examples"]))
        return reply

    assert real.app._mods[0] is secure_aggregation_mod  # the deployed app masks outermost
    app = ClientApp(mods=[real.app._mods[0], probe, *real.app._mods[1:]])
    app.train()(real.train)
    app.evaluate()(real.evaluate)
    return app


def test_the_real_clientapp_sends_only_masked_updates_and_the_mean_is_the_plain_one(tmp_path, flower_ids,
                                                                                    site_files):
    """Phantom sites, real training: no training reply holds an array, and the new global model is the
    example-weighted mean of the sites' trained weights within the quantisation bound."""
    from fedsubtype.federation.rounds import run_rounds
    from fedutil import TINY_MODEL

    cfg = FederationConfig(run_dir=tmp_path, rounds=1, strategy="fedprox", min_sites=3, local_steps=2, batch_size=4,
                           augment=False, round_timeout_s=300,
                           secure_aggregation=SecureAggregationConfig(enabled=True))
    cfg.model.width, cfg.model.groups = TINY_MODEL["width"], TINY_MODEL["groups"]
    cfg.model.feature_dim, cfg.model.hidden_dim = TINY_MODEL["feature_dim"], TINY_MODEL["hidden_dim"]
    cfg.preprocess.size = 16
    plain: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    app = recording_app(plain)
    grid = AppGrid({n: app for n in site_files}, node_configs={n: {"site-config": str(p)}
                                                               for n, p in site_files.items()})
    run_rounds(grid, cfg, resume=False)
    masked = [r for stage, r in grid.replies if stage == "collect_masked_vectors"]
    assert len(masked) == 3 and all(not r.has_error() for r in masked)
    for reply in masked:
        assert not reply.content.array_records
        assert set(reply.content.config_records) == {"site", "secaggplus_configs"}
        assert set(reply.content.metric_records) == {"metrics"}
    sent = next(iter(plain.values()))[0].astype(np.float64)
    counts = [c for _, _, c in plain.values()]
    reference = sent + sum(c * (t.astype(np.float64) - sent) for _, t, c in plain.values()) / sum(counts)
    largest = max(np.abs(t.astype(np.float64) - sent).max() for _, t, _ in plain.values())
    proto = protocol_for(SecureAggregationConfig(enabled=True), 3, 100_000)  # round 1: no declared counts yet
    error = np.abs(_checkpoint(tmp_path, 1) - reference).max()
    assert error <= proto.error_bound(counts, largest) + 1e-6, error  # + float32 rounding of the weights


def test_masks_come_from_the_whole_secret_at_the_sites_and_the_coordinator():
    """Flower 1.42 folds a mask's 32-byte secret to 32 bits; secrets with the same fold must still differ."""
    import importlib

    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from fedsubtype.federation.secure_aggregation import mask_generator

    a = bytes(range(32))
    b = bytes(range(4, 8)) + bytes(range(4)) + bytes(range(8, 32))  # two 4-byte words swapped: same XOR fold
    assert np.array_equal(pseudo_rand_gen(a, 2**32, [(50,)])[0], pseudo_rand_gen(b, 2**32, [(50,)])[0])
    assert not np.array_equal(mask_generator(a, 2**32, [(50,)])[0], mask_generator(b, 2**32, [(50,)])[0])
    flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    assert flower_mod.pseudo_rand_gen is mask_generator  # installed by fedsubtype.federation.secagg_mod
    masks = mask_generator(a, 2**32, [(), (3, 4)])
    assert masks[0].shape == () and masks[1].shape == (3, 4) and all(m.dtype == np.int64 for m in masks)


def test_garbage_from_a_site_fails_the_round_not_the_run(tmp_path, flower_ids):
    """A site whose unmask answer holds garbage shares: the round is failed with one line, nothing raises."""
    from fedsubtype.federation.secagg_round import secure_train

    nodes = (11, 12, 13)
    weights = np.zeros(100, np.float32)
    grid = AppGrid({n: fake_site(COUNTS[n]) for n in nodes})
    honest = grid.apps[13]

    def lying(msg, ctx):
        reply = honest(msg, ctx)
        if not reply.has_error() and reply.content["secaggplus_configs"].get("shares"):
            reply.content["secaggplus_configs"]["shares"] = [b"\x01" * 8 for _ in reply.content["secaggplus_configs"]
                                                             ["shares"]]
        return reply

    grid.apps[13] = lying
    record, replies, mean = secure_train(grid, _cfg(tmp_path, max_weight=50), _train_messages(nodes, weights), 1,
                                         {}, [weights.shape])
    assert mean is None and not record.accepted and replies == []
    assert any(line.startswith("secure aggregation:") for line in record.failed), record.failed


def test_client_side_site_level_clipping_happens_before_masking(tmp_path, flower_ids):
    """site_level_dp side client: each site clips its update (Flower's mod, inside the SecAgg+ adapter), so the
    secure mean of three updates of norm ~0.02·√2000 moves the model by at most the clipping norm."""
    from fedsubtype.federation.rounds import run_rounds
    from fedsubtype.privacy.site_level import SiteLevelDPConfig, site_level_clipping_mod

    clip = 0.05
    # the deployed order: SecAgg+ adapter outside, clipping inside
    apps = {n: fake_site(COUNTS[n], (site_level_clipping_mod,)) for n in (11, 12, 13)}
    cfg = _cfg(tmp_path, max_weight=50)
    cfg.min_sites = 3
    cfg.site_level_dp = SiteLevelDPConfig(enabled=True, side="client", clipping_norm=clip, noise_multiplier=0.0)
    cfg.validate()
    run_rounds(AppGrid(apps), cfg, resume=False)
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import build_model
    from fedsubtype.train.runtime import seed_everything

    seed_everything(cfg.seed)
    start = np.concatenate([w.ravel() for w in get_weights(build_model(cfg.model))]).astype(np.float64)
    moved = float(np.linalg.norm(_checkpoint(tmp_path, 1) - start))
    assert 0 < moved <= clip * 1.001, moved
