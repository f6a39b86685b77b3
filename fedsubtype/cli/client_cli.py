"""`fedsubtype-client --site site.yaml`: a hospital joins a federation.

Validates the site file and every case (the same validator as `fedsubtype validate`), prints a local
summary that never leaves the site, warms the preprocessing cache, checks the SuperLink is reachable and
its certificate trusted, then runs a Flower SuperNode with TLS and node authentication, the site file
passed through the node config, and run-time dependency installation disabled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from fedsubtype.errors import UserError
from fedsubtype.cli import run_guarded

PROG = "fedsubtype-client"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Join a fedsubtype federation as a site: validate the local cases, warm the cache, and run a "
                    "Flower SuperNode (TLS + node authentication) until the coordinator's runs are done. "
                    "Case ids, paths, labels and per-case predictions never leave the site. "
                    f"'{PROG} keygen --help' makes this site's key pair; '{PROG} approve-hash' prints the app hash to approve.")
    p.add_argument("--site", type=Path, required=True, help="the site's site.yaml (see site_configs/site.template.yaml)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no authentication (refused unless site.yaml says allow_insecure: true)")
    p.add_argument("--check", action="store_true", help="validate, summarise, warm the cache and check the "
                   "connection, then exit without joining")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--privacy-report", action="store_true",
                   help="print the privacy ε spent per run and over all runs (from the ledger), then exit")
    return p


def print_summary(summary: dict, problems: Sequence, out=print) -> None:
    """The local cohort summary (stays at the site)."""
    out(f"site {summary['site']}: {summary['usable_cases']} usable case(s), {summary['problems']} problem(s) "
        "[local only: never sent]")
    for split in ("train", "val"):
        s = summary[split]
        out(f"  {split}: {json.dumps(s, default=str)}")


def run(args: argparse.Namespace) -> int:
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.federation.site_config import load_site_config
    from fedsubtype.federation.site_node import check_superlink, join_federation
    from fedsubtype.privacy.report import print_report
    from fedsubtype.privacy.site import refuse_reproducible_noise

    site = load_site_config(args.site)
    if args.privacy_report:
        return print_report(site)
    refuse_reproducible_noise(site.privacy)  # reproducible DP noise is for simulations only
    where = str(site.source)
    if args.insecure and not site.allow_insecure:
        raise UserError("--insecure is refused: the site file does not say allow_insecure: true",
                        "use TLS (ca_certificate + auth_private_key), or set allow_insecure: true for a local trial only",
                        where=where)
    if args.insecure:
        print("=" * 78, file=sys.stderr)
        print(f"{PROG}: WARNING: INSECURE MODE — no TLS, no authentication. Weights travel in plain text and any "
              "machine can pose as the coordinator. Use only for a trial on one machine.", file=sys.stderr)
        print("=" * 78, file=sys.stderr)
    site.check_files(secure=not args.insecure)
    if " " in str(site.source):
        raise UserError("the site file's path contains a space", "move it to a path without spaces", where=where)

    from fedsubtype.privacy.site import site_startup_line  # privacy: bad settings fail here, before any image is read

    print(site_startup_line(site))
    algo = SiteAlgo(site, log=print, progress=not args.quiet)
    algo.initialize(revalidate=True)
    for problem in algo.problems:
        print(f"{PROG}: warning: {problem.line()}", file=sys.stderr)
    print_summary(algo.local_summary(), algo.problems)
    print(f"preprocessing cache ready: {site.cache_dir()}")

    check_superlink(site, args.insecure, warn=_warn)
    if args.check:
        print(f"site {site.name}: ready to join {site.superlink}")
        return 0
    join_federation(site, args.insecure, say=lambda line: print(line, flush=True), warn=_warn)
    return 0


def _warn(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "keygen":  # a site makes its own key pair: fedsubtype-client keygen --out DIR --site NAME
        from fedsubtype.cli.keygen_cmd import main as keygen_main

        return keygen_main(argv[1:])
    if argv and argv[0] == "approve-hash":  # the app hash a site lists under approved_apps: approve-hash [--fab FILE]
        from fedsubtype.cli.approve_hash_cmd import main as approve_hash_main

        return approve_hash_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
