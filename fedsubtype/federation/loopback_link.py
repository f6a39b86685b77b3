"""Command lines of the coordinator's Flower processes, with the control plane closed to sites.

Three processes make the coordinator's side (ports in docs/federation.md, "What a site trusts"):

* `flower-superlink` on 127.0.0.1 only: the Control, Fleet and Runtime APIs, reachable from this machine alone;
  TLS and SuperNode authentication as before; `--isolation process` with a SuperExec authentication secret, so the
  Runtime API hands tasks (AcquireTask) only to requests signed with that secret;
* `flower-superexec` with the same secret: launches the ServerApp for each submitted run;
* the fleet front (`fedsubtype.federation.fleet_front`) on the public address: forwards only the Fleet API.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedsubtype.errors import UserError
from fedsubtype.federation.fleet_front import FrontConfig, front_args
from fedsubtype.federation.processes import flower_executable, start, stop, tail, wait_for_port

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class LinkTLS:
    """The coordinator's TLS files (federation.yaml `tls:`)."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_loopback_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for the SuperLink when federation.yaml sets none)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def superlink_args(port: int, tls: LinkTLS | None, secret_file: Path) -> list[str]:
    """`flower-superlink` on loopback; tls None = plain text without node authentication (a one-machine trial)."""
    args = [flower_executable("flower-superlink"), "--host", LOOPBACK, "--port", str(port),
            "--disable-runtime-dependency-installation", "--isolation", "process",
            "--superexec-auth-secret-file", str(secret_file)]
    if tls is None:
        return [*args, "--insecure"]
    return [*args, "--ssl-ca-certfile", str(tls.ca_certificate), "--ssl-certfile", str(tls.certificate),
            "--ssl-keyfile", str(tls.private_key), "--enable-supernode-auth"]


def superexec_args(port: int, tls: LinkTLS | None, secret_file: Path, parent_pid: int) -> list[str]:
    """`flower-superexec` for the ServerApp, signing its AcquireTask calls with the secret; it exits with the
    SuperLink (`--parent-pid`). Run-time dependency installation stays off (its default)."""
    args = [flower_executable("flower-superexec"), "--runtime-api-address", f"{LOOPBACK}:{port}",
            "--superexec-auth-secret-file", str(secret_file), "--parent-pid", str(parent_pid)]
    return [*args, "--insecure"] if tls is None else [*args, "--root-certificates", str(tls.ca_certificate)]


def fleet_front_args(host: str, port: int, superlink_port: int, tls: LinkTLS | None) -> list[str]:
    """The fleet front on the public address `host:port`, forwarding to the loopback SuperLink."""
    upstream = f"{LOOPBACK}:{superlink_port}"
    if tls is None:
        return front_args(FrontConfig(host, port, upstream))
    return front_args(FrontConfig(host, port, upstream, tls.certificate, tls.private_key, tls.ca_certificate))


def check_port_free(host: str, port: int, key: str) -> None:
    """UserError naming the federation.yaml key when another program already listens on host:port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                            "another program (or another coordinator) uses it: choose another port",
                            where=key) from None


def connect_host(host: str) -> str:
    """Where this machine reaches a server listening on `host` (a wildcard address means loopback)."""
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host


class CoordinatorLink:
    """The coordinator's three processes (SuperLink on loopback, its SuperExec, the fleet front), started in that
    order, each waited for, and stopped together. Logs go to `logs/superlink.log`, `superexec.log`, `fleet_front.log`."""

    def __init__(self, host: str, port: int, superlink_port: int | None, tls: LinkTLS | None, home: Path,
                 logs: Path, env: dict[str, str], cwd: Path) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.superlink_port = superlink_port or free_loopback_port()
        self.home, self.logs, self.env, self.cwd = home, logs, env, cwd
        self.procs: list[subprocess.Popen] = []

    @property
    def superlink_address(self) -> str:
        """The SuperLink's own address, for the coordinator's `flwr` calls."""
        return f"{LOOPBACK}:{self.superlink_port}"

    def start(self) -> None:
        """Start the three processes; UserError naming the one that failed (and its log) otherwise."""
        from fedsubtype.federation.credentials import create_secret_file

        check_port_free(LOOPBACK, self.superlink_port, "superlink_port")
        check_port_free(self.host, self.port, "port")
        secret = create_secret_file(self.home / "superexec.secret")
        superlink = self._start("superlink", superlink_args(self.superlink_port, self.tls, secret))
        self._wait("SuperLink", superlink, "superlink", LOOPBACK, self.superlink_port)
        superexec = self._start("superexec", superexec_args(self.superlink_port, self.tls, secret, superlink.pid))
        front = self._start("fleet_front", fleet_front_args(self.host, self.port, self.superlink_port, self.tls))
        self._wait("fleet front", front, "fleet_front", connect_host(self.host), self.port)
        if superexec.poll() is not None:
            raise UserError(f"the SuperExec stopped at start (exit {superexec.returncode})",
                            f"see {self.logs / 'superexec.log'}", where="superexec")

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = start(args, self.logs / f"{name}.log", env=self.env, cwd=self.cwd)
        self.procs.append(proc)
        return proc

    def _wait(self, what: str, proc: subprocess.Popen, log_name: str, host: str, port: int,
              timeout_s: float = 60) -> None:
        """Until `proc` accepts connections on host:port; UserError when it exits or stays silent."""
        log_path = self.logs / f"{log_name}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = tail(log_path, 20)
                hint = "another program may use the port" if "address already in use" in text.lower() else "see the log"
                raise UserError(f"the {what} stopped at start (exit {proc.returncode})", f"{hint}: {log_path}",
                                where=f"port {port}")
            try:
                wait_for_port(host, port, retries=0, timeout_s=2, say=lambda m: None)
                return
            except UserError:
                time.sleep(0.5)
        raise UserError(f"the {what} did not start listening within {timeout_s:g} s", f"see {log_path}",
                        where=f"port {port}")

    def close(self) -> None:
        """Stop the front first (no new site traffic), then the SuperExec and the SuperLink."""
        for proc in reversed(self.procs):
            stop(proc)
        self.procs = []
