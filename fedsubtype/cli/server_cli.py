"""`fedsubtype-server`: the coordinator.

    fedsubtype-server --federation federation.yaml [--resume RUN_DIR] [--overwrite]
    fedsubtype-server credentials --out DIR --sites a,b,c [--hosts localhost,127.0.0.1]

Starts a Flower SuperLink with TLS and SuperNode authentication, registers the listed sites' public keys,
waits for the minimum number of sites, submits the run (`flwr run`), shows per-round progress, and leaves
a run folder with per-round metrics, checkpoints and the final `model.pt`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fedsubtype.errors import UserError
from fedsubtype.cli import run_guarded

PROG = "fedsubtype-server"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Coordinate a fedsubtype federation: start the SuperLink (TLS + node authentication), wait for "
                    "the sites, run the rounds and write the run folder (per-round metrics, checkpoints, model.pt). "
                    f"'{PROG} credentials --help' creates development credentials.")
    p.add_argument("--federation", type=Path, help="federation.yaml (see site_configs/federation.yaml)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a run whose coordinator stopped, from its last checkpoint to the same final round")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing run folder")
    return p


def build_credentials_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} credentials",
        description="Create development credentials for a local trial: a CA, a SuperLink TLS certificate for the "
                    "given host names / IP addresses, and one EC P-384 authentication key pair per site.")
    p.add_argument("--out", type=Path, required=True, help="folder to write (ca.crt, server.crt/key, sites/<name>.key/.pub)")
    p.add_argument("--sites", required=True, help="comma-separated site names, e.g. site_a,site_b,site_c")
    p.add_argument("--hosts", default="localhost,127.0.0.1", help="names/IPs the SuperLink is reached at")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.add_argument("--overwrite", action="store_true", help="replace existing credentials in --out")
    return p


def run_credentials(args: argparse.Namespace) -> int:
    from fedsubtype.federation.credentials import create_dev_credentials

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = create_dev_credentials(args.out, sites, hosts, valid_days=args.days, overwrite=args.overwrite)
    print(f"wrote development credentials to {paths.root} (not for production use)")
    print(f"  coordinator: {paths.ca_cert.name}, {paths.server_cert.name}, {paths.server_key.name} "
          f"(valid for {', '.join(hosts)})")
    for s in sites:
        print(f"  site {s}: give it {paths.ca_cert} and {paths.site_private_keys[s]}; list {paths.site_public_keys[s]}")
    print("note: this development helper made every site's private key here, which suits a trial on one machine; "
          "in a real federation each site runs `fedsubtype-client keygen` and sends only its .pub")
    return 0


def run(args: argparse.Namespace) -> int:
    """Prepare the run folder, coordinate the federation, and say where the results are."""
    from fedsubtype.federation.coordinator import coordinate, prepare_run

    cfg, run_dir = prepare_run(args.federation, args.resume, args.overwrite)
    if cfg.insecure:
        print(f"{PROG}: WARNING: INSECURE MODE — no TLS, no node authentication; for a trial on one machine only.",
              file=sys.stderr)
    code = coordinate(cfg, run_dir, say=lambda line: print(line, flush=True))
    model = run_dir / "model.pt"
    if code != 0 or not model.is_file():
        raise UserError(f"the run did not finish (flwr run exit {code})", f"see {run_dir / 'logs' / 'run.log'}; "
                        f"continue it with {PROG} --resume {run_dir}", where=str(run_dir))
    print(f"done: {model}, per-round metrics in {run_dir / 'metrics_per_round.csv'} and "
          f"{run_dir / 'metrics_per_site.csv'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "credentials":
        cargs = build_credentials_parser().parse_args(argv[1:])
        return run_guarded(f"{PROG} credentials", lambda: run_credentials(cargs))
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
