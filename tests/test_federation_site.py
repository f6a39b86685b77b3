"""A site's side in-process: SiteAlgo's lifecycle on real phantom files, and what the ClientApp's replies
carry (captured Message content): weights, case counts and allow-listed aggregate metrics, nothing else."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedutil import TINY_MODEL, manifest_of

ROUND = {"server-round": 1, "local-epochs": 1, "local-steps": 2, "batch-size": 4, "lr": 0.001, "augment": False,
         "seed": 0, "model-config": json.dumps(TINY_MODEL), "preprocess-config": json.dumps({"size": 16}),
         "run-id": "test", "num-rounds": 2}


@pytest.fixture(scope="module")
def site_file(phantom_cohort, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    path = tmp / "site1.yaml"
    path.write_text(yaml.safe_dump({"name": "site1", "manifest": str(manifest_of(phantom_cohort)),
                                    "manifest_site": "site1", "cache": str(tmp / "cache"),
                                    "work_dir": str(tmp / "state"), "threads": 1, "preprocess": {"size": 16}}))
    return path


@pytest.fixture(scope="module")
def algo(site_file):
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.federation.site_config import load_site_config

    return SiteAlgo(load_site_config(site_file)).initialize()


def _global_weights():
    import torch

    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import ModelConfig, build_model

    torch.manual_seed(0)
    return get_weights(build_model(ModelConfig(**TINY_MODEL)))


def test_site_lifecycle(algo):
    from fedsubtype.federation.site_algo import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS

    assert all(c.site == "site1" for c in algo.cases)
    assert len(algo.splits["train"]) + len(algo.splits["val"]) == len(algo.cases)
    w0 = _global_weights()
    w1, n, metrics = algo.train(w0, {**ROUND, "proximal-mu": 0.1})
    assert n == len(algo.splits["train"])  # training cases, not batches
    assert metrics["num-examples"] == n and metrics["steps"] == 2 and metrics["proximal-term"] >= 0
    assert tuple(metrics) == TRAIN_METRIC_KEYS
    assert len(w1) == len(w0) and any(not np.array_equal(a, b) for a, b in zip(w0, w1))
    n_val, ev = algo.evaluate(w1, ROUND)
    assert n_val == len(algo.splits["val"]) and ev["num-examples"] == n_val
    assert list(ev) == [k for k in EVAL_METRIC_KEYS if k in ev]  # allow-listed keys only, in order
    assert ev["metrics-omitted"] == 5 - (len(ev) - 2)  # a small validation split: metrics withheld, counted
    # same inputs and seed -> same weights
    w1b, _, _ = algo.train(w0, {**ROUND, "proximal-mu": 0.1})
    assert all(np.array_equal(a, b) for a, b in zip(w1, w1b))


def test_statistics_heads_are_fitted_by_the_site_in_the_first_round_only(algo):
    import torch

    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import ModelConfig, build_model

    wide = {**TINY_MODEL, "read_out": "linear_heads"}
    cfg = {**ROUND, "model-config": json.dumps(wide)}
    torch.manual_seed(0)
    w0 = get_weights(build_model(ModelConfig(**wide)))
    names = list(build_model(ModelConfig(**wide)).state_dict())
    at = {k: i for i, k in enumerate(names)}
    w1, _, _ = algo.train(w0, cfg)
    assert w0[at["statistics_heads.fitted"]] == 0 and w1[at["statistics_heads.fitted"]] == 1
    assert np.abs(w1[at["statistics_heads.linear.er.weight"]]).sum() > 0  # started from the site's own fit
    # a later round starts from the (averaged) global weights: nothing is refitted on the site's cases
    global_w = [w.copy() for w in w1]
    global_w[at["statistics_heads.center"]] += 0.5
    w2, _, _ = algo.train(global_w, {**cfg, "server-round": 2})
    np.testing.assert_array_equal(w2[at["statistics_heads.center"]], global_w[at["statistics_heads.center"]])


def test_local_norm_keeps_the_sites_normalisation(algo):
    from fedsubtype.federation.site_algo import norm_parameter_names

    w0 = _global_weights()
    cfg = {**ROUND, "local-norm": True}
    w1, _, _ = algo.train(w0, cfg)
    names = list(algo._model.state_dict())
    norms = norm_parameter_names(algo._model)
    local_after_round1 = {k: w for k, w in zip(names, w1) if k in norms}
    # next round: the global norm parameters are replaced by the site's own before training
    model, _ = algo._prepare([w * 0 for w in w0], __import__("fedsubtype.federation.site_algo", fromlist=["x"]).RoundSettings.from_config(cfg))
    state = model.state_dict()
    for k, w in local_after_round1.items():
        assert np.array_equal(state[k].numpy(), w)
    other = next(k for k in names if k not in norms)
    assert not state[other].any()


def _message(kind: str, content):
    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    meta = Metadata(run_id=1, message_id=f"m-{kind}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return make_message(meta, content=content)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def test_clientapp_replies_carry_only_weights_and_aggregates(site_file, algo):
    """Capture the ClientApp's reply Messages and check every record against the allow-list."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import app
    from fedsubtype.federation.site_algo import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS
    from fedsubtype.federation.transport import LAYOUT_KEY, layout_of, pack, unpack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(), run_config={})
    w0 = _global_weights()
    secrets = {c.case_id for c in algo.cases} | {str(c.image) for c in algo.cases} | {str(site_file.parent)}

    packed = {**ROUND, LAYOUT_KEY: layout_of(w0)}  # what the ServerApp sends: one array and its layout
    for kind, keys in (("train", TRAIN_METRIC_KEYS), ("evaluate", EVAL_METRIC_KEYS)):
        msg = _message(kind, RecordDict({"arrays": ArrayRecord(pack(w0)), "config": ConfigRecord(packed)}))
        reply = app(msg, ctx)
        assert not reply.has_error()
        content = reply.content
        assert set(content.metric_records) == {"metrics"}
        sent_keys = tuple(content["metrics"].keys())
        if kind == "train":
            assert sent_keys == keys  # exactly the allow-list, in order
        else:  # metrics over too few cases are absent; the count of those withheld is sent instead
            assert sent_keys == tuple(k for k in keys if k in sent_keys) and "metrics-omitted" in sent_keys
        assert all(isinstance(v, float) for v in content["metrics"].values())
        assert set(content.config_records) == {"site"} and dict(content["site"]) == {"name": "site1"}
        if kind == "train":
            assert set(content.array_records) == {"arrays"}
            sent = content["arrays"].to_numpy_ndarrays()
            assert len(sent) == 1  # packed like the request
            assert [a.shape for a in unpack(sent, packed[LAYOUT_KEY])] == [a.shape for a in w0]
            assert content["metrics"]["num-examples"] == len(algo.splits["train"])
        else:
            assert not content.array_records
        leaked = [s for s in _strings(dict(content["site"])) + list(content["metrics"].keys())
                  if any(x in s for x in secrets)]
        assert not leaked


def test_clientapp_errors_leave_no_site_details(site_file, tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client.client_app import app

    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(), run_config={})
    bad = _message("train", RecordDict({"arrays": ArrayRecord([np.zeros(3, dtype=np.float32)]),
                                        "config": ConfigRecord(dict(ROUND))}))
    with pytest.raises(RuntimeError) as err:
        app(bad, ctx)
    text = str(err.value)
    assert "ValueError" in text and str(site_file.parent) not in text and "/" not in text


def test_a_new_process_reuses_the_remembered_split(site_file, algo, monkeypatch):
    """A ClientApp process per message must find the same split without recomputing it (nor importing sklearn)."""
    import fedsubtype.data.splits
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.federation.site_config import load_site_config

    def refuse(*args, **kwargs):
        raise AssertionError("the split was recomputed")

    monkeypatch.setattr(fedsubtype.data.splits, "stratified_split", refuse)
    again = SiteAlgo(load_site_config(site_file)).initialize()
    assert {k: [c.case_id for c in v] for k, v in again.splits.items()} == \
        {k: [c.case_id for c in v] for k, v in algo.splits.items()}

    # a different split seed is a different split: recomputed, not served from the record
    site = load_site_config(site_file)
    site.split_seed = site.split_seed + 1
    with pytest.raises(AssertionError, match="recomputed"):
        SiteAlgo(site).initialize()


def test_a_clientapp_process_reads_the_cache_lazily(site_file, algo, tmp_path):
    """initialize(warm=False) touches no cache entry up front; the ones needed are built when first read."""
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.federation.site_config import load_site_config

    site = load_site_config(site_file)
    site.cache = tmp_path / "fresh-cache"
    lazy = SiteAlgo(site).initialize(warm=False)
    assert not list(site.cache_dir().rglob("*.fspc"))
    n_val, metrics = lazy.evaluate(_global_weights(), ROUND)
    assert len(list(site.cache_dir().rglob("*.fspc"))) == n_val == len(lazy.splits["val"])
    expected = algo.evaluate(_global_weights(), ROUND)[1]
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, nan_ok=True)


def test_metrics_over_too_few_cases_stay_at_the_site(algo, monkeypatch):
    """min_cases_per_metric above the validation split: every gated metric is absent and counted as omitted."""
    n_val = len(algo.splits["val"])
    monkeypatch.setattr(algo.site.limits, "min_cases_per_metric", n_val + 1)
    _, ev = algo.evaluate(_global_weights(), ROUND)
    assert ev == {"num-examples": n_val, "metrics-omitted": 5}
    monkeypatch.setattr(algo.site.limits, "min_cases_per_metric", 1)
    _, ev = algo.evaluate(_global_weights(), ROUND)
    assert "ki67-mae" in ev and ev["metrics-omitted"] == 5 - (len(ev) - 2)


def test_clientapp_passes_a_declined_rounds_line_to_the_coordinator(site_file):
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client.client_app import app

    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(), run_config={})
    msg = _message("train", RecordDict({"arrays": ArrayRecord(_global_weights()),
                                        "config": ConfigRecord({**ROUND, "batch-size": 1})}))
    with pytest.raises(RuntimeError) as err:
        app(msg, ctx)
    text = str(err.value)
    assert "batch size 1 below the site's min_batch_size 4" in text and "\n" not in text
    assert str(site_file.parent) not in text
