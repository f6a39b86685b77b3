"""Shared fixtures. `phantom_cohort`: a small phantom cohort (30 cases, 3 sites, seed 0), written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a 30-case, 3-site phantom cohort (seed 0) under a session temp folder."""
    from fedsubtype.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("phantom") / "cohort", cases=30, sites=3, seed=0, progress=False)
