"""A federation's run folder: per-round metrics (CSV + JSON, per site and aggregated), checkpoints, final model.

Layout::

    federation.json            the validated federation config the run was started with
    rounds.json                every round: sites asked / answered / failed, per-site and aggregated metrics, bytes
    metrics_per_round.csv      one row per round and phase (train / evaluate): wall_s of the phase, bytes, aggregated metrics
    metrics_per_site.csv       one row per round, phase and site: that site's aggregate metrics
    checkpoints/round_NNN.pt   global weights, round, strategy state (torch, tensors + plain data only)
    checkpoints/latest.json    which checkpoint is the newest complete one
    model.pt                   the final global model, same format as `fedsubtype train` writes

No Flower types here; the ServerApp hands plain numbers and numpy arrays.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedsubtype.configio import atomic_write_bytes, atomic_write_text, write_rows_csv

CHECKPOINT_FORMAT = "fedsubtype-federation-checkpoint"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class SiteResult:
    """One site's answer in one phase of a round (aggregate metrics only)."""

    site: str
    node_id: int
    metrics: dict[str, float]


@dataclass
class RoundRecord:
    """What happened in one phase (train or evaluate) of one round."""

    round: int
    phase: str
    asked: int
    answered: list[SiteResult] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    aggregated: dict[str, float] = field(default_factory=dict)
    accepted: bool = True
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _clean({"round": self.round, "phase": self.phase, "asked": self.asked,
                       "answered": [{"site": r.site, "node_id": r.node_id, "metrics": r.metrics} for r in self.answered],
                       "failed": self.failed, "aggregated": self.aggregated, "accepted": self.accepted,
                       "seconds": self.seconds, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up})


def _tensor(array: np.ndarray) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """A contiguous CPU tensor of `array` with its shape (NumPy's ascontiguousarray makes a 0-d array 1-d)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array).reshape(np.shape(array)))


class RunStore:
    """Reads and writes one run folder; every file is written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.root / "checkpoints"
        self.records: list[dict[str, Any]] = []
        if (self.root / "rounds.json").is_file():
            self.records = json.loads((self.root / "rounds.json").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ metrics
    def truncate_after(self, round_: int) -> None:
        """Drop records of rounds after `round_` (a resumed run redoes them)."""
        self.records = [r for r in self.records if r["round"] <= round_]
        self._write_metrics()

    def add(self, record: RoundRecord) -> None:
        """Append a phase record and rewrite the JSON and both CSV files."""
        self.records.append(record.to_dict())
        self._write_metrics()

    def _write_metrics(self) -> None:
        atomic_write_text(self.root / "rounds.json", json.dumps(self.records, indent=2) + "\n")
        agg_rows, site_rows = [], []
        for r in self.records:
            agg_rows.append({"round": r["round"], "phase": r["phase"], "accepted": r["accepted"], "asked": r["asked"],
                             "answered": len(r["answered"]), "sites": ";".join(a["site"] for a in r["answered"]),
                             "failed": len(r["failed"]), "wall_s": r["seconds"], "bytes_down": r["bytes_down"],
                             "bytes_up": r["bytes_up"], **(r["aggregated"] or {})})
            for a in r["answered"]:
                site_rows.append({"round": r["round"], "phase": r["phase"], "site": a["site"], **a["metrics"]})
        write_rows_csv(self.root / "metrics_per_round.csv", agg_rows)
        write_rows_csv(self.root / "metrics_per_site.csv", site_rows)

    def last_evaluation(self) -> dict[str, Any] | None:
        """Aggregated metrics of the newest accepted evaluation phase."""
        for r in reversed(self.records):
            if r["phase"] == "evaluate" and r["accepted"] and r["aggregated"]:
                return r["aggregated"]
        return None

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, round_: int, weights: Sequence[np.ndarray], strategy: str,
                        strategy_state: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Path:
        """Global weights after `round_`, the strategy's state (FedAdam/FedYogi moments), then point latest at it."""
        import torch

        payload = {
            "format": CHECKPOINT_FORMAT, "round": int(round_), "strategy": strategy,
            "weights": [_tensor(w) for w in weights],
            "strategy_state": {name: {k: _tensor(v) for k, v in d.items()}
                               for name, d in (strategy_state or {}).items()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = self.checkpoints / f"round_{round_:03d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(self.checkpoints / "latest.json", json.dumps({"round": int(round_), "file": path.name}) + "\n")
        return path

    def latest_checkpoint(self) -> tuple[int, list[np.ndarray], str, dict[str, dict[str, np.ndarray]]] | None:
        """(round, weights, strategy, strategy_state) of the newest checkpoint, or None."""
        import torch

        pointer = self.checkpoints / "latest.json"
        if not pointer.is_file():
            return None
        name = json.loads(pointer.read_text(encoding="utf-8"))["file"]
        payload = torch.load(self.checkpoints / name, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoints / name} is not a federation checkpoint")
        weights = [t.numpy() for t in payload["weights"]]
        state = {n: {k: v.numpy() for k, v in d.items()} for n, d in payload["strategy_state"].items()}
        return int(payload["round"]), weights, str(payload["strategy"]), state

    # ------------------------------------------------------------ final model
    def save_final_model(self, weights: Sequence[np.ndarray], model_config: Any, preprocess_config: Any,
                         metadata: dict[str, Any]) -> Path:
        """`model.pt` through the pipeline's save step, so `fedsubtype evaluate/predict` take it unchanged."""
        from fedsubtype.federation.site_algo import set_weights
        from fedsubtype.model import build_model
        from fedsubtype.train.pipeline import save_run_model

        model = build_model(model_config)
        set_weights(model, weights)
        return save_run_model(self.root, model, model_config=model_config, preprocess_config=preprocess_config,
                              metadata=_clean(metadata))
