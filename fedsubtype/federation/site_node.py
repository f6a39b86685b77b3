"""A site's SuperNode: check the SuperLink can be reached and trusted, run `flower-supernode` with the site
file in its node config, show its round lines, and rejoin when the SuperLink comes back.

`fedsubtype-client` validates the site and warms its cache, then calls `check_superlink` and `join_federation`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from fedsubtype.errors import UserError
from fedsubtype.federation.executor_process import WarmExecutor
from fedsubtype.federation.processes import (check_tls, split_address, start, stop,
                                             wait_for_port)
from fedsubtype.federation.site_config import SiteConfig
from fedsubtype.federation.supernode_launch import supernode_command

SITE_CONFIG_KEY = "site-config"
"""The node-config key holding the path of the site's site.yaml (read by client/client_app.py)."""
Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def supernode_args(site: SiteConfig, *, insecure: bool, executor: WarmExecutor | None = None) -> list[str]:
    """Command line of `flower-supernode` for this site (its tasks go to `executor`, the site's warm process)."""
    args = [*supernode_command(), "--superlink", site.superlink,
            "--port", str(site.local_port), "--host", "127.0.0.1",
            "--node-config", f"{SITE_CONFIG_KEY}={json.dumps(str(site.source))}"]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(site.ca_certificate),
                 "--auth-supernode-private-key", str(site.auth_private_key)]
    if executor is not None:
        args += executor.supernode_args()
    if site.reconnect_timeout_s is not None:
        args += ["--max-wait-time", str(site.reconnect_timeout_s)]
    # Runtime dependency installation stays off: flower-supernode only installs with
    # --allow-runtime-dependency-installation, which is never passed.
    return args


def check_superlink(site: SiteConfig, insecure: bool, warn: Say = _stderr) -> None:
    """Wait (with back-off) until the SuperLink accepts connections and, unless insecure, its certificate verifies."""
    host, port = split_address(site.superlink)
    wait_for_port(host, port, retries=site.connect_retries, timeout_s=site.connect_timeout_s, say=warn)
    if not insecure:
        check_tls(host, port, site.ca_certificate)  # type: ignore[arg-type]


def _since(path: Path, offset: int) -> str:
    """Log text written after `offset`."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _echo_new(path: Path, offset: int, say: Say) -> int:
    """Show new SuperNode log lines about rounds (not the HTTP chatter); the new offset."""
    try:
        size = path.stat().st_size
    except OSError:
        return offset
    if size <= offset:
        return offset
    for line in _since(path, offset).splitlines():
        low = line.lower()
        if any(key in low for key in ("received: train", "received: evaluate", "receiving: ", "error", "warning")):
            say(line.strip())
    return size


def run_supernode(site: SiteConfig, insecure: bool, log_path: Path, env: dict[str, str],
                  say: Say = print, executor: WarmExecutor | None = None) -> tuple[UserError | None, bool]:
    """Run the SuperNode until it exits: (reason it failed or None, whether the user stopped it)."""
    offset = log_path.stat().st_size if log_path.is_file() else 0
    proc = start(supernode_args(site, insecure=insecure, executor=executor), log_path, env=env)
    say(f"site {site.name}: connecting to {site.superlink} as a SuperNode (pid {proc.pid}); log {log_path}; "
        "Ctrl-C to leave")
    first = offset
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            offset = _echo_new(log_path, offset, say)
            if executor is not None:
                executor.poll()  # restarted here if it crashed or was killed
    except KeyboardInterrupt:
        stop(proc)
        say(f"site {site.name}: left the federation")
        return None, True
    finally:
        stop(proc)
    _echo_new(log_path, offset, say)
    if proc.returncode == 0:
        return None, False
    return classify_failure(_since(log_path, first)), False


def supernode_env(site: SiteConfig) -> dict[str, str]:
    """The SuperNode's environment: its own Flower home in the site's state folder, the site's thread cap."""
    env = {"FLWR_HOME": str(site.state_dir() / "flwr")}
    if site.threads:
        env.update(OMP_NUM_THREADS=str(site.threads), MKL_NUM_THREADS=str(site.threads))
    return env


def _raise_interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def join_federation(site: SiteConfig, insecure: bool, say: Say = print, warn: Say = _stderr) -> None:
    """Run the site's SuperNode and its one warm ClientApp executor (fedsubtype.federation.site_executor)
    until the user stops them."""
    executor = WarmExecutor.for_site(site, supernode_env(site), say)
    executor.start()
    try:
        _stay_joined(site, insecure, say, warn, executor)
    finally:
        executor.stop()


def _stay_joined(site: SiteConfig, insecure: bool, say: Say, warn: Say, executor: WarmExecutor) -> None:
    """Run the SuperNode until the user stops it; retry while the key is not yet registered, and rejoin
    after the SuperLink went away for as long as `reconnect_timeout_s` allows (forever by default)."""
    log_path = site.state_dir() / "logs" / "supernode.log"
    env = supernode_env(site)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    host, port = split_address(site.superlink)
    deadline = time.monotonic() + site.connect_timeout_s
    delay = 2.0
    while True:
        failure, stopped = run_supernode(site, insecure, log_path, env, say, executor)
        if stopped:
            return
        if failure is not None and "not registered" in failure.what:
            # The coordinator may still be registering keys when a site (re)joins: retry until the deadline.
            if time.monotonic() + delay < deadline:
                warn(f"the SuperLink does not know this site's key yet; retrying in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            raise failure
        if failure is not None and "certificate" in failure.what:
            raise failure
        # The SuperNode ended on its own: the SuperLink went away (coordinator stopped or crashed).
        warn(f"lost the SuperLink ({failure.what if failure else 'it closed the connection'}); "
             "waiting for it to come back")
        wait_for_port(host, port, retries=10**9,
                      timeout_s=site.reconnect_timeout_s if site.reconnect_timeout_s is not None else float("inf"),
                      say=lambda m: None)
        deadline = time.monotonic() + site.connect_timeout_s
        delay = 2.0
