"""Starting and stopping Flower's own programs (flower-superlink, flower-supernode, flwr) as child processes.

Each child runs in its own process group so that it and the processes it spawns (ServerApp/ClientApp
runtimes) are stopped together; output goes to a log file in the run/site folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence

from fedsubtype.errors import UserError


def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring the one installed next to this Python."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise UserError(f"'{name}' is not installed", "install fedsubtype's dependencies (pip install -e .)")
    return found


def die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the parent dies, so a killed coordinator/site leaves no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


TASK_POLL_S = "0.2"
"""How often Flower's SuperExec looks for a task to launch (its default, 1 s, is paid once per message)."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's programs: ours, with this interpreter's scripts folder first on PATH, because
    Flower starts flower-superexec, flwr-clientapp and flwr-serverapp by name (an unactivated venv lacks them)."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        path = bindir + os.pathsep + path if path else bindir
    return {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_S, **os.environ, "PATH": path, **(extra or {})}


def start(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, stdout: int | IO | None = None) -> subprocess.Popen:
    """Start a child in its own process group, stdout+stderr appended to `log_path` (or to `stdout`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = stdout if stdout is not None else open(log_path, "ab")
    full_env = {**child_env(env), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                            start_new_session=True, preexec_fn=die_with_parent if sys.platform == "linux" else None)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), including those in other sessions (Flower starts some with setsid)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text(encoding="utf-8").split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL whatever is left after `grace_s`."""
    if proc is None:
        return
    below = descendants(proc.pid) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _signal_all(below, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _signal_all([p for p in below if Path(f"/proc/{p}").exists()], signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, *, retries: int, timeout_s: float, say=print) -> None:
    """Wait until host:port accepts TCP connections, with exponential back-off; UserError when it never does."""
    deadline = time.monotonic() + timeout_s
    delay = 1.0
    attempt = 0
    while True:
        attempt += 1
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if attempt > retries or time.monotonic() + delay > deadline:
            raise UserError(f"cannot reach the SuperLink at {host}:{port} ({reason}) after {attempt} attempt(s)",
                            "check the superlink address and that the coordinator is running", where="superlink")
        say(f"SuperLink {host}:{port} not reachable ({reason}); retrying in {delay:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def check_tls(host: str, port: int, ca_certificate: Path) -> None:
    """A TLS handshake with the SuperLink verified against `ca_certificate`; UserError naming the problem."""
    ctx = ssl.create_default_context(cafile=str(ca_certificate))
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as exc:
        raise UserError(f"the SuperLink's TLS certificate was rejected ({exc.verify_message})",
                        "use the CA certificate the coordinator gave you, and the host name its certificate names",
                        where="ca_certificate") from None
    except ssl.SSLError as exc:
        raise UserError(f"TLS handshake with the SuperLink failed ({exc.reason})",
                        "the SuperLink may run without TLS; ask the coordinator", where="superlink") from None
    except OSError as exc:
        raise UserError(f"cannot reach the SuperLink at {host}:{port} ({exc})", "check the address",
                        where="superlink") from None


def tail(path: Path, n: int = 60) -> str:
    """The last `n` lines of a log file ('' when missing)."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""
