"""The site command's side of the warm executor: the SuperExec secret, the SuperNode flags that hand tasks
to it, and the executor process itself, restarted when it dies (a crash or an out-of-memory kill)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from fedsubtype.errors import UserError

SECRET_FILE = "superexec.secret"
READY_LINE = "site executor: ready"
"""What the executor prints once it can take tasks; one that dies before it, twice running, will not start."""

ECHO_KEYS = ("declined run", "task failed", READY_LINE, "Error", "Traceback")
"""Executor log lines the site command shows (its per-message lines stay in the log)."""


def write_secret(state_dir: Path) -> Path:
    """A fresh SuperExec auth secret (mode 0600 from the start) shared by the SuperNode and the executor."""
    from fedsubtype.federation.credentials import write_private_file

    path = Path(state_dir) / SECRET_FILE
    write_private_file(path, secrets.token_hex(32).encode("ascii"))
    return path


def supernode_isolation_args(secret_file: Path) -> list[str]:
    """`flower-supernode` flags: launch no ClientApp processes; only holders of the secret may claim tasks."""
    return ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]


def executor_args(site_file: Path, secret_file: Path) -> list[str]:
    """Command line of the site's warm executor."""
    return [sys.executable, "-m", "fedsubtype.federation.site_executor", "--site", str(site_file),
            "--secret-file", str(secret_file)]


def _exit_words(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


class WarmExecutor:
    """The site's one warm executor process: started once, restarted by `check()` whenever it has died."""

    def __init__(self, site_file: Path, secret_file: Path, log_path: Path, env: dict[str, str] | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.args = executor_args(site_file, secret_file)
        self.secret_file = secret_file
        self._offset = 0
        self.log_path, self.env, self.say = log_path, env, say
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._started_at_byte = 0
        self._failed_starts = 0

    @classmethod
    def for_site(cls, site, env: dict[str, str] | None = None, say: Callable[[str], None] = print) -> "WarmExecutor":
        """The executor of `site` (a SiteConfig), with a fresh secret and its log in the site's state folder."""
        state = site.state_dir()
        executor = cls(site.source, write_secret(state), state / "logs" / "executor.log", env, say)
        executor._offset = executor.log_path.stat().st_size if executor.log_path.is_file() else 0
        return executor

    def supernode_args(self) -> list[str]:
        """The SuperNode flags that hand its tasks to this executor."""
        return supernode_isolation_args(self.secret_file)

    def poll(self) -> None:
        """Restart the executor if it died, and show its new log lines about runs."""
        self.check()
        self._offset = self._echo_new()

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return b""

    def _echo_new(self) -> int:
        chunk = self._log_since(self._offset)
        for line in chunk.decode("utf-8", errors="replace").splitlines():
            if any(key in line for key in ECHO_KEYS):
                self.say(line.strip())
        return self._offset + len(chunk)

    def start(self) -> subprocess.Popen:
        from fedsubtype.federation.processes import start

        self._started_at_byte = self.log_path.stat().st_size if self.log_path.is_file() else 0
        self.proc = start(self.args, self.log_path, env=self.env)
        return self.proc

    def check(self) -> None:
        """Restart the executor if it has exited; UserError when it keeps dying right after starting."""
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        text = self._log_since(self._started_at_byte).decode("utf-8", errors="replace")
        self._failed_starts = 0 if READY_LINE in text else self._failed_starts + 1
        if self._failed_starts >= 2:
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            raise UserError(f"the site executor does not start ({_exit_words(code)}: {last[0].strip()[:200]})",
                            f"see {self.log_path}")
        self.restarts += 1
        self.say(f"site executor stopped ({_exit_words(code)}); restarting it")
        self.start()

    def stop(self) -> None:
        from fedsubtype.federation.processes import stop

        stop(self.proc)
