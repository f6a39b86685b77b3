"""The coordinator's side of a federation: prepare the run folder, start the SuperLink (TLS + SuperNode
authentication) on loopback behind the fleet front (loopback_link.py), register the sites' keys, wait for enough
sites, and submit the run with `flwr run`.

`fedsubtype-server` parses its arguments and calls `prepare_run` then `coordinate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from fedsubtype.configio import atomic_write_text, to_dict
from fedsubtype.errors import UserError
from fedsubtype.federation.config import FederationConfig, load_federation_config
from fedsubtype.federation.loopback_link import CoordinatorLink, LinkTLS
from fedsubtype.federation.launch import LAUNCH_FILE, RUN_DIR_KEY, read_launch_file, write_launch
from fedsubtype.federation.phase import NODES_FILE
from fedsubtype.federation.processes import child_env, die_with_parent, flower_executable, stop
from fedsubtype.federation.rounds import PROGRESS

CONNECTION = "fedsubtype"
"""Name of the SuperLink connection in the run's own Flower config (<run-dir>/.flwr/config.toml)."""
FRESH_START_FILES = ("rounds.json", "metrics_per_round.csv", "metrics_per_site.csv", "model.pt", "run_id")
"""Run-folder files an --overwrite removes (with checkpoints/)."""


def app_dir_for(cfg: FederationConfig) -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app])."""
    import fedsubtype

    candidates = [cfg.app_dir] if cfg.app_dir else [Path(fedsubtype.__file__).resolve().parent.parent]
    for c in candidates:
        pyproject = Path(c) / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
            return Path(c)
    raise UserError("cannot find the Flower app (pyproject.toml with [tool.flwr.app])",
                    "set app_dir in federation.yaml to the fedsubtype source folder", where="app_dir")


def _resumed_config(run_dir: Path, federation: Path | None) -> tuple[FederationConfig, str]:
    """The config of a run to resume: federation.yaml when given, else the one the run was started with."""
    launch = run_dir / LAUNCH_FILE
    if not launch.is_file():
        raise UserError(f"not a federation run folder (no {LAUNCH_FILE})", "pass the run folder of a started run",
                        where=str(run_dir))
    if federation is not None:
        cfg, where = load_federation_config(federation), str(federation)
    else:
        cfg, where = read_launch_file(launch)[0], str(launch)
    cfg.run_dir = run_dir
    return cfg, where


def _clear_run_folder(run_dir: Path) -> None:
    """Remove an earlier run's records, checkpoints and model (--overwrite)."""
    for name in FRESH_START_FILES:
        (run_dir / name).unlink(missing_ok=True)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for f in ckpts.iterdir():
            f.unlink()


def prepare_run(federation: Path | None, resume: Path | None, overwrite: bool) -> tuple[FederationConfig, Path]:
    """The validated federation config and its run folder (fresh, or the one to resume), with launch.json written."""
    if federation is None and resume is None:
        raise UserError("nothing to run", "pass --federation federation.yaml (or --resume RUN_DIR)",
                        where="fedsubtype-server")
    if resume is not None:
        run_dir = resume.resolve()
        cfg, where = _resumed_config(run_dir, federation)
    else:
        assert federation is not None
        cfg, where = load_federation_config(federation), str(federation)
        run_dir = Path(cfg.run_dir).resolve()
        started = (run_dir / "rounds.json").exists() or (run_dir / "checkpoints").is_dir()
        if started and not overwrite:
            raise UserError("run folder already holds a run", "pass --resume RUN_DIR to continue it, --overwrite to "
                            "start over, or set another run_dir", where=str(run_dir))
        if overwrite:
            _clear_run_folder(run_dir)
    cfg.check_files(where)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_launch(run_dir, cfg, resume is not None)
    atomic_write_text(run_dir / "federation.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    return cfg, run_dir


def write_flwr_config(home: Path, cfg: FederationConfig, address: str) -> None:
    """The run's own Flower config (FLWR_HOME): one connection, to the SuperLink on loopback, for the `flwr` calls."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if cfg.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(cfg.tls.ca_certificate))}")
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")


def _last_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (res.stdout + "\n" + res.stderr).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else f"exit {res.returncode}"


def _online(rows: object) -> list[int]:
    """Node ids of the online SuperNodes in `flwr supernode ls --format json` output."""
    rows = rows.get("nodes", rows) if isinstance(rows, dict) else rows
    return [int(r.get("node-id", r.get("node_id", 0))) for r in rows  # type: ignore[union-attr]
            if isinstance(r, dict) and str(r.get("status", "online")).lower() == "online"]


def _link_tls(cfg: FederationConfig) -> LinkTLS | None:
    """The coordinator's TLS files, or None for an insecure trial (loopback only: FederationConfig.validate)."""
    if cfg.insecure:
        return None
    return LinkTLS(cfg.tls.ca_certificate, cfg.tls.certificate, cfg.tls.private_key)  # type: ignore[arg-type]


class Coordinator:
    """The SuperLink process and the `flwr` calls made against it."""

    def __init__(self, cfg: FederationConfig, run_dir: Path, say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.home = run_dir / ".flwr"
        self.logs = run_dir / "logs"
        self.env = {"FLWR_HOME": str(self.home)}
        self.say = say
        self.link = CoordinatorLink(cfg.host, cfg.port, cfg.superlink_port, _link_tls(cfg), self.home, self.logs,
                                    self.env, run_dir)

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `flwr ARGS` against this run's SuperLink connection."""
        return subprocess.run([flower_executable("flwr"), *args], capture_output=True, text=True, encoding="utf-8",
                              timeout=timeout, env=child_env(self.env))

    def start_superlink(self) -> None:
        """Start the SuperLink on loopback, its SuperExec and the fleet front (fedsubtype.federation.loopback_link);
        UserError naming the cause when one does not come up."""
        cfg = self.cfg
        write_flwr_config(self.home, cfg, self.link.superlink_address)
        self.link.start()
        self.say(f"SuperLink listening on {self.link.superlink_address} (this machine only) "
                 f"({'INSECURE, no authentication' if cfg.insecure else 'TLS + SuperNode authentication'}); "
                 f"sites connect to {cfg.host}:{cfg.port} (fleet front: Fleet API only)")

    def register_sites(self) -> dict[int, str]:
        """Register every listed site's public key (all at once); node id -> site name."""
        nodes: dict[int, str] = {}
        if self.cfg.insecure:
            return nodes
        env = child_env(self.env)
        running = [(site, subprocess.Popen([flower_executable("flwr"), "supernode", "register", str(site.public_key),
                                            CONNECTION, "--name", site.name, "--format", "json"],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                           env=env))
                   for site in self.cfg.sites]
        for site, proc in running:
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise UserError(f"registering site {site.name} timed out", "check the SuperLink log",
                                where=str(self.logs / "superlink.log")) from None
            res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            if res.returncode != 0:
                raise UserError(f"could not register site {site.name}: {_last_line(res)}",
                                "check its public key file", where=str(site.public_key))
            try:
                nodes[int(json.loads(res.stdout)["node-id"])] = site.name
            except (ValueError, KeyError, TypeError):  # only the logs' node-id → name lookup is lost
                self.say(f"site {site.name}: flwr did not report its node id; logs will show the id instead")
            self.say(f"registered site {site.name}")
        return nodes

    def online_nodes(self) -> list[int]:
        """Node ids of the SuperNodes connected now ([] when the SuperLink cannot say)."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if res.returncode != 0:
            return []
        try:
            return _online(json.loads(res.stdout))
        except ValueError:
            return []

    def wait_for_sites(self, names: dict[int, str]) -> None:
        """Wait until `min_sites` SuperNodes are online, at most `wait_for_sites_s`."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.wait_for_sites_s
        last = None
        while True:
            online = self.online_nodes()
            if len(online) >= cfg.min_sites:
                self.say(f"{len(online)} site(s) connected ({', '.join(names.get(n, str(n)) for n in online)})")
                return
            if len(online) != last:
                self.say(f"waiting for sites: {len(online)} of at least {cfg.min_sites} connected")
                last = len(online)
            if time.monotonic() > deadline:
                raise UserError(f"only {len(online)} of the required {cfg.min_sites} site(s) connected within "
                                f"{cfg.wait_for_sites_s:g} s", "start the sites (fedsubtype-client --site site.yaml) "
                                "or lower min_sites", where="wait_for_sites_s")
            time.sleep(2)

    def submit(self, app_dir: Path) -> int:
        """`flwr run APP CONNECTION --stream`; progress lines shown, everything logged; returns its exit code."""
        args = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream",
                "--run-config", f"{RUN_DIR_KEY}={json.dumps(str(self.run_dir))}"]
        with open(self.logs / "run.log", "a", encoding="utf-8") as log:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                    env={**child_env(self.env), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                    preexec_fn=die_with_parent)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if PROGRESS in line:
                        self.say(line.split(PROGRESS, 1)[1].strip())
                    elif "ERROR" in line or "Traceback" in line:
                        print(line.rstrip(), file=sys.stderr, flush=True)
                return proc.wait()
            finally:
                if proc.poll() is None:
                    stop(proc)

    def close(self) -> None:
        """Stop the fleet front, the SuperExec and the SuperLink (and everything they started)."""
        self.link.close()


def coordinate(cfg: FederationConfig, run_dir: Path, say: Callable[[str], None] = print) -> int:
    """Start the SuperLink, register and wait for the sites, submit the run; `flwr run`'s exit code."""
    app_dir = app_dir_for(cfg)
    coord = Coordinator(cfg, run_dir, say)
    try:
        coord.start_superlink()
        names = coord.register_sites()
        atomic_write_text(run_dir / NODES_FILE, json.dumps({str(k): v for k, v in names.items()}) + "\n")
        coord.wait_for_sites(names)
        say(f"submitting the run: {cfg.strategy}, {cfg.rounds} round(s), run folder {run_dir}")
        return coord.submit(app_dir)
    finally:
        coord.close()
