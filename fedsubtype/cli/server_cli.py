"""`fedsubtype-server`: the coordinator.

    fedsubtype-server --federation federation.yaml [--resume RUN_DIR] [--overwrite]
    fedsubtype-server credentials --out DIR --sites a,b,c [--hosts localhost,127.0.0.1]

Starts a Flower SuperLink with TLS and SuperNode authentication, registers the listed sites' public keys,
waits for the minimum number of sites, submits the run (`flwr run`), shows per-round progress, and leaves
a run folder with per-round metrics, checkpoints and the final `model.pt`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from fedsubtype.errors import UserError
from fedsubtype.cli import run_guarded

PROG = "fedsubtype-server"
CONNECTION = "fedsubtype"
PROGRESS = "[fedsubtype]"


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
    return 0


def app_dir_for(cfg) -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app])."""
    import fedsubtype

    candidates = [cfg.app_dir] if cfg.app_dir else [Path(fedsubtype.__file__).resolve().parent.parent]
    for c in candidates:
        pyproject = Path(c) / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
            return Path(c)
    raise UserError("cannot find the Flower app (pyproject.toml with [tool.flwr.app])",
                    "set app_dir in federation.yaml to the fedsubtype source folder", where="app_dir")


def _write_flwr_config(home: Path, cfg) -> None:
    from fedsubtype.configio import atomic_write_text

    address = f"{cfg.host if cfg.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{cfg.port}"
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if cfg.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(cfg.tls.ca_certificate))}")
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")


class Coordinator:
    """The SuperLink process and the `flwr` calls made against it."""

    def __init__(self, cfg, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.home = run_dir / ".flwr"
        self.logs = run_dir / "logs"
        self.env = {"FLWR_HOME": str(self.home)}
        self.superlink = None

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        from fedsubtype.federation.processes import child_env, flower_executable

        return subprocess.run([flower_executable("flwr"), *args], capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                              env=child_env(self.env))

    def start_superlink(self) -> None:
        from fedsubtype.federation.processes import flower_executable, start, tail, wait_for_port

        cfg = self.cfg
        _write_flwr_config(self.home, cfg)
        args = [flower_executable("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port),
                "--disable-runtime-dependency-installation"]
        if cfg.insecure:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(cfg.tls.ca_certificate), "--ssl-certfile", str(cfg.tls.certificate),
                     "--ssl-keyfile", str(cfg.tls.private_key), "--enable-supernode-auth"]
        log_path = self.logs / "superlink.log"
        self.superlink = start(args, log_path, env=self.env, cwd=self.run_dir)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                text = tail(log_path, 20)
                hint = "another program may use the port" if "address already in use" in text.lower() else "see the log"
                raise UserError(f"the SuperLink stopped at start (exit {self.superlink.returncode})",
                                f"{hint}: {log_path}", where=f"port {cfg.port}")
            try:
                wait_for_port(host, cfg.port, retries=0, timeout_s=2, say=lambda m: None)
                break
            except UserError:
                time.sleep(0.5)
        else:
            raise UserError("the SuperLink did not start listening within 60 s", f"see {log_path}",
                            where=f"port {cfg.port}")
        print(f"SuperLink listening on {cfg.host}:{cfg.port} "
              f"({'INSECURE, no authentication' if cfg.insecure else 'TLS + SuperNode authentication'})")

    def register_sites(self) -> dict[int, str]:
        """Register every listed site's public key (all at once); node id -> site name."""
        from fedsubtype.federation.processes import child_env, flower_executable

        nodes: dict[int, str] = {}
        if self.cfg.insecure:
            return nodes
        env = child_env(self.env)
        running = [(site, subprocess.Popen([flower_executable("flwr"), "supernode", "register", str(site.public_key),
                                            CONNECTION, "--name", site.name, "--format", "json"],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env))
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
            except (ValueError, KeyError, TypeError):
                pass
            print(f"registered site {site.name}", flush=True)
        return nodes

    def online_nodes(self) -> list[int]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if res.returncode != 0:
            return []
        try:
            data = json.loads(res.stdout)
        except ValueError:
            return []
        rows = data.get("nodes", data) if isinstance(data, dict) else data
        return [int(r.get("node-id", r.get("node_id", 0))) for r in rows
                if isinstance(r, dict) and str(r.get("status", "online")).lower() == "online"]

    def wait_for_sites(self, names: dict[int, str]) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.wait_for_sites_s
        last = None
        while True:
            online = self.online_nodes()
            if len(online) >= cfg.min_sites:
                who = ", ".join(names.get(n, str(n)) for n in online)
                print(f"{len(online)} site(s) connected ({who})")
                return
            if len(online) != last:
                print(f"waiting for sites: {len(online)} of at least {cfg.min_sites} connected")
                last = len(online)
            if time.monotonic() > deadline:
                raise UserError(f"only {len(online)} of the required {cfg.min_sites} site(s) connected within "
                                f"{cfg.wait_for_sites_s:g} s", "start the sites (fedsubtype-client --site site.yaml) "
                                "or lower min_sites", where="wait_for_sites_s")
            time.sleep(2)

    def submit(self, app_dir: Path) -> int:
        """`flwr run APP CONNECTION --stream`; progress lines shown, everything logged; returns its exit code."""
        from fedsubtype.federation.processes import child_env, die_with_parent, flower_executable

        args = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream",
                "--run-config", f"run-dir={json.dumps(str(self.run_dir))}"]
        log_path = self.logs / "run.log"
        with open(log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                    env={**child_env(self.env), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                    preexec_fn=die_with_parent)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if PROGRESS in line:
                        print(line.split(PROGRESS, 1)[1].strip(), flush=True)
                    elif "ERROR" in line or "Traceback" in line:
                        print(line.rstrip(), file=sys.stderr, flush=True)
                return proc.wait()
            finally:
                if proc.poll() is None:
                    from fedsubtype.federation.processes import stop

                    stop(proc)

    def close(self) -> None:
        from fedsubtype.federation.processes import stop

        stop(self.superlink)
        self.superlink = None


def _last_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (res.stdout + "\n" + res.stderr).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else f"exit {res.returncode}"


def prepare_run(args: argparse.Namespace):
    """The validated federation config and its run folder (fresh, or the one to resume)."""
    from fedsubtype.configio import atomic_write_text, from_dict, to_dict
    from fedsubtype.federation.config import FederationConfig, load_federation_config

    if args.federation is None and args.resume is None:
        raise UserError("nothing to run", "pass --federation federation.yaml (or --resume RUN_DIR)", where=PROG)
    if args.resume is not None:
        run_dir = args.resume.resolve()
        launch = run_dir / "launch.json"
        if not launch.is_file():
            raise UserError("not a federation run folder (no launch.json)", "pass the run folder of a started run",
                            where=str(run_dir))
        if args.federation is not None:
            cfg = load_federation_config(args.federation)
            where = str(args.federation)
        else:
            cfg = from_dict(FederationConfig, json.loads(launch.read_text(encoding="utf-8"))["federation"],
                            where=str(launch))
            where = str(launch)
        cfg.run_dir = run_dir
    else:
        cfg = load_federation_config(args.federation)
        where = str(args.federation)
        run_dir = Path(cfg.run_dir).resolve()
        started = (run_dir / "rounds.json").exists() or (run_dir / "checkpoints").is_dir()
        if started and not args.overwrite:
            raise UserError("run folder already holds a run", "pass --resume RUN_DIR to continue it, --overwrite to "
                            "start over, or set another run_dir", where=str(run_dir))
        if args.overwrite:
            for name in ("rounds.json", "metrics_per_round.csv", "metrics_per_site.csv", "model.pt", "run_id"):
                (run_dir / name).unlink(missing_ok=True)
            ckpts = run_dir / "checkpoints"
            if ckpts.is_dir():
                for f in ckpts.iterdir():
                    f.unlink()
    cfg.check_files(where)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"federation": to_dict(cfg), "resume": args.resume is not None}
    atomic_write_text(run_dir / "launch.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(run_dir / "federation.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    return cfg, run_dir


def run(args: argparse.Namespace) -> int:
    from fedsubtype.configio import atomic_write_text

    cfg, run_dir = prepare_run(args)
    app_dir = app_dir_for(cfg)
    if cfg.insecure:
        print(f"{PROG}: WARNING: INSECURE MODE — no TLS, no node authentication; for a trial on one machine only.",
              file=sys.stderr)
    coord = Coordinator(cfg, run_dir)
    try:
        coord.start_superlink()
        names = coord.register_sites()
        atomic_write_text(run_dir / "nodes.json", json.dumps({str(k): v for k, v in names.items()}) + "\n")
        coord.wait_for_sites(names)
        print(f"submitting the run: {cfg.strategy}, {cfg.rounds} round(s), run folder {run_dir}")
        code = coord.submit(app_dir)
    finally:
        coord.close()
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
