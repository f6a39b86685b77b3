"""A site's limits for real on loopback: a real SuperLink (TLS + authentication) and two real SuperNodes; one
site's `limits:` allow a single evaluation per run, so it declines the second and the coordinator records its line."""

from __future__ import annotations

import pytest

from fedutil import client_cmd, free_port, manifest_of, rounds, server_cmd, write_federation, write_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SITES = ["site1", "site2"]


def test_a_site_declines_a_round_over_its_limits_and_the_run_completes(phantom_cohort, procs, tmp_path):
    from fedsubtype.federation.credentials import create_dev_credentials

    creds = tmp_path / "creds"
    create_dev_credentials(creds, SITES, ["localhost", "127.0.0.1"])
    manifest, port, run_dir = manifest_of(phantom_cohort), free_port(), tmp_path / "run"
    fed = write_federation(tmp_path, SITES, port, creds, run_dir, rounds=2, min_sites=2)
    procs.start("server", server_cmd("--federation", str(fed)))
    for site, extra in (("site1", {}), ("site2", {"limits": {"max_evaluations_per_run": 1}})):
        path = write_site(tmp_path, site, manifest, port, creds, tmp_path / "cache", **extra)
        procs.start(site, client_cmd("--site", str(path), "--quiet"))
    assert procs.wait("server", timeout=900) == 0, procs.dump()

    train = [r for r in rounds(run_dir) if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and all(r["accepted"] for r in train)
    evals = [r for r in rounds(run_dir) if r["phase"] == "evaluate"]
    assert [r["round"] for r in evals] == [1, 2]
    assert sorted(a["site"] for a in evals[0]["answered"]) == SITES
    assert [a["site"] for a in evals[1]["answered"]] == ["site1"]
    declined = [f for f in evals[1]["failed"] if "site2" in f]
    assert len(declined) == 1, evals[1]
    assert "evaluate request 2 of this run is above the site's max_evaluations_per_run 1" in declined[0]
    assert all("metrics-omitted" in a["metrics"] for r in evals for a in r["answered"])
    assert (run_dir / "model.pt").is_file()
