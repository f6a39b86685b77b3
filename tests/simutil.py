"""Helpers for the simulation tests: the tiny two-site scenario file that `fedsubtype-sim` tests vary."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_MODEL = {"width": 4, "groups": 2, "feature_dim": 8, "hidden_dim": 8, "blocks": [1, 1, 1]}


def write_scenario(tmp: Path, phantom: Path, **extra) -> Path:
    """`tmp/scenario.yaml`: the tiny study on the `tiny_phantom` cohort (pooled, local, FedAvg; one seed;
    leave-one-site-out for pooled), its top-level keys replaced by `extra`."""
    data = {
        "name": "tiny",
        "output_dir": str(tmp / "out"),
        "data": {"manifest": str(phantom / "manifest.csv"), "cache_dir": str(phantom.parent / "cache"),
                 "cache_workers": 1},
        "partition": {"kind": "natural", "val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
        "preprocess": {"size": 16},
        "model": TINY_MODEL,
        "training": {"batch_size": 4, "augment": False},
        "federation": {"budget_epochs": 2, "local_epochs": 1},
        "methods": [{"name": "pooled"}, {"name": "local"}, {"name": "fedavg"}],
        "seeds": [0],
        "leave_one_site_out": True,
        "loso_methods": ["pooled"],
        "ray": {"num_cpus": 2, "client_cpus": 1},
    }
    data.update(extra)
    path = tmp / "scenario.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
