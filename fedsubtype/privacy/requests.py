"""How many training rounds and evaluations a site has served per run id: a small JSON next to the privacy ledger.

The coordinator chooses run ids and round numbers, so the site counts what it actually served; the count is
taken when a request is admitted (before any data is read), so a round that crashes still counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ConfigError
from fedsubtype.privacy.limits import Phase, RoundDeclined
from fedsubtype.privacy.ledger import locked

REQUESTS_FILENAME = "run_requests.json"


class RunRequests:
    """Per-run counts of served requests ({run id: {"train": n, "evaluate": n}}), locked and written atomically."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def counts(self) -> dict[str, dict[str, int]]:
        """Everything served so far ({} before the first request)."""
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"request counts unreadable ({exc})",
                              "restore it from backup (it records how often each run was served)",
                              where=str(self.path)) from None
        if not isinstance(doc, dict):
            raise ConfigError("not a fedsubtype request-count file", "move it aside", where=str(self.path))
        return doc

    def admit(self, run_id: str, phase: Phase, limit: int, server_round: Any = None) -> int:
        """Count one more `phase` request of `run_id`, or raise RoundDeclined when `limit` are already served.

        Returns the request's number within the run.
        """
        key = "max_rounds_per_run" if phase == "train" else "max_evaluations_per_run"
        with locked(self.path):
            doc = self.counts()
            run = doc.setdefault(str(run_id), {})
            served = int(run.get(phase, 0))
            if served >= limit:
                raise RoundDeclined(f"round {server_round} declined: {phase} request {served + 1} of this run is "
                                    f"above the site's {key} {limit}")
            run[phase] = served + 1
            atomic_write_text(self.path, json.dumps(doc, indent=1, sort_keys=True))
        return served + 1
