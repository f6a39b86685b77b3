"""Quantisation error of secure aggregation: the SecAgg+ aggregate of real site updates against the plain
example-weighted mean of the same updates (issue 25).

Each site trains one round from the same initial model with the real ClientApp (in-process, phantom or
given manifest); the very same trained weights then go through the coordinator's SecAgg+ stages against
Flower's `secaggplus_mod` at each site (fedsubtype's adapter), once with a tight max_weight (the largest
site's count, as declared_examples or an earlier round give) and once with the fallback
reply_checks.max_examples. Reported: max |secure − plain| over the weights, relative to the L2 norm and
to the largest value of the mean update, and the bound `Protocol.error_bound` gives.

    python research/secagg_error.py [--manifest M --sites a,b,c] [--size 32] [--local-epochs 1] \
        [--out results/secagg_error.json]

Phantom numbers are engineering evidence, never clinical claims.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import yaml


class Sites:
    """A Grid whose nodes are in-process ClientApps, each with its own Context (what a SuperNode keeps)."""

    def __init__(self, apps: dict, node_configs: dict) -> None:
        from flwr.app import Context, RecordDict

        self.apps, self.waiting, self.counter = apps, {}, itertools.count()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=node_configs.get(n, {}), state=RecordDict(),
                                    run_config={}) for n in apps}

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages) -> list[str]:
        out = []
        for m in messages:
            out.append(f"m{next(self.counter)}")
            m.metadata.__dict__["_message_id"] = out[-1]
            self.waiting[out[-1]] = m
        return out

    def pull_messages(self, ids) -> list:
        msgs = [self.waiting.pop(i) for i in list(ids) if i in self.waiting]
        return [self.apps[int(m.metadata.dst_node_id)](m, self.contexts[int(m.metadata.dst_node_id)]) for m in msgs]


def trained_weights(site_files: dict[int, Path], cfg, w0: list[np.ndarray]) -> dict[int, tuple[np.ndarray, float]]:
    """Node -> (packed trained weights, example count): one plain local round of the real ClientApp."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from client.client_app import app
    from fedsubtype.federation.rounds import round_config
    from fedsubtype.federation.transport import LAYOUT_KEY, layout_of, pack

    config = round_config(cfg)
    config[LAYOUT_KEY], config["server-round"] = layout_of(w0), 1
    grid = Sites({n: app for n in site_files}, {n: {"site-config": str(p)} for n, p in site_files.items()})
    out = {}
    for node in site_files:
        msg = Message(RecordDict({"arrays": ArrayRecord(pack(w0)), "config": ConfigRecord(dict(config))}),
                      dst_node_id=node, message_type="train")
        reply = grid.pull_messages(grid.push_messages([msg]))[0]
        if reply.has_error():
            raise SystemExit(f"site training failed: {reply.error.reason}")
        out[node] = (reply.content["arrays"].to_numpy_ndarrays()[0], float(reply.content["metrics"]["num-examples"]))
    return out


def replaying_site(weights: np.ndarray, count: float):
    """A ClientApp behind the real SecAgg+ adapter that answers training with the given trained weights."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedsubtype.federation.secagg_mod import secure_aggregation_mod

    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg, context):
        metrics = {"num-examples": count, "train-loss": 0.0, "steps": 1.0, "samples-seen": count, "seconds": 0.0,
                   "proximal-term": float("nan"), "epsilon": float("nan"), "delta": float("nan")}
        return Message(RecordDict({"arrays": ArrayRecord([weights]), "metrics": MetricRecord(metrics),
                                   "site": ConfigRecord({"name": f"node{context.node_id}"})}), reply_to=msg)
    return app


def compare(cfg, sent: np.ndarray, trained: dict[int, tuple[np.ndarray, float]], max_weight: float) -> dict:
    """The secure aggregate against the plain weighted mean of the same updates, for one max_weight."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedsubtype.federation.secagg_round import secure_train
    from fedsubtype.federation.secure_aggregation import protocol_for

    cfg.secure_aggregation.max_weight = int(max_weight)
    grid = Sites({n: replaying_site(w, c) for n, (w, c) in trained.items()}, {})
    msgs = [Message(RecordDict({"arrays": ArrayRecord([sent]), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train") for n in trained]
    record, _, mean = secure_train(grid, cfg, msgs, 1, {}, [sent.shape])
    if mean is None:
        raise SystemExit(f"secure round failed: {record.failed}")
    counts = [c for _, c in trained.values()]
    base = sent.astype(np.float64)
    plain = sum(c * (w.astype(np.float64) - base) for w, c in trained.values()) / sum(counts)
    diff = float(np.abs(mean[0] - plain).max())
    proto = protocol_for(cfg.secure_aggregation, len(trained), max_weight)
    largest = max(float(np.abs(w.astype(np.float64) - base).max()) for w, _ in trained.values())
    return {"max_weight": max_weight, "max_abs_diff": diff, "update_l2": float(np.linalg.norm(plain)),
            "update_max_abs": float(np.abs(plain).max()), "diff_over_update_l2": diff / float(np.linalg.norm(plain)),
            "diff_over_update_max_abs": diff / float(np.abs(plain).max()),
            "bound": proto.error_bound(counts, largest), "quantization_range": proto.quantization_range,
            "clipping_range": proto.clipping_range, "protocol_bytes_up": record.bytes_up}


def site_files(manifest: Path, sites: list[str], root: Path, size: int) -> dict[int, Path]:
    """One site.yaml per site over `manifest` (node ids 1..n)."""
    files = {}
    for i, name in enumerate(sites, start=1):
        files[i] = root / f"{name}.yaml"
        files[i].write_text(yaml.safe_dump({"name": name, "manifest": str(manifest), "manifest_site": name,
                                            "cache": str(root / "cache"), "work_dir": str(root / f"state-{name}"),
                                            "threads": 1, "preprocess": {"size": size}}), encoding="utf-8")
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, help="manifest with a site column (default: a 60-case phantom)")
    p.add_argument("--sites", help="comma-separated sites (default: all of the manifest's)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/secagg_error.json"))
    args = p.parse_args()
    import csv

    from flwr.supercore.task_identity import TaskIdentity

    from fedsubtype.federation.config import FederationConfig
    from fedsubtype.federation.secure_aggregation import SecureAggregationConfig
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.federation.transport import pack
    from fedsubtype.model import build_model
    from fedsubtype.train.runtime import seed_everything

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # in-process, as the tests do
    root = args.out.resolve().parent / "secagg_error"
    root.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest
    if manifest is None:
        from fedsubtype.phantom import generate_cohort

        manifest = generate_cohort(root / "phantom", cases=60, sites=3, seed=args.seed, progress=False)
    with open(manifest, newline="", encoding="utf-8") as fh:
        sites = args.sites.split(",") if args.sites else sorted({r["site"] for r in csv.DictReader(fh)})
    cfg = FederationConfig(run_dir=root / "run", strategy="fedavg", min_sites=2, local_epochs=args.local_epochs,
                           seed=args.seed, augment=False, secure_aggregation=SecureAggregationConfig(enabled=True))
    cfg.preprocess.size = args.size
    seed_everything(args.seed)
    w0 = get_weights(build_model(cfg.model))
    trained = trained_weights(site_files(Path(manifest).resolve(), sites, root, args.size), cfg, w0)
    sent = pack(w0)[0]
    tight = max(c for _, c in trained.values())
    results = [compare(cfg, sent, trained, w) for w in (tight, cfg.reply_checks.max_examples)]
    summary = {"sites": sites, "counts": [c for _, c in trained.values()], "parameters": int(sent.size),
               "results": results, "note": "phantom data; engineering evidence, never clinical claims"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
