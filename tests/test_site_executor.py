"""A site runs only the app it approved, in one warm process.

Unit tests: the app hash a site computes is byte for byte what `flwr run` submits (Flower's own FAB builder
on disk), and the approval list is validated. End to end with the real processes (SuperLink with TLS and
node authentication, SuperNodes with `--isolation process`, the site's warm executor): a tampered app is
declined before any of it is imported, and the same site processes then run the approved app.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedsubtype.errors import ConfigError, UserError
from fedsubtype.federation.approval import (DECLINE_REASON, AppApproval, app_hash, check_hashes, fab_file_hash,
                                            installed_app_dir, installed_app_hash, sha256_hex)
from fedsubtype.federation.site_config import SiteConfig

REPO = Path(__file__).resolve().parent.parent


def _copy_app(dst: Path) -> Path:
    """The Flower app of this source tree (pyproject.toml, client/, server/) plus files it must not bundle."""
    dst.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    for pkg in ("client", "server"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "notes.py").write_text("print('not in fab-include')\n", encoding="utf-8")
    (dst / ".venv" / "lib").mkdir(parents=True)
    (dst / ".venv" / "lib" / "x.py").write_text("x = 1\n", encoding="utf-8")
    return dst


def _flower_hash(app_dir: Path) -> str:
    from flwr.cli.build import build_fab_from_disk

    return sha256_hex(build_fab_from_disk(app_dir))


def test_app_hash_is_what_flwr_run_submits(tmp_path):
    app = _copy_app(tmp_path / "app")
    assert app_hash(app) == _flower_hash(app)


def test_the_installed_app_hash_matches_the_source_tree():
    assert installed_app_dir() == REPO
    assert installed_app_hash() == _flower_hash(REPO)


def test_any_change_to_the_bundled_code_changes_the_hash(tmp_path):
    app = _copy_app(tmp_path / "app")
    before = app_hash(app)
    (app / "notes.py").write_text("print('changed, but not bundled')\n", encoding="utf-8")
    assert app_hash(app) == before
    client = app / "client" / "client_app.py"
    client.write_text(client.read_text(encoding="utf-8") + "\nopen('marker', 'w').close()\n", encoding="utf-8")
    assert app_hash(app) != before
    assert app_hash(app) == _flower_hash(app)


def test_fab_file_hash_is_sha256_of_the_file(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = _copy_app(tmp_path / "app")
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(app))
    assert fab_file_hash(fab) == app_hash(app)
    with pytest.raises(UserError, match="FAB file not found"):
        fab_file_hash(tmp_path / "missing.fab")


def test_approved_apps_are_validated_and_the_installed_app_is_approved_by_default(tmp_path):
    good = "ab" * 32
    assert check_hashes([good.upper(), f" {good} "], "x") == [good, good]
    with pytest.raises(ConfigError, match="not a sha256 app hash"):
        check_hashes(["abc"], "site.yaml: approved_apps")
    site = SiteConfig(name="s", manifest=tmp_path / "m.csv")
    site.approved_apps = [good]  # type: ignore[attr-defined]
    approval = AppApproval.for_site(site)
    assert approval.hashes() == {good, installed_app_hash()}
    assert approval.approves(good) and approval.approves(installed_app_hash())
    assert not approval.approves("cd" * 32)
    site.approve_installed_app = False  # type: ignore[attr-defined]
    approval = AppApproval.for_site(site)
    assert approval.hashes() == {good} and not approval.approves(installed_app_hash())


def test_the_approve_hash_command_prints_the_hashes(tmp_path, capsys):
    from fedsubtype.cli.approve_hash_cmd import main

    app = _copy_app(tmp_path / "app")
    assert main(["--app-dir", str(app)]) == 0
    assert app_hash(app) in capsys.readouterr().out
    fab = tmp_path / "app.fab"
    fab.write_bytes(b"not really a zip")
    assert main(["--fab", str(fab)]) == 0
    out = capsys.readouterr().out
    assert sha256_hex(b"not really a zip") in out and "approved_apps" in out
    assert main(["--fab", str(tmp_path / "nope.fab")]) == 1
    assert DECLINE_REASON == "app not approved by the site"


def test_the_superexec_secret_is_private_and_handed_to_the_supernode(tmp_path):
    from fedsubtype.federation.executor_process import supernode_isolation_args, write_secret

    secret = write_secret(tmp_path / "state")
    first = secret.read_bytes()
    assert secret.stat().st_mode & 0o077 == 0 and len(first) == 64
    assert write_secret(tmp_path / "state").read_bytes() != first  # fresh for every site command
    assert supernode_isolation_args(secret) == ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def test_an_executor_that_cannot_start_is_restarted_once_then_reported(tmp_path):
    from fedsubtype.federation.executor_process import WarmExecutor, write_secret

    said: list[str] = []
    executor = WarmExecutor(tmp_path / "missing.yaml", write_secret(tmp_path), tmp_path / "executor.log", say=said.append)
    try:
        executor.start().wait(timeout=300)
        executor.check()
        assert executor.restarts == 1 and "restarting it" in said[-1]
        executor.proc.wait(timeout=300)
        with pytest.raises(UserError, match="does not start.*exit code 1"):
            executor.check()
    finally:
        executor.stop()


def test_flower_is_the_pinned_version_whose_internals_the_site_uses(monkeypatch):
    import inspect
    import time
    from importlib.metadata import version

    from flwr.supernode import start_client_internal

    from fedsubtype.federation.supernode_launch import patch_supernode_waits

    assert version("flwr").startswith("1.42."), "the site executor uses Flower 1.42's internal runtime API"
    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # the waits supernode_launch shortens
    monkeypatch.setattr(start_client_internal, "time", time)
    patch_supernode_waits()
    patched = start_client_internal.time
    assert patched.monotonic is time.monotonic
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    patched.sleep(3), patched.sleep(0.5), patched.sleep(2)
    assert slept == [0.5, 0.1, 2]


# ---------------------------------------------------------------- end to end, real processes on loopback

@pytest.fixture(scope="module")
def federation(phantom_cohort, tmp_path_factory):
    """Credentials for two phantom sites and a shared cache."""
    from fedsubtype.federation.credentials import create_dev_credentials
    from fedutil import manifest_of

    root = tmp_path_factory.mktemp("approval")
    creds = root / "creds"
    create_dev_credentials(creds, ["site1", "site2"], ["localhost", "127.0.0.1"])
    return {"manifest": manifest_of(phantom_cohort), "creds": creds, "cache": root / "cache"}


def _tampered_app(folder: Path, marker: Path) -> Path:
    """This app with a ClientApp that leaves a marker file as soon as it is imported."""
    app = _copy_app(folder)
    client = app / "client" / "client_app.py"
    client.write_text(client.read_text(encoding="utf-8") + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text"
                      "('the coordinator ran code at the site')\n", encoding="utf-8")
    return app


def _executor_pids(text: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(r"site executor: ready \(pid (\d+)\)", text)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_tampered_app_is_declined_and_the_approved_app_then_runs_on_the_same_sites(federation, procs, tmp_path):
    import os
    import signal

    from fedutil import client_cmd, free_port, rounds, server_cmd, wait_until, write_federation, write_site

    marker = tmp_path / "MARKER"
    tampered = _tampered_app(tmp_path / "tampered", marker)
    port = free_port()
    sites = ["site1", "site2"]
    for s in sites:
        path = write_site(tmp_path, s, federation["manifest"], port, federation["creds"], federation["cache"])
        procs.start(s, client_cmd("--site", str(path), "--quiet"))

    (tmp_path / "c1").mkdir()
    fed = write_federation(tmp_path / "c1", sites, port, federation["creds"], tmp_path / "run-tampered", rounds=1,
                           min_sites=2, evaluate_every=0, app_dir=str(tampered))
    procs.start("coordinator-tampered", server_cmd("--federation", str(fed)))
    procs.wait("coordinator-tampered", timeout=900)
    train = [r for r in rounds(tmp_path / "run-tampered") if r["phase"] == "train"]
    assert len(train) == 1 and not train[0]["answered"] and not train[0]["accepted"], procs.dump()
    assert sorted(train[0]["failed"]) == [f"{s}: app not approved by the site" for s in sites]
    assert not marker.exists()
    for s in sites:
        out = procs.text(s)
        assert "declined run" in out and app_hash(tampered) in out and "approved_apps" in out, out
        assert procs.procs[s].poll() is None  # still connected, waiting for the next run
    first_pids = {s: _executor_pids(procs.text(s)) for s in sites}
    assert all(len(p) == 1 for p in first_pids.values()), first_pids

    os.kill(first_pids["site1"][0], signal.SIGKILL)  # a crash (or an out-of-memory kill) of site1's executor
    wait_until(lambda: len(_executor_pids(procs.text("site1"))) == 2, 300, "site1's executor to be restarted",
               procs, alive="site1")
    assert "restarting it" in procs.text("site1")

    (tmp_path / "c2").mkdir()
    fed = write_federation(tmp_path / "c2", sites, port, federation["creds"], tmp_path / "run-approved", rounds=1,
                           min_sites=2, evaluate_every=0)
    procs.start("coordinator", server_cmd("--federation", str(fed)))
    assert procs.wait("coordinator", timeout=900) == 0, procs.dump()
    train = [r for r in rounds(tmp_path / "run-approved") if r["phase"] == "train"]
    assert len(train) == 1 and train[0]["accepted"], train
    assert sorted(a["site"] for a in train[0]["answered"]) == sites
    assert not marker.exists()
    assert _executor_pids(procs.text("site2")) == first_pids["site2"]  # the same warm process ran the round
    assert all(procs.procs[s].poll() is None for s in sites)
