"""`<run-dir>/launch.json`: the one configuration source of a federated run.

`fedsubtype-server` (from federation.yaml) and `fedsubtype-sim` (from a scenario) write it; the ServerApp
reads it. The only run-config value the ServerApp takes from Flower is `run-dir`, which says where it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from fedsubtype.configio import atomic_write_text, from_dict, to_dict
from fedsubtype.errors import ConfigError
from fedsubtype.federation.config import FederationConfig

LAUNCH_FILE = "launch.json"
RUN_DIR_KEY = "run-dir"
"""The run-config key (`flwr run --run-config run-dir=...`) naming the run folder."""


def write_launch(run_dir: Path, cfg: FederationConfig, resume: bool) -> Path:
    """Write the federation config and the resume flag for the ServerApp to read."""
    path = Path(run_dir) / LAUNCH_FILE
    atomic_write_text(path, json.dumps({"federation": to_dict(cfg), "resume": resume}, indent=2) + "\n")
    return path


def read_launch_file(path: Path) -> tuple[FederationConfig, bool]:
    """(federation config, resume flag) from a launch.json."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return from_dict(FederationConfig, data["federation"], where=str(path)), bool(data.get("resume"))


def read_launch(run_config: Mapping[str, Any]) -> tuple[FederationConfig, bool]:
    """The run's federation config and resume flag, from the launch.json in the run config's `run-dir`."""
    run_dir = Path(str(run_config.get(RUN_DIR_KEY, "runs/federation"))).resolve()
    path = run_dir / LAUNCH_FILE
    if not path.is_file():
        raise ConfigError(f"no {LAUNCH_FILE} in the run folder",
                          "start federated runs with fedsubtype-server (or fedsubtype-sim), not plain `flwr run`",
                          where=str(run_dir))
    return read_launch_file(path)
