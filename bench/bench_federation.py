"""Federation overhead: wall time of a 3-site loopback federation ÷ centralized training of the same model
on the union of the sites' training cases with the same number of training samples seen, both measured
in this run; plus the bytes of weights exchanged per round.

    python bench/bench_federation.py [--cases 60] [--size 16] [--rounds 3] [--out results/bench_federation]

The federation is the real thing: `fedsubtype-server` (SuperLink, TLS + node authentication) and three
`fedsubtype-client` SuperNodes on 127.0.0.1. Reported ratios (target ≤ 1.3 for the rounds):
  rounds_ratio  = time spent in the rounds (first round sent → last round aggregated) ÷ centralized
  total_ratio   = whole coordinator command (SuperLink start, key registration, waiting for sites,
                  rounds, model.pt) ÷ centralized
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
MODEL = {"width": 8, "groups": 4, "feature_dim": 16, "hidden_dim": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def centralized_seconds(manifest: Path, sites: list[str], cache: Path, size: int, samples: int, batch: int,
                        lr: float, seed: int) -> tuple[float, int]:
    """Train on the union of the sites' local training splits until `samples` samples were seen."""
    from fedsubtype.dataset import CaseDataset
    from fedsubtype.federated import SiteAlgo
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.preprocess import PreprocessConfig
    from fedsubtype.site_config import SiteConfig
    from fedsubtype.cache import PreprocessCache
    from fedsubtype.training import TrainConfig, fit, seed_everything

    prep = PreprocessConfig(size=size)
    union = []
    for s in sites:
        algo = SiteAlgo(SiteConfig(name=s, manifest=manifest, manifest_site=s, cache=cache, preprocess=prep,
                                   work_dir=cache.parent / f"bench-state-{s}")).initialize()
        union += algo.splits["train"]
    data = CaseDataset(union, PreprocessCache(cache, prep))
    steps = max(1, math.ceil(samples / batch))
    cfg = TrainConfig(epochs=10_000, max_steps=steps, batch_size=batch, lr=lr, patience=None, augment=False,
                      seed=seed, threads=1, progress=False, warmup_fraction=0.0, schedule="constant")
    seed_everything(seed)
    model = build_model(ModelConfig(**MODEL))
    t0 = time.perf_counter()
    result = fit(model, data, None, cfg, log=lambda m: None)
    return time.perf_counter() - t0, result.samples_seen


def run_federation(root: Path, manifest: Path, sites: list[str], cache: Path, args) -> dict:
    """One federated run through the two commands; returns timings and rounds.json."""
    from fedsubtype.credentials import create_dev_credentials

    creds = root / "creds"
    if not creds.exists():
        create_dev_credentials(creds, sites)
    port = free_port()
    run_dir = root / f"run-{port}"
    fed = {"sites": [{"name": s, "public_key": str(creds / "sites" / f"{s}.pub")} for s in sites],
           "run_dir": str(run_dir), "rounds": args.rounds, "strategy": "fedavg", "local_epochs": 1,
           "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr, "min_sites": len(sites),
           "augment": False, "seed": args.seed, "port": port, "model": MODEL, "preprocess": {"size": args.size},
           "tls": {"ca_certificate": str(creds / "ca.crt"), "certificate": str(creds / "server.crt"),
                   "private_key": str(creds / "server.key")}}
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
                    "threads": 1, "connect_timeout_s": 600, "preprocess": {"size": args.size}}
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, help="a 3-site manifest (default: generate a phantom)")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="federated/centralized pairs (median reported)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=Path("results/bench_federation"))
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
    cache = root / "cache"

    pairs = []
    for rep in range(args.repeats):
        fed = run_federation(root, Path(manifest), sites, cache, args)
        train = [r for r in fed["records"] if r["phase"] == "train"]
        samples = int(sum(a["metrics"]["samples-seen"] for r in train for a in r["answered"]))
        rounds_s = sum(r["seconds"] for r in fed["records"])
        central_s, central_samples = centralized_seconds(Path(manifest), sites, cache, args.size, samples,
                                                         args.batch_size, args.lr, args.seed)
        bytes_per_round = statistics.median(r["bytes_down"] + r["bytes_up"] for r in fed["records"]
                                            if r["phase"] == "train")
        eval_bytes = statistics.median(r["bytes_down"] for r in fed["records"] if r["phase"] == "evaluate")
        pairs.append({"federated_total_s": fed["total_s"], "federated_rounds_s": rounds_s, "centralized_s": central_s,
                      "samples_federated": samples, "samples_centralized": central_samples,
                      "train_bytes_per_round": bytes_per_round, "evaluate_bytes_per_round": eval_bytes})
        print(json.dumps(pairs[-1]), flush=True)

    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    summary = {
        **med,
        "rounds_ratio": med["federated_rounds_s"] / med["centralized_s"],
        "total_ratio": med["federated_total_s"] / med["centralized_s"],
        "target_rounds_ratio": 1.3,
        "sites": sites, "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
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
