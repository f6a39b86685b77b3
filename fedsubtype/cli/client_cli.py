"""`fedsubtype-client --site site.yaml`: a hospital joins a federation.

Validates the site file and every case (the same validator as `fedsubtype validate`), prints a local
summary that never leaves the site, warms the preprocessing cache, checks the SuperLink is reachable and
its certificate trusted, then runs a Flower SuperNode with TLS and node authentication, the site file
passed through the node config, and run-time dependency installation disabled.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
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
                    "Case ids, paths, labels and per-case predictions never leave the site.")
    p.add_argument("--site", type=Path, required=True, help="the site's site.yaml (see site_configs/site.template.yaml)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no authentication (refused unless site.yaml says allow_insecure: true)")
    p.add_argument("--check", action="store_true", help="validate, summarise, warm the cache and check the "
                   "connection, then exit without joining")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def print_summary(summary: dict, problems: Sequence, out=print) -> None:
    """The local cohort summary (stays at the site)."""
    out(f"site {summary['site']}: {summary['usable_cases']} usable case(s), {summary['problems']} problem(s) "
        "[local only: never sent]")
    for split in ("train", "val"):
        s = summary[split]
        out(f"  {split}: {json.dumps(s, default=str)}")


def classify_failure(log_text: str) -> UserError:
    """A one-line reason for a SuperNode that exited, from its log."""
    text = log_text
    if "2004" in text or "Failed to activate SuperNode" in text:
        return UserError("the SuperLink refused this site's key (not registered)",
                         "send <site>.pub to the coordinator to be listed in federation.yaml", where="auth_private_key")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return UserError("the SuperLink's TLS certificate was rejected", "use the CA certificate the coordinator gave "
                         "you", where="ca_certificate")
    if "Connection refused" in text or "Giving up reconnection" in text:
        return UserError("lost the SuperLink and could not reconnect", "check that the coordinator is running",
                         where="superlink")
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
    return UserError(f"the SuperNode stopped ({last[0].strip()[:200]})", "see the site log for details")


def supernode_args(site, *, insecure: bool) -> list[str]:
    """Command line of `flower-supernode` for this site."""
    from fedsubtype.federation.processes import flower_executable

    args = [flower_executable("flower-supernode"), "--superlink", site.superlink,
            "--port", str(site.local_port), "--host", "127.0.0.1",
            "--node-config", f"site-config={json.dumps(str(site.source))}"]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(site.ca_certificate),
                 "--auth-supernode-private-key", str(site.auth_private_key)]
    if site.reconnect_timeout_s is not None:
        args += ["--max-wait-time", str(site.reconnect_timeout_s)]
    # Runtime dependency installation stays off: flower-supernode only installs with
    # --allow-runtime-dependency-installation, which is never passed.
    return args


def run(args: argparse.Namespace) -> int:
    from fedsubtype.federation.site_algo import SiteAlgo
    from fedsubtype.federation.processes import check_tls, split_address, wait_for_port
    from fedsubtype.federation.site_config import load_site_config

    site = load_site_config(args.site)
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

    host, port = split_address(site.superlink)
    wait_for_port(host, port, retries=site.connect_retries, timeout_s=site.connect_timeout_s,
                  say=lambda m: print(f"{PROG}: {m}", file=sys.stderr))
    if not args.insecure:
        check_tls(host, port, site.ca_certificate)  # type: ignore[arg-type]
    if args.check:
        print(f"site {site.name}: ready to join {site.superlink}")
        return 0

    state = site.state_dir()
    log_path = state / "logs" / "supernode.log"
    env = {"FLWR_HOME": str(state / "flwr")}
    if site.threads:
        env.update(OMP_NUM_THREADS=str(site.threads), MKL_NUM_THREADS=str(site.threads))

    def _terminate(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    deadline = time.monotonic() + site.connect_timeout_s
    delay = 2.0
    while True:
        failure, stopped = _run_supernode(site, args.insecure, log_path, env)
        if stopped:
            return 0
        if failure is not None and "not registered" in failure.what:
            # The coordinator may still be registering keys when a site (re)joins: retry until the deadline.
            if time.monotonic() + delay < deadline:
                print(f"{PROG}: the SuperLink does not know this site's key yet; retrying in {delay:.0f} s",
                      file=sys.stderr)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            raise failure
        if failure is not None and "certificate" in failure.what:
            raise failure
        # The SuperNode ended on its own: the SuperLink went away (coordinator stopped or crashed). Rejoin
        # when it is back, for as long as reconnect_timeout_s allows (forever by default).
        print(f"{PROG}: lost the SuperLink ({failure.what if failure else 'it closed the connection'}); "
              "waiting for it to come back", file=sys.stderr, flush=True)
        wait_for_port(host, port, retries=10**9,
                      timeout_s=site.reconnect_timeout_s if site.reconnect_timeout_s is not None else float("inf"),
                      say=lambda m: None)
        deadline = time.monotonic() + site.connect_timeout_s
        delay = 2.0


def _run_supernode(site, insecure: bool, log_path: Path, env: dict) -> tuple[UserError | None, bool]:
    """Run the SuperNode until it exits: (reason it failed or None, whether the user stopped it)."""
    from fedsubtype.federation.processes import start, stop

    offset = log_path.stat().st_size if log_path.is_file() else 0
    proc = start(supernode_args(site, insecure=insecure), log_path, env=env)
    print(f"site {site.name}: connecting to {site.superlink} as a SuperNode (pid {proc.pid}); log {log_path}; "
          "Ctrl-C to leave", flush=True)
    first = offset
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            offset = _echo_new(log_path, offset)
    except KeyboardInterrupt:
        stop(proc)
        print(f"site {site.name}: left the federation", flush=True)
        return None, True
    finally:
        stop(proc)
    _echo_new(log_path, offset)
    if proc.returncode == 0:
        return None, False
    return classify_failure(_since(log_path, first)), False


def _since(path: Path, offset: int) -> str:
    """Log text written after `offset`."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _echo_new(path: Path, offset: int) -> int:
    """Show new SuperNode log lines about rounds (not the HTTP chatter)."""
    try:
        size = path.stat().st_size
    except OSError:
        return offset
    if size <= offset:
        return offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read().decode("utf-8", errors="replace")
    for line in chunk.splitlines():
        low = line.lower()
        if any(key in low for key in ("received: train", "received: evaluate", "receiving: ", "error", "warning")):
            print(line.strip())
    return size


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
