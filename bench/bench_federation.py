"""Federation overhead: wall time of a 3-site loopback federation ÷ centralized training of the same model
on the union of the sites' training cases with the same number of training samples seen, both measured
in this run; plus the bytes of weights exchanged per round.

    python bench/bench_federation.py --manifest data/phantom/manifest.csv --sites site2,site3,site4 \
        --cache cache/sim-32 [--size 32] [--rounds 3] [--local-epochs 1] [--out results/bench_federation] \
        [--secure-aggregation]

Without --manifest a small 3-site phantom is generated (a smoke run; per-round work is then too small
for the ratio to mean much). Each side gets the whole machine: centralized training uses every core, each
site max(1, cores // sites) threads. The sites score the global model once, after the last round
(`evaluate_every: 0`), since the centralized run does not evaluate either.

The federation is the real thing: `fedsubtype-server` (SuperLink, TLS + node authentication) and three
`fedsubtype-client` SuperNodes on 127.0.0.1. Reported ratios (target ≤ 1.3 for the rounds):
  rounds_ratio  = time spent in the training rounds (each round: weights sent → replies in) ÷ centralized
  total_ratio   = whole coordinator command (SuperLink start, key registration, waiting for sites,
                  rounds, model.pt) ÷ centralized
With --secure-aggregation the same federation also runs under SecAgg+ (docs/federation.md, "Secure
aggregation"), in the same invocation: secure_rounds_ratio, secure_over_plain_rounds and
secure_over_plain_bytes (training bytes per round, protocol messages included).
Phantom numbers are engineering evidence, never clinical claims.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
MODEL: dict = {}
"""The default (full) model."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def centralized_seconds(manifest: Path, sites: list[str], cache: Path, size: int, samples: int, batch: int,
                        lr: float, seed: int, threads: int) -> tuple[float, int]:
    """Train on the union of the sites' local training splits until `samples` samples were seen."""
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.federation.site_config import SiteConfig
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.train.config import TrainConfig
    from fedsubtype.train.loop import fit
    from fedsubtype.train.runtime import seed_everything

    prep = PreprocessConfig(size=size)
    union = []
    for s in sites:
        algo = SiteAlgo(SiteConfig(name=s, manifest=manifest, manifest_site=s, cache=cache, preprocess=prep,
                                   work_dir=cache.parent / f"bench-state-{s}")).initialize()
        union += algo.splits["train"]
    data = CaseDataset(union, PreprocessCache(cache, prep))
    steps = max(1, math.ceil(samples / batch))
    cfg = TrainConfig(epochs=10_000, max_steps=steps, batch_size=batch, lr=lr, patience=None, augment=False,
                      seed=seed, threads=threads, progress=False, warmup_fraction=0.0, schedule="constant")
    seed_everything(seed)
    model = build_model(ModelConfig(**MODEL))
    t0 = time.perf_counter()
    result = fit(model, data, None, cfg, log=lambda m: None)
    return time.perf_counter() - t0, result.samples_seen


def site_threads(n_sites: int) -> int:
    """Threads per site so that the sites together use the machine's cores."""
    return max(1, (os.cpu_count() or 1) // n_sites)


def run_federation(root: Path, manifest: Path, sites: list[str], cache: Path, args, secure: bool = False) -> dict:
    """One federated run through the two commands (under SecAgg+ when `secure`); returns timings and rounds.json."""
    from fedsubtype.federation.credentials import create_dev_credentials

    creds = root / "creds"
    if not creds.exists():
        create_dev_credentials(creds, sites)
    port = free_port()
    run_dir = root / f"run-{port}"
    fed = {"sites": [{"name": s, "public_key": str(creds / "sites" / f"{s}.pub")} for s in sites],
           "run_dir": str(run_dir), "rounds": args.rounds, "strategy": "fedavg",
           "local_epochs": args.local_epochs, "local_steps": args.local_steps, "evaluate_every": 0, "batch_size": args.batch_size, "lr": args.lr, "min_sites": len(sites),
           "augment": False, "seed": args.seed, "port": port, "model": MODEL, "preprocess": {"size": args.size},
           "tls": {"ca_certificate": str(creds / "ca.crt"), "certificate": str(creds / "server.crt"),
                   "private_key": str(creds / "server.key")}}
    if secure:
        fed["secure_aggregation"] = {"enabled": True}
    (root / "federation.yaml").write_text(yaml.safe_dump(fed), encoding="utf-8")
    procs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        t0 = time.perf_counter()
        server = subprocess.Popen([str(BIN / "fedsubtype-server"), "--federation", str(root / "federation.yaml")],
                                  stdout=open(root / "server.log", "w", encoding="utf-8"), stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
        procs.append(server)
        for s in sites:
            site = {"name": s, "manifest": str(manifest), "manifest_site": s, "superlink": f"127.0.0.1:{port}",
                    "ca_certificate": str(creds / "ca.crt"), "auth_private_key": str(creds / "sites" / f"{s}.key"),
                    "local_port": free_port(), "work_dir": str(root / f"state-{port}-{s}"), "cache": str(cache),
                    "threads": site_threads(len(sites)), "connect_timeout_s": 600, "preprocess": {"size": args.size}}
            path = root / f"{s}.yaml"
            path.write_text(yaml.safe_dump(site), encoding="utf-8")
            procs.append(subprocess.Popen([str(BIN / "fedsubtype-client"), "--site", str(path), "--quiet"],
                                          stdout=open(root / f"{s}.log", "w", encoding="utf-8"), stderr=subprocess.STDOUT,
                                          start_new_session=True, env=env))
        code = server.wait(timeout=args.timeout)
        total = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    if code != 0:
        raise SystemExit(f"federated run failed (exit {code}); see {root / 'server.log'}")
    records = json.loads((run_dir / "rounds.json").read_text(encoding="utf-8"))
    return {"total_s": total, "records": records}


def federation_figures(fed: dict) -> dict:
    """Seconds in the training rounds, samples seen, bytes per round and a round's cost beyond its slowest site."""
    records = fed["records"]
    train = [r for r in records if r["phase"] == "train"]
    # what a round costs beyond its slowest site's own training: message transport, the sites' task
    # hand-over to their warm executors, polling, aggregation (SecAgg+: its four stages), checkpoint
    slowest = [max((a["metrics"].get("seconds", 0.0) for a in r["answered"]), default=0.0) for r in train]
    return {"total_s": fed["total_s"], "rounds_s": sum(r["seconds"] for r in train),
            "evaluate_s": sum(r["seconds"] for r in records if r["phase"] == "evaluate"),
            "samples": int(sum(a["metrics"]["samples-seen"] for r in train for a in r["answered"])),
            "train_bytes": statistics.median(r["bytes_down"] + r["bytes_up"] for r in train),
            "eval_bytes": statistics.median([r["bytes_down"] for r in records if r["phase"] == "evaluate"] or [0]),
            "beyond": statistics.median(r["seconds"] - s for r, s in zip(train, slowest))}


def secure_ratios(med: dict) -> dict:
    """With --secure-aggregation: its rounds ratio, and its rounds time and bytes per round against plain."""
    if "secure_rounds_s" not in med:
        return {}
    return {"secure_rounds_ratio": med["secure_rounds_s"] / med["centralized_s"],
            "secure_over_plain_rounds": med["secure_rounds_s"] / med["federated_rounds_s"],
            "secure_over_plain_bytes": med["secure_train_bytes_per_round"] / med["train_bytes_per_round"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, help="a manifest with a site column (default: generate a small phantom)")
    p.add_argument("--sites", help="comma-separated sites of the manifest to federate (default: all)")
    p.add_argument("--cache", type=Path, help="preprocessing cache (default: <out>/cache)")
    p.add_argument("--cases", type=int, default=60, help="cases of the generated phantom")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="federated/centralized pairs (median reported)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=Path("results/bench_federation"))
    p.add_argument("--secure-aggregation", action="store_true",
                   help="also run the same federation under SecAgg+ and report its rounds ratio and bytes per round")
    args = p.parse_args()

    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest.resolve() if args.manifest is not None else None
    if manifest is None:
        from fedsubtype.phantom import generate_cohort

        manifest = generate_cohort(root / "phantom", cases=args.cases, sites=3, seed=args.seed, progress=False)
    import csv

    with open(manifest, newline="", encoding="utf-8") as fh:
        sites = sorted({row["site"] for row in csv.DictReader(fh)})
    if args.sites:
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in sites]
        if unknown:
            raise SystemExit(f"bench_federation: site(s) {', '.join(unknown)} not in {manifest}; it has {', '.join(sites)}")
        sites = wanted
    cache = args.cache.resolve() if args.cache is not None else root / "cache"

    pairs = []
    for rep in range(args.repeats):
        fed = federation_figures(run_federation(root, Path(manifest), sites, cache, args))
        central_s, central_samples = centralized_seconds(Path(manifest), sites, cache, args.size, fed["samples"],
                                                         args.batch_size, args.lr, args.seed, os.cpu_count() or 1)
        pairs.append({"federated_total_s": fed["total_s"], "federated_rounds_s": fed["rounds_s"],
                      "federated_evaluate_s": fed["evaluate_s"], "centralized_s": central_s,
                      "samples_federated": fed["samples"], "samples_centralized": central_samples,
                      "train_bytes_per_round": fed["train_bytes"], "evaluate_bytes_per_round": fed["eval_bytes"],
                      "round_overhead_s": fed["beyond"]})
        if args.secure_aggregation:  # the same federation under SecAgg+, in the same run
            sec = federation_figures(run_federation(root, Path(manifest), sites, cache, args, secure=True))
            pairs[-1].update({"secure_rounds_s": sec["rounds_s"], "secure_total_s": sec["total_s"],
                              "secure_train_bytes_per_round": sec["train_bytes"],
                              "secure_round_overhead_s": sec["beyond"]})
        print(json.dumps(pairs[-1]), flush=True)

    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    summary = {
        **med,
        **secure_ratios(med),
        "rounds_ratio": med["federated_rounds_s"] / med["centralized_s"],
        "total_ratio": med["federated_total_s"] / med["centralized_s"],
        "target_rounds_ratio": 1.3,
        "sites": sites, "rounds": args.rounds, "local_epochs": args.local_epochs, "local_steps": args.local_steps,
        "batch_size": args.batch_size, "site_threads": site_threads(len(sites)),
        "size": args.size, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "note": "phantom data; engineering evidence, never clinical claims",
    }
    from fedsubtype.configio import atomic_write_text

    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
