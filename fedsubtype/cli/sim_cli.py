"""`fedsubtype-sim --scenario FILE`: a virtual-site study on Flower's simulation engine (researchers' entry point)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import yaml

from fedsubtype import __version__
from fedsubtype.cli import run_guarded

PROG = "fedsubtype-sim"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a FLamby-style study on virtual sites: pooled, local-only and federated methods "
                    "(the real ClientApp/ServerApp on Flower's simulation engine), leave-one-site-out, "
                    "several seeds; writes results.csv and report.md. Finished runs are skipped on a rerun.",
        epilog="Scenarios shipped: simulation/scenarios/{quick,paper,heterogeneity,privacy}.yaml. "
               "Phantom results are engineering evidence, not clinical claims.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--scenario", required=True, type=Path, help="scenario YAML file")
    parser.add_argument("--output", type=Path, default=None, help="results folder (default: the scenario's output_dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the scenario's seeds")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods of the scenario (by name, e.g. pooled fedavg)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario value, e.g. --set federation.budget_epochs=4 (VALUE is YAML); repeatable")
    parser.add_argument("--ray-address", default=None,
                        help="join an existing Ray cluster (e.g. auto or ray://HOST:10001) instead of starting one")
    parser.add_argument("--plan", action="store_true", help="validate, partition and list the runs, then stop")
    parser.add_argument("--report-only", action="store_true", help="rebuild results.csv and report.md from finished runs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the simulation engine's log")
    return parser


def _log_to_terminal(verbose: bool) -> None:
    """Show the harness's warnings (e.g. a site without a positive case); Flower keeps its own handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("simulation")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def _run(args: argparse.Namespace) -> int:
    from simulation.scenario import load_scenario

    overrides: dict = {}
    for item in args.settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            from fedsubtype.errors import UserError

            raise UserError(f"--set {item!r} is not KEY=VALUE", "e.g. --set federation.budget_epochs=4", where="--set")
        overrides[key.strip()] = yaml.safe_load(raw)
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.output:
        overrides["output_dir"] = str(args.output)
    scen = load_scenario(args.scenario, overrides)
    if args.methods:
        from fedsubtype.errors import UserError

        known = {m.name for m in scen.methods} | {label for m in scen.methods for label, _ in m.variants()}
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise UserError(f"method '{unknown[0]}' is not in this scenario", f"use some of {', '.join(sorted(known))}",
                            where="--methods")
        scen.methods = [m for m in scen.methods if m.name in args.methods
                        or any(label in args.methods for label, _ in m.variants())]
    if args.ray_address:
        scen.ray.address = args.ray_address
    _log_to_terminal(args.verbose)
    from simulation.runner import plan_study, report_only, run_study

    if args.plan:
        plan_study(scen, say=print)
        return 0
    if args.report_only:
        report_only(scen, say=print)
        return 0
    outcome = run_study(scen, say=lambda line: print(line, flush=True), verbose=args.verbose)
    print(f"{PROG}: {outcome.ran} run(s) done, {outcome.skipped} reused; results in {outcome.root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fedsubtype-sim`."""
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
