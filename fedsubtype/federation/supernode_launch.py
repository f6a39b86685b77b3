"""`flower-supernode` with shorter waits: Flower 1.42's SuperNode sleeps 3 s after every empty pull from the
SuperLink and checks for the ClientApp's reply every 0.5 s, which a round pays on top of the site's training.

    python -m fedsubtype.federation.supernode_launch <flower-supernode arguments>

Only these two fixed waits of `flwr.supernode.start_client_internal` change (Flower is pinned to 1.42.x);
everything else is Flower's own `flower-supernode`.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

SHORTER_WAITS_S = {3: 0.5, 0.5: 0.1}
"""Flower's wait → ours: the idle pull from the SuperLink (3 s → 0.5 s) and the local reply check (0.5 → 0.1 s)."""


def _sleep(seconds: float) -> None:
    time.sleep(SHORTER_WAITS_S.get(seconds, seconds))


def patch_supernode_waits() -> None:
    """Give the SuperNode loop a `time` whose `sleep` uses the shorter waits (no other module is affected)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = SimpleNamespace(**{**vars(time), "sleep": _sleep})  # type: ignore[assignment]


def supernode_command() -> list[str]:
    """The command that starts the SuperNode with the shorter waits (its arguments follow)."""
    return [sys.executable, "-m", __name__ if __name__ != "__main__" else "fedsubtype.federation.supernode_launch"]


def main() -> int:
    from flwr.supernode.cli import flower_supernode

    patch_supernode_waits()
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
