"""The study's units of work and their stored records: which run is which, where it lives, whether it finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsubtype.evaluate.experiments import read_finished

ALL_SITES = "none"
"""`holdout` value of runs that train on every internal site."""


@dataclass(frozen=True)
class RunKey:
    """One unit of work: a method variant trained with one seed, with or without a held-out site."""

    setting: str
    method: str
    family: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    holdout: str

    def folder(self, root: Path) -> Path:
        safe = self.method.replace("(", "_").replace(")", "").replace("=", "").replace(" ", "")
        return root / "runs" / self.setting / safe / f"seed{self.seed}" / f"holdout-{self.holdout}"

    def label(self) -> str:
        where = "all sites" if self.holdout == ALL_SITES else f"without {self.holdout}"
        return f"[{self.setting}] {self.method} seed {self.seed} ({where})"

    @classmethod
    def of_record(cls, rec: dict[str, Any]) -> RunKey:
        """The key of a stored run record."""
        return cls(rec["setting"], rec["method"], rec["family"], tuple(sorted(rec["params"].items())), rec["seed"],
                   rec["holdout"])


def load_record(key: RunKey, root: Path, config_hash: str | None = None) -> dict[str, Any] | None:
    """A finished run's record, or None (missing, half-written, or made under another configuration)."""
    expect = {"config_hash": config_hash} if config_hash is not None else None
    return read_finished(key.folder(root) / "result.json", expect)
