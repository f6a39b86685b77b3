"""The federation for real on loopback: `fedsubtype-server` starts a real SuperLink (TLS + SuperNode
authentication), `fedsubtype-client` starts real SuperNodes, Flower runs the real ClientApp/ServerApp.

Tiny phantom (30 cases, 3 sites), input size 16, a tiny network and 2 local steps a round keep each test
to a couple of minutes on two CPU cores. Every process a test starts is killed at the end, also on failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedutil import (Procs, client_cmd, evaluate_model, free_port, manifest_of, rounds, server_cmd, site_names,
                     wait_until, write_federation, write_site)

# Real processes on two shared CPU cores: a run takes minutes, so the per-test limit is raised.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ALL_SITES = ["site1", "site2", "site3"]


@pytest.fixture(scope="module")
def setup(phantom_cohort, tmp_path_factory):
    """Credentials for the three phantom sites plus an unregistered 'intruder', and a shared warm cache."""
    from fedsubtype.federation.credentials import create_dev_credentials

    root = tmp_path_factory.mktemp("federation")
    manifest = manifest_of(phantom_cohort)
    assert site_names(manifest) == ALL_SITES
    creds = root / "creds"
    create_dev_credentials(creds, ALL_SITES + ["intruder"], ["localhost", "127.0.0.1"])
    return {"root": root, "manifest": manifest, "creds": creds, "cache": root / "cache"}


def _start(setup, procs: Procs, tmp: Path, sites: list[str], **fed) -> tuple[Path, int]:
    port = free_port()
    run_dir = tmp / "run"
    fed_file = write_federation(tmp, ALL_SITES, port, setup["creds"], run_dir, **fed)
    procs.start("server", server_cmd("--federation", str(fed_file)))
    for s in sites:
        start_site(setup, procs, tmp, s, port)
    return run_dir, port


def start_site(setup, procs: Procs, tmp: Path, site: str, port: int, name: str | None = None) -> None:
    path = write_site(tmp, site, setup["manifest"], port, setup["creds"], setup["cache"])
    procs.start(name or site, client_cmd("--site", str(path), "--quiet"))


def _train_rounds(run_dir: Path) -> list[dict]:
    return [r for r in rounds(run_dir) if r["phase"] == "train"]


def test_three_sites_fedprox_tls_auth_then_evaluate(setup, procs, tmp_path):
    run_dir, _ = _start(setup, procs, tmp_path, ALL_SITES, rounds=2, strategy="fedprox", min_sites=3)
    code = procs.wait("server", timeout=600)
    assert code == 0, procs.dump()
    out = procs.text("server")
    assert "TLS + SuperNode authentication" in out
    assert "round 2/2 train: 3/3 sites answered" in out, out

    recs = rounds(run_dir)
    train = [r for r in recs if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and all(r["accepted"] for r in train)
    for r in train:
        assert sorted(a["site"] for a in r["answered"]) == ALL_SITES
        assert r["aggregated"]["num-examples"] == sum(a["metrics"]["num-examples"] for a in r["answered"])
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    evals = [r for r in recs if r["phase"] == "evaluate"]
    assert [r["round"] for r in evals] == [1, 2]
    assert (run_dir / "metrics_per_round.csv").read_text(encoding="utf-8").count("\n") == 5
    assert (run_dir / "metrics_per_site.csv").read_text(encoding="utf-8").count("\n") == 1 + 2 * 3 * 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == ["round_001.pt", "round_002.pt"]

    # The final model is a normal model.pt: `fedsubtype evaluate` takes it unchanged.
    evaluate_model(run_dir / "model.pt", setup["manifest"], setup["cache"], tmp_path / "eval")


def test_a_site_killed_mid_run_does_not_stop_the_federation(setup, procs, tmp_path):
    run_dir, port = _start(setup, procs, tmp_path, ALL_SITES, rounds=5, min_sites=2, round_timeout_s=180)
    state = tmp_path / "state-site3" / "logs" / "supernode.log"
    wait_until(lambda: state.is_file() and "train message" in state.read_text(encoding="utf-8", errors="replace"), 400,
               "site3 to receive its first training message", procs)
    procs.kill("site3")  # crash: the client and its SuperNode die mid-round
    wait_until(lambda: len(_train_rounds(run_dir)) >= 1, 500, "round 1 to finish without site3", procs)
    start_site(setup, procs, tmp_path, "site3", port, name="site3-again")  # the site comes back
    code = procs.wait("server", timeout=600)
    assert code == 0, procs.dump()
    train = _train_rounds(run_dir)
    assert [r["round"] for r in train] == [1, 2, 3, 4, 5]
    answered = [sorted(a["site"] for a in r["answered"]) for r in train]
    # a round counts exactly when at least min_sites answered; otherwise the global model is kept
    assert [r["accepted"] for r in train] == [len(a) >= 2 for a in answered], train
    assert train[-1]["accepted"]
    assert "site3" not in answered[0], answered  # killed mid-round: that round went on without it
    # the site rejoined a later round (training or evaluation: rounds are short, it may arrive for either)
    later = [a["site"] for r in rounds(run_dir) if r["round"] > 1 for a in r["answered"]]
    assert "site3" in later, rounds(run_dir)
    assert any("left out" in line for line in procs.text("server").splitlines())
    assert (run_dir / "model.pt").is_file()


def test_an_unregistered_site_is_refused(setup, procs, tmp_path):
    port = free_port()
    fed_file = write_federation(tmp_path, ["site1"], port, setup["creds"], tmp_path / "run", min_sites=1,
                                wait_for_sites_s=120)
    procs.start("server", server_cmd("--federation", str(fed_file)))
    wait_until(lambda: "registered site site1" in procs.text("server"), 200, "the coordinator to register site1",
               procs)
    path = write_site(tmp_path, "site2", setup["manifest"], port, setup["creds"], setup["cache"],
                      key_name="intruder", connect_timeout_s=15)
    procs.start("intruder", client_cmd("--site", str(path), "--quiet"))
    code = procs.wait("intruder", timeout=300)
    assert code == 1
    err = procs.text("intruder")
    assert "refused this site's key (not registered)" in err, err
    assert "Traceback" not in err


def test_resume_after_the_coordinator_is_killed(setup, procs, tmp_path):
    run_dir, port = _start(setup, procs, tmp_path, ["site1", "site2"], rounds=2, min_sites=2)
    wait_until(lambda: (run_dir / "checkpoints" / "round_001.pt").is_file(), 500, "the round-1 checkpoint", procs)
    procs.kill("server")  # the coordinator crashes (SuperLink and ServerApp with it)
    assert not (run_dir / "model.pt").exists()
    procs.start("server-resumed", server_cmd("--resume", str(run_dir)))
    code = procs.wait("server-resumed", timeout=600)
    assert code == 0, procs.dump()
    out = procs.text("server-resumed")
    assert "resuming after round 1 of 2" in out, out
    train = _train_rounds(run_dir)
    assert [r["round"] for r in train] == [1, 2]
    assert (run_dir / "model.pt").is_file()
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text(encoding="utf-8"))["round"] == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
