"""Helpers for the federation tests: free ports, site/federation files, and child processes that are
always cleaned up (each started in its own process group, killed as a group at the end)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from fedsubtype.federation.processes import child_env

BIN = Path(sys.executable).parent
TINY_MODEL = {"width": 8, "groups": 4, "feature_dim": 16, "hidden_dim": 16}


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_of(cohort) -> Path:
    """The manifest path of the `phantom_cohort` fixture (a path, or a tuple starting with it)."""
    return Path(cohort) if not isinstance(cohort, (tuple, list)) else Path(cohort[0])


def site_names(manifest: Path) -> list[str]:
    """Distinct values of the manifest's `site` column, sorted."""
    import csv

    with open(manifest, newline="", encoding="utf-8") as fh:
        return sorted({row["site"] for row in csv.DictReader(fh)})


class Procs:
    """Child processes of one test; `close()` kills every process group, also on failure."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        fh = open(log, "ab")
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**child_env(env), "PYTHONUNBUFFERED": "1"})
        fh.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a child with everything it started (as a crash would), including Flower's own sessions."""
        from fedsubtype.federation.processes import descendants

        proc = self.procs[name]
        below = descendants(proc.pid)
        for pid in [proc.pid, *below]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish within {timeout:g} s\n{self.dump()}") from None

    def text(self, name: str) -> str:
        return self.logs[name].read_text(encoding="utf-8", errors="replace") if self.logs[name].is_file() else ""

    def dump(self, lines: int = 40) -> str:
        out = []
        for name, log in self.logs.items():
            tail = "\n".join(self.text(name).splitlines()[-lines:])
            out.append(f"----- {name} -----\n{tail}")
        return "\n".join(out)

    def close(self) -> None:
        """SIGTERM every child's group and descendants, then SIGKILL what is left."""
        from fedsubtype.federation.processes import descendants

        below: list[int] = []
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                below += descendants(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may hold grandchildren even when the leader is gone
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in below:
            if Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def wait_until(check: Callable[[], bool], timeout: float, what: str, procs: Procs | None = None,
               alive: str = "server") -> None:
    """Poll `check` every half second; AssertionError naming `what` (with the logs) on timeout, or as soon
    as the `alive` process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if procs is not None and alive in procs.procs and procs.procs[alive].poll() is not None:
            raise AssertionError(f"{alive} exited ({procs.procs[alive].returncode}) while waiting for {what}\n"
                                 f"{procs.dump()}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{procs.dump() if procs else ''}")


def write_site(folder: Path, name: str, manifest: Path, port: int, creds: Path, cache: Path, *,
               key_name: str | None = None, **extra) -> Path:
    """A site.yaml for a phantom site on loopback."""
    cfg = {"name": name, "manifest": str(manifest), "manifest_site": name, "superlink": f"127.0.0.1:{port}",
           "ca_certificate": str(creds / "ca.crt"), "auth_private_key": str(creds / "sites" / f"{key_name or name}.key"),
           "local_port": free_port(), "work_dir": str(folder / f"state-{name}"), "cache": str(cache), "threads": 1,
           "connect_retries": 30, "connect_timeout_s": 300, "preprocess": {"size": 16}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def write_federation(folder: Path, sites: list[str], port: int, creds: Path, run_dir: Path, **extra) -> Path:
    """A federation.yaml for loopback with TLS + node authentication and the tiny model."""
    cfg = {"sites": [{"name": s, "public_key": str(creds / "sites" / f"{s}.pub")} for s in sites],
           "run_dir": str(run_dir), "rounds": 2, "strategy": "fedprox", "proximal_mu": 0.01, "local_epochs": 1,
           "local_steps": 2, "batch_size": 4, "lr": 0.001, "min_sites": len(sites), "port": port,
           "round_timeout_s": 240, "wait_for_sites_s": 240, "augment": False,
           "tls": {"ca_certificate": str(creds / "ca.crt"), "certificate": str(creds / "server.crt"),
                   "private_key": str(creds / "server.key")},
           "model": dict(TINY_MODEL), "preprocess": {"size": 16}, **extra}
    path = folder / "federation.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def rounds(run_dir: Path) -> list[dict]:
    """rounds.json of a run folder ([] before the first round)."""
    path = run_dir / "rounds.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except ValueError:
        return []


def evaluate_model(model: Path, manifest: Path, cache: Path, out_dir: Path) -> dict:
    """`fedsubtype evaluate` on a run's model.pt, as a user would run it; its metrics.json, checked to hold
    every task's AUC (a federated model.pt is a normal model file)."""
    res = subprocess.run([str(BIN / "fedsubtype"), "evaluate", "--model", str(model), "--manifest", str(manifest),
                          "--out", str(out_dir), "--n-boot", "10", "--cache", str(cache)],
                         capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    assert {"er", "pr", "her2", "ki67", "mean_auc"} <= set(metrics)
    return metrics


def server_cmd(*args: str) -> list[str]:
    return [str(BIN / "fedsubtype-server"), *args]


def client_cmd(*args: str) -> list[str]:
    return [str(BIN / "fedsubtype-client"), *args]
