"""Secure aggregation for real on loopback (issue 25): `fedsubtype-server` with TLS and SuperNode
authentication, three `fedsubtype-client` sites, two rounds under SecAgg+, one site killed in the second
round; the run completes and its model.pt evaluates. Same fixtures as tests/test_federation_e2e.py."""

from __future__ import annotations

import sys

import pytest

from fedutil import evaluate_model, wait_until
from test_federation_e2e import ALL_SITES, _start, _train_rounds, setup  # noqa: F401 - `setup` is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
STAGES = 4
"""SecAgg+ sends each site four train messages a round: setup, key shares, training (masked vector), unmask."""


def _train_messages(log) -> int:
    return log.read_text(encoding="utf-8", errors="replace").count("Receiving: train message") if log.is_file() else 0


def test_two_secure_rounds_survive_a_site_killed_in_the_second(setup, procs, tmp_path):
    run_dir, _ = _start(setup, procs, tmp_path, ALL_SITES, rounds=2, strategy="fedprox", min_sites=2,
                        round_timeout_s=90, evaluate_every=0, secure_aggregation={"enabled": True})
    log = tmp_path / "state-site3" / "logs" / "supernode.log"
    wait_until(lambda: _train_messages(log) >= STAGES + 3, 900, "site3 to receive round 2's training message",
               procs)
    procs.kill("site3")  # crash while training in round 2: its key shares are already out
    code = procs.wait("server", timeout=900)
    assert code == 0, procs.dump()
    out = procs.text("server")
    assert "TLS + SuperNode authentication" in out

    train = _train_rounds(run_dir)
    assert [r["round"] for r in train] == [1, 2] and all(r["accepted"] for r in train), train
    assert sorted(a["site"] for a in train[0]["answered"]) == ALL_SITES
    second = sorted(a["site"] for a in train[1]["answered"])
    assert second[:2] == ["site1", "site2"]
    if "site3" not in second:  # killed before its masked vector went out: unmasked from the others' shares
        assert any(line.startswith("site3") for line in train[1]["failed"]), train[1]
    for r in train:
        assert r["aggregated"]["num-examples"] == sum(a["metrics"]["num-examples"] for a in r["answered"])
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0

    evaluate_model(run_dir / "model.pt", setup["manifest"], setup["cache"], tmp_path / "eval")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
