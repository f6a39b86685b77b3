"""Federation pieces without processes: credentials, site/federation schemas, weights on the wire,
the run folder (metrics, checkpoints), the metric aggregation and the client's refusals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsubtype.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ credentials
def test_dev_credentials_chain_and_site_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedsubtype.federation.credentials import check_public_key_file, create_dev_credentials

    paths = create_dev_credentials(tmp_path / "c", ["a", "b"], ["localhost", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the server certificate is not signed by the CA
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for site in ("a", "b"):
        key = serialization.load_ssh_private_key(paths.site_private_keys[site].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert paths.site_private_keys[site].stat().st_mode & 0o077 == 0  # private keys are owner-only
        check_public_key_file(paths.site_public_keys[site], where="test")
    with pytest.raises(UserError, match="already exist"):
        create_dev_credentials(tmp_path / "c", ["a"])
    with pytest.raises(UserError, match="invalid site name"):
        create_dev_credentials(tmp_path / "d", ["bad name"])


def test_credentials_cli_writes_the_files(tmp_path, capsys):
    from fedsubtype.cli.server_cli import main

    assert main(["credentials", "--out", str(tmp_path / "c"), "--sites", "x,y", "--hosts", "localhost"]) == 0
    assert {p.name for p in (tmp_path / "c" / "sites").iterdir()} == {"x.key", "x.pub", "y.key", "y.pub"}
    assert main(["credentials", "--out", str(tmp_path / "c"), "--sites", "x"]) == 1
    assert "already exist" in capsys.readouterr().err


# ------------------------------------------------------------------ site.yaml / federation.yaml
def test_site_templates_and_examples_load():
    from fedsubtype.federation.config import load_federation_config
    from fedsubtype.federation.site_config import load_site_config

    for name in ("site.template.yaml", "site1.yaml", "site2.yaml", "site3.yaml"):
        cfg = load_site_config(REPO / "site_configs" / name)
        assert cfg.manifest.is_absolute() and cfg.source is not None
    ports = {load_site_config(REPO / "site_configs" / f"site{i}.yaml").local_port for i in (1, 2, 3)}
    assert len(ports) == 3  # sites sharing a machine need their own local ports
    fed = load_federation_config(REPO / "site_configs" / "federation.yaml")
    assert [s.name for s in fed.sites] == ["site1", "site2", "site3"] and fed.strategy == "fedprox"


@pytest.mark.parametrize("text,key", [
    ("name: a\nmanifest: m.csv\nthreds: 2\n", "threds"),
    ("name: a\nmanifest: m.csv\nsuperlink: nohostport\n", "superlink"),
    ("name: a b\nmanifest: m.csv\n", "name"),
    ("name: a\nmanifest: m.csv\nval_fraction: 1.5\n", "val_fraction"),
    ("name: a\n", "manifest"),
])
def test_site_file_errors_name_the_key(tmp_path, text, key):
    from fedsubtype.federation.site_config import load_site_config

    path = tmp_path / "site.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert key in err.value.line() and "\n" not in err.value.line()


def test_site_paths_resolve_against_the_site_file(tmp_path):
    from fedsubtype.federation.site_config import load_site_config

    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "site.yaml"
    path.write_text("name: a\nmanifest: data/m.csv\nca_certificate: ../ca.crt\n", encoding="utf-8")
    cfg = load_site_config(path)
    assert cfg.manifest == tmp_path / "sub" / "data" / "m.csv"
    assert cfg.ca_certificate == tmp_path / "ca.crt"
    assert cfg.state_dir() == tmp_path / "sub" / ".fedsubtype-site-a"


def test_federation_file_checks(tmp_path):
    from fedsubtype.federation.config import load_federation_config

    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"sites": [{"name": "a", "public_key": "a.pub"}], "min_sites": 2}), encoding="utf-8")
    with pytest.raises(ConfigError, match="min_sites"):
        load_federation_config(path)
    path.write_text(yaml.safe_dump({"sites": [{"name": "a", "public_key": "a.pub"}], "min_sites": 1,
                                    "strategy": "fedsgd"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="strategy"):
        load_federation_config(path)
    path.write_text(yaml.safe_dump({"sites": [{"name": "a", "public_key": "a.pub"}], "min_sites": 1}), encoding="utf-8")
    cfg = load_federation_config(path)
    with pytest.raises(UserError, match="public_key"):
        cfg.check_files(str(path))  # the key file does not exist


def test_client_refuses_insecure_without_permission(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main

    path = tmp_path / "site.yaml"
    path.write_text("name: a\nmanifest: m.csv\n", encoding="utf-8")
    assert main(["--site", str(path), "--insecure"]) == 1
    err = capsys.readouterr().err
    assert "allow_insecure: true" in err and "Traceback" not in err and err.count("\n") == 1


def test_client_reports_missing_credentials_in_one_line(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main

    (tmp_path / "m.csv").write_text("case_id,image,mask,site,er,pr,her2,ki67\n", encoding="utf-8")
    path = tmp_path / "site.yaml"
    path.write_text("name: a\nmanifest: m.csv\nca_certificate: nowhere.crt\nauth_private_key: a.key\n", encoding="utf-8")
    assert main(["--site", str(path)]) == 1
    err = capsys.readouterr().err
    assert "ca_certificate" in err and "not found" in err and "Traceback" not in err


def test_client_failure_reasons():
    from fedsubtype.federation.site_node import classify_failure

    assert "not registered" in classify_failure("[code: 2004] Failed to activate SuperNode.").line()
    assert "certificate" in classify_failure("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed").line()
    assert "could not reconnect" in classify_failure("[Errno 111] Connection refused").line()


def test_superlink_unreachable_is_one_clear_error():
    from fedsubtype.federation.processes import wait_for_port

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(UserError, match="cannot reach the SuperLink"):
            wait_for_port("127.0.0.1", port, retries=1, timeout_s=5, say=lambda m: None)


# ------------------------------------------------------------------ weights on the wire
def _tiny_model():
    from fedsubtype.model import ModelConfig, build_model

    return build_model(ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16))


def test_weights_round_trip_and_local_norm():
    import torch

    from fedsubtype.federation.site_algo import get_weights, norm_parameter_names, set_weights

    torch.manual_seed(0)
    a, b = _tiny_model(), _tiny_model()
    wa = get_weights(a)
    assert all(isinstance(w, np.ndarray) for w in wa) and len(wa) == len(a.state_dict())
    set_weights(b, wa)
    assert all(np.array_equal(x, y) for x, y in zip(wa, get_weights(b)))
    norms = norm_parameter_names(b)
    assert norms and all(n in b.state_dict() for n in norms)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    set_weights(b, [w + 1.0 for w in wa], keep=norms)
    after = b.state_dict()
    for name in after:
        same = torch.equal(after[name], before[name])
        assert same == (name in norms), name
    with pytest.raises(ValueError, match="arrays"):
        set_weights(b, wa[:-1])


def test_round_settings_refuse_privacy_overrides():
    from fedsubtype.federation.site_algo import RoundSettings

    s = RoundSettings.from_config({"server-round": 3, "local-steps": 0, "proximal-mu": 0.1, "lr": 0.01})
    assert (s.server_round, s.local_steps, s.proximal_mu, s.lr) == (3, None, 0.1, 0.01)
    with pytest.raises(UserError, match="privacy"):
        RoundSettings.from_config({"privacy-epsilon": 100.0})


def test_check_metrics_is_an_exact_allow_list():
    from fedsubtype.federation.site_algo import TRAIN_METRIC_KEYS, check_metrics

    good = {k: 1.0 for k in TRAIN_METRIC_KEYS}
    assert check_metrics(good, TRAIN_METRIC_KEYS) == good
    with pytest.raises(ValueError, match="extra"):
        check_metrics({**good, "case_id": 1.0}, TRAIN_METRIC_KEYS)


# ------------------------------------------------------------------ run folder
def test_runstore_metrics_checkpoints_and_final_model(tmp_path):
    from fedsubtype.train.checkpoint import load_model
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import ModelConfig
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.federation.runstore import RoundRecord, RunStore, SiteResult

    store = RunStore(tmp_path / "run")
    for rnd in (1, 2):
        store.add(RoundRecord(rnd, "train", 2, [SiteResult("a", 1, {"num-examples": 3.0, "train-loss": 0.5}),
                                                 SiteResult("b", 2, {"num-examples": 5.0, "train-loss": float("nan")})],
                              ["node 3: no answer"], {"num-examples": 8.0, "train-loss": 0.5}))
        store.add(RoundRecord(rnd, "evaluate", 2, [], [], {"mean-auc": 0.6 + rnd / 10}))
    data = json.loads((tmp_path / "run" / "rounds.json").read_text(encoding="utf-8"))
    assert [r["round"] for r in data] == [1, 1, 2, 2]
    assert data[0]["answered"][1]["metrics"]["train-loss"] is None  # NaN written as null
    site_csv = (tmp_path / "run" / "metrics_per_site.csv").read_text(encoding="utf-8").splitlines()
    assert site_csv[0].startswith("round,phase,site") and len(site_csv) == 1 + 4
    assert store.last_evaluation()["mean-auc"] == pytest.approx(0.8)

    model_cfg = ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16)
    weights = get_weights(_tiny_model())
    moments = {"m_t": {"0": np.ones(3, dtype=np.float32)}}
    store.save_checkpoint(1, weights, "fedadam", moments)
    store.save_checkpoint(2, [w * 2 for w in weights], "fedadam", moments)
    rnd, got, strategy, state = RunStore(tmp_path / "run").latest_checkpoint()
    assert (rnd, strategy) == (2, "fedadam")
    assert all(np.array_equal(g, w * 2) for g, w in zip(got, weights))
    assert [g.shape for g in got] == [w.shape for w in weights] and any(w.ndim == 0 for w in weights)  # 0-d buffers stay 0-d
    assert np.array_equal(state["m_t"]["0"], np.ones(3))

    store.truncate_after(1)
    assert [r["round"] for r in RunStore(tmp_path / "run").records] == [1, 1]

    path = store.save_final_model(weights, model_cfg, PreprocessConfig(size=16), {"source": "federated"})
    model, bundle = load_model(path)
    assert bundle.metadata["source"] == "federated"
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(model), weights))


def test_nan_aware_aggregation():
    from flwr.app import MetricRecord, RecordDict

    from fedsubtype.federation.strategy import nan_aware_mean

    recs = [RecordDict({"metrics": MetricRecord({"num-examples": 1.0, "auc": 0.5, "eps": float("nan")})}),
            RecordDict({"metrics": MetricRecord({"num-examples": 3.0, "auc": 0.9, "eps": float("nan")})}),
            RecordDict({"metrics": MetricRecord({"num-examples": 4.0, "auc": float("nan"), "eps": float("nan")})})]
    agg = nan_aware_mean(recs, "num-examples")
    assert agg["num-examples"] == 8.0
    assert agg["auc"] == pytest.approx((0.5 + 3 * 0.9) / 4)
    assert "eps" not in agg or math.isnan(agg["eps"])


def test_strategies_are_built_from_the_config():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.rounds import round_config
    from fedsubtype.federation.strategy import make_strategy

    for name, cls in (("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)):
        strategy = make_strategy(FederationConfig(strategy=name, min_sites=2, proximal_mu=0.3))
        assert type(strategy) is cls
        assert strategy.min_train_nodes == 2 and strategy.min_available_nodes == 2
    assert make_strategy(FederationConfig(strategy="fedprox", proximal_mu=0.3)).proximal_mu == 0.3
    rc = round_config(FederationConfig(local_steps=5), "rid")
    assert rc["local-steps"] == 5 and rc["run-id"] == "rid" and json.loads(rc["model-config"])["variant"] == "full"



def test_launch_json_is_the_servers_only_configuration_source(tmp_path):
    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.launch import read_launch, write_launch

    with pytest.raises(ConfigError) as err:
        read_launch({"run-dir": str(tmp_path)})  # plain `flwr run .` with no prepared run folder
    assert "fedsubtype-server" in err.value.line() and "\n" not in err.value.line()
    cfg = FederationConfig(run_dir=tmp_path, rounds=7, strategy="fedadam", seed=3)
    write_launch(tmp_path, cfg, resume=True)
    got, resume = read_launch({"run-dir": str(tmp_path), "num-server-rounds": 2})
    assert resume and (got.rounds, got.strategy, got.seed) == (7, "fedadam", 3)


def test_plain_flwr_run_config_names_only_the_run_folder():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert list(config) == ["run-dir"]

def test_sparse_evaluation_always_scores_the_last_round():
    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.rounds import evaluates_after

    every = FederationConfig(rounds=5)
    assert [r for r in range(1, 6) if evaluates_after(r, every)] == [1, 2, 3, 4, 5]
    assert [r for r in range(1, 6) if evaluates_after(r, FederationConfig(rounds=5, evaluate_every=2))] == [2, 4, 5]
    assert [r for r in range(1, 6) if evaluates_after(r, FederationConfig(rounds=5, evaluate_every=0))] == [5]
    with pytest.raises(ConfigError, match="evaluate_every"):
        FederationConfig(evaluate_every=-1).validate()


class _SlowGrid:
    """Replies to each pushed message after `delay_pulls` pulls; `never` ids are never answered."""

    def __init__(self, delay_pulls: int, never: set[str] = frozenset()):
        self.delay, self.never, self.pulls = delay_pulls, set(never), 0

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, ids):
        from types import SimpleNamespace

        self.pulls += 1
        if self.pulls < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if i not in self.never]


def test_exchange_polls_until_every_reply_or_the_timeout():
    from fedsubtype.federation.phase import exchange

    grid = _SlowGrid(delay_pulls=3)
    replies = exchange(grid, ["a", "b"], timeout=10, poll_s=0.01)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"] and grid.pulls == 3

    grid = _SlowGrid(delay_pulls=1, never={"b"})
    replies = exchange(grid, ["a", "b"], timeout=0.1, poll_s=0.01)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"] and grid.pulls > 1


class _BlockingPullGrid(_SlowGrid):
    """The first pull blocks past the deadline (a dead site's objects being retried) and returns only 'a';
    'b' reached the SuperLink meanwhile."""

    def pull_messages(self, ids):
        if self.pulls == 0:
            time.sleep(0.2)
            ids = [i for i in ids if i == "a"]
        return super().pull_messages(ids)


def test_a_reply_that_arrived_while_a_pull_blocked_past_the_deadline_still_counts():
    from fedsubtype.federation.phase import exchange

    grid = _BlockingPullGrid(delay_pulls=1)
    replies = exchange(grid, ["a", "b"], timeout=0.1, poll_s=0.01)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"] and grid.pulls == 2


class _ArrivalOrderGrid:
    """A SuperLink stand-in: numbers pushed messages and answers them all at once, in `order` of node ids."""

    def __init__(self, order: list[int], sites: dict[int, str], weights: dict[int, np.ndarray]):
        self.order, self.sites, self.weights, self.pushed = order, sites, weights, {}

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"msg-{m.metadata.dst_node_id}"  # the SuperLink's job
            self.pushed[m.metadata.dst_node_id] = m
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        return [Message(RecordDict({"arrays": ArrayRecord([self.weights[n]]),
                                    "metrics": MetricRecord({"num-examples": 7 + 13 * n, "train-loss": 0.1 * n}),
                                    "site": ConfigRecord({"name": self.sites[n]})}), reply_to=self.pushed[n])
                for n in self.order]


def test_replies_are_aggregated_in_a_fixed_order_whatever_their_arrival(tmp_path, monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.phase import run_phase

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    rng = np.random.default_rng(0)
    sites = {11: "site-c", 12: "site-a", 13: "site-b", 14: "site-d"}
    weights = {n: (rng.normal(size=4096) * 10.0 ** rng.uniform(-3, 3, size=4096)).astype(np.float32) for n in sites}
    cfg = FederationConfig(run_dir=tmp_path, min_sites=2, round_timeout_s=5.0)

    def run(order):
        msgs = [Message(RecordDict({"arrays": ArrayRecord([np.zeros(4096, np.float32)]), "config": ConfigRecord({})}),
                        dst_node_id=n, message_type="train") for n in sites]
        record, ok = run_phase(_ArrivalOrderGrid(order, sites, weights), cfg, msgs, 1, "train")
        arrays, _ = FedAvg().aggregate_train(1, ok)
        return record, ok, arrays.to_numpy_ndarrays()[0]

    first, ok, agg = run([11, 12, 13, 14])
    assert [r.site for r in first.answered] == ["site-a", "site-b", "site-c", "site-d"]
    assert [str(m.content["site"]["name"]) for m in ok] == ["site-a", "site-b", "site-c", "site-d"]
    for order in ([14, 13, 12, 11], [13, 11, 14, 12]):
        record, _, again = run(order)
        assert [r.site for r in record.answered] == [r.site for r in first.answered]
        assert np.array_equal(again, agg)  # bit for bit
    # the test can fail: aggregating the same replies in arrival order does change the float sums
    arrivals = _ArrivalOrderGrid([14, 13, 12, 11], sites, weights)
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in sites]
    unsorted = arrivals.pull_messages(arrivals.push_messages(msgs))
    assert not np.array_equal(FedAvg().aggregate_train(1, unsorted)[0].to_numpy_ndarrays()[0], agg)



class _SiteStandInGrid:
    """Three sites answering in-process: each returns a fixed function of the weights and the round."""

    SITES = {11: "site-b", 12: "site-a", 13: "site-c"}

    def __init__(self):
        self.pushed, self.count = {}, 0

    def get_node_ids(self):
        return list(self.SITES)

    def push_messages(self, messages):
        for m in messages:
            self.count += 1
            m.metadata.__dict__["_message_id"] = f"msg-{self.count}"  # the SuperLink's job
            self.pushed[m.metadata.message_id] = m
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        replies = []
        for i in ids:
            m = self.pushed.pop(i)
            node, rnd = int(m.metadata.dst_node_id), int(m.content["config"]["server-round"])
            site = ConfigRecord({"name": self.SITES[node]})
            if m.metadata.message_type.startswith("train"):
                new = (m.content["arrays"].to_numpy_ndarrays()[0] * 0.9 + 0.01 * node * rnd).astype(np.float32)
                metrics = MetricRecord({"num-examples": 3 + node, "train-loss": 1.0 / node + rnd})
                replies.append(Message(RecordDict({"arrays": ArrayRecord([new]), "metrics": metrics, "site": site}),
                                       reply_to=m))
            else:
                metrics = MetricRecord({"num-examples": node, "mean-auc": node / 20 + rnd / 100})
                replies.append(Message(RecordDict({"metrics": metrics, "site": site}), reply_to=m))
        return replies


@pytest.mark.parametrize("strategy", ["fedadam", "fedprox"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, strategy):
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.rounds import run_rounds

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    def config(run_dir):
        cfg = FederationConfig(run_dir=run_dir, rounds=3, strategy=strategy, min_sites=2, seed=7, evaluate_every=2)
        cfg.model.width, cfg.model.groups, cfg.model.feature_dim, cfg.model.hidden_dim = 8, 4, 16, 16
        return cfg

    run_rounds(_SiteStandInGrid(), config(tmp_path / "whole"), resume=False)
    stopped = tmp_path / "stopped"
    run_rounds(_SiteStandInGrid(), config(stopped), resume=False)
    (stopped / "checkpoints" / "round_003.pt").unlink()  # as if the coordinator died during round 3
    (stopped / "checkpoints" / "latest.json").write_text(json.dumps({"round": 2, "file": "round_002.pt"}))
    run_rounds(_SiteStandInGrid(), config(stopped), resume=True)

    whole, resumed = (torch.load(d / "checkpoints" / "round_003.pt", weights_only=True)
                      for d in (tmp_path / "whole", stopped))
    assert all(torch.equal(a, b) for a, b in zip(whole["weights"], resumed["weights"]))  # bit for bit
    assert [(r["round"], r["phase"]) for r in json.loads((stopped / "rounds.json").read_text(encoding="utf-8"))] == [
        (1, "train"), (2, "train"), (2, "evaluate"), (3, "train"), (3, "evaluate")]
    assert (stopped / "model.pt").is_file()

def test_weights_travel_as_one_packed_array():
    from fedsubtype.federation.transport import layout_of, pack, unpack

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(4, 3, 3, 3, 3), (4,), (2, 4), ()]]
    packed = pack(arrays)
    assert len(packed) == 1 and packed[0].dtype == np.float32 and packed[0].size == sum(a.size for a in arrays)
    back = unpack(packed, layout_of(arrays))
    assert all(b.shape == a.shape and np.array_equal(a, b) for a, b in zip(arrays, back))
    assert unpack(arrays, None) == arrays  # no layout: per-tensor arrays pass through
    with pytest.raises(ValueError, match="expected one packed array of 123 values"):
        unpack([np.zeros(122, np.float32)], json.dumps([[123]]))
    with pytest.raises(ValueError, match="one float dtype"):
        pack([np.zeros(3, np.float32), np.zeros(2, np.float64)])
    with pytest.raises(ValueError, match="one float dtype"):
        pack([np.zeros(3, np.int64)])
    # FedAdam/FedYogi keep the global model in float64; its checkpoint must pack again on resume
    doubles = [a.astype(np.float64) for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(doubles, unpack(pack(doubles), layout_of(doubles))))
