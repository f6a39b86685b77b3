"""The site's privacy ledger: every DP-SGD step it has released, persisted across rounds and restarts.

One JSON file per site, keyed by federation run id. ε spent is always recomputed from the full history
of (σ, q, steps) entries, so the figure a hospital states covers the whole run, not the last round.
The file is rewritten atomically after every round; a site restarted mid-run reads it back and
continues from the same ε.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ConfigError
from fedsubtype.privacy.accounting import Entry, epsilon_for

try:  # POSIX file locks; elsewhere a single site process is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1


def _compact(history: Sequence[Entry]) -> list[Entry]:
    """Merge consecutive entries with the same σ and q (the accountant's own compaction)."""
    out: list[Entry] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `<ledger>.lock` so processes of one site (e.g. simulation workers) never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+", encoding="utf-8") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class PrivacyLedger:
    """Persistent (σ, q, steps) history of one site for one federation run, with its ε at a fixed δ.

    The file is the single source of truth: every read re-reads it and every write is a locked
    read-modify-write, so several processes serving the same site (a restarted site, simulation
    workers) always see and extend one history.
    """

    def __init__(self, path: str | os.PathLike, run_id: str, *, delta: float, accountant: str = "prv",
                 target_epsilon: float = math.inf, site: str = "") -> None:
        self.path = Path(path)
        self.run_id = str(run_id)
        self._new_run = {"site": site, "delta": delta, "accountant": accountant, "target_epsilon": target_epsilon,
                         "created": _now(), "history": [], "rounds": []}
        run = self._read()["runs"].get(self.run_id)
        if run is not None:
            for key, now in (("delta", delta), ("accountant", accountant)):
                if run[key] != now:
                    raise ConfigError(f"the privacy ledger of run '{self.run_id}' was started with {key} = "
                                      f"{run[key]!r}, site.yaml now says {now!r}",
                                      f"restore {key} to {run[key]!r} (ε must be stated at one δ for the whole run)",
                                      where=str(self.path))
        self._target = float(target_epsilon)
        self._delta, self._accountant = float(delta), str(accountant)

    def _read(self) -> dict[str, Any]:
        return _read_doc(self.path)

    def _run(self) -> dict[str, Any]:
        """This run's record as it is on disk now (an empty one before the first write)."""
        return self._read()["runs"].get(self.run_id) or dict(self._new_run)

    def _update(self, change: Any) -> dict[str, Any]:
        """Locked read-modify-write of this run's record; returns the record written."""
        with locked(self.path):
            doc = self._read()
            run = doc["runs"].setdefault(self.run_id, dict(self._new_run))
            run["target_epsilon"] = self._target
            change(run)
            atomic_write_text(self.path, json.dumps(doc, indent=1))
            return run

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def target_epsilon(self) -> float:
        return self._target

    @property
    def plan(self) -> dict[str, Any] | None:
        """The plan this run was started with (kept so a restarted site uses the same σ)."""
        return self._run().get("plan")

    def save_plan(self, plan: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Store the run's plan; without `replace` an already stored plan wins (another process planned first).

        Returns the plan stored.
        """
        def put(run: dict[str, Any]) -> None:
            if replace or "plan" not in run:
                run["plan"] = dict(plan)

        return dict(self._update(put)["plan"])

    @property
    def history(self) -> list[Entry]:
        """The composed (σ, q, steps) history of this run."""
        return [(float(s), float(q), int(t)) for s, q, t in self._run()["history"]]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """One record per trained round: round, steps, σ, q, ε after it, time."""
        return list(self._run()["rounds"])

    @property
    def steps(self) -> int:
        return sum(t for _, _, t in self.history)

    def spent(self) -> float:
        """ε spent so far in this run at the run's δ."""
        return epsilon_for(self.history, self.delta, self.accountant)

    def epsilon_if(self, extra: Sequence[Entry]) -> float:
        """ε this run would have spent after also releasing `extra` steps."""
        return epsilon_for(_compact(self.history + list(extra)), self.delta, self.accountant)

    def can_afford(self, extra: Sequence[Entry]) -> bool:
        """Whether `extra` steps keep the run within its budget."""
        return self.epsilon_if(extra) <= self.target_epsilon

    def record(self, server_round: int, entries: Sequence[Entry]) -> float:
        """Append the steps one round actually took (locked, atomic write) and return ε after it."""
        entries = _compact(entries)
        result: dict[str, float] = {}

        def append(run: dict[str, Any]) -> None:
            history = _compact([tuple(e) for e in run["history"]] + entries)
            result["eps"] = epsilon_for(history, self.delta, self.accountant)
            run["history"] = [list(e) for e in history]
            run["rounds"].append({"round": int(server_round), "steps": sum(t for _, _, t in entries),
                                  "entries": [list(e) for e in entries], "epsilon_after": result["eps"],
                                  "time": _now()})

        self._update(append)
        return result["eps"]

    def epsilon_all_runs(self) -> float:
        """ε over every run in this file composed together at this run's δ (the site's lifetime figure)."""
        return self.epsilon_all_runs_if(())

    def epsilon_all_runs_if(self, extra: Sequence[Entry]) -> float:
        """The lifetime ε (every run in this file, at this run's δ) after also releasing `extra` steps."""
        history = [tuple(e) for run in self._read()["runs"].values() for e in run["history"]]
        return epsilon_for(_compact(history + list(extra)), self.delta, self.accountant)


def read_runs(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every run's record in a ledger file ({} when there is none yet), for reports; never writes."""
    return _read_doc(Path(path))["runs"]


def _read_doc(path: Path) -> dict[str, Any]:
    """The ledger document at `path` (an empty one when absent); one-line ConfigErrors when unreadable."""
    if not path.exists():
        return {"format": FORMAT_VERSION, "runs": {}}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"privacy ledger unreadable ({exc})",
                          "restore it from backup; never delete it mid-run (it is the record of ε spent)",
                          where=str(path)) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION or not isinstance(doc.get("runs"), dict):
        raise ConfigError("not a fedsubtype privacy ledger (format 1)", "point privacy.ledger at another file",
                          where=str(path))
    return doc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
