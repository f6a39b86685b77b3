"""`fedsubtype-client --site site.yaml --privacy-report`: the ε a site has spent, per run and over all runs.

Reads the site's privacy ledger only (no image, no connection). The total composes every run's steps at
each δ the ledger holds (normally one), which is what the site's lifetime budget is checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsubtype.privacy.accounting import epsilon_for
from fedsubtype.privacy.ledger import read_runs
from fedsubtype.privacy.site import LEDGER_FILENAME


def ledger_path(site: Any) -> Path:
    """The site's ledger file (privacy.ledger, else <state folder>/privacy_ledger.json); `site` is a SiteConfig."""
    cfg = site.privacy
    return Path(cfg.ledger) if cfg.ledger is not None else Path(site.state_dir()) / LEDGER_FILENAME


def report_lines(site: Any) -> list[str]:
    """One line per run (ε, δ, steps, rounds) and one total per δ, against the site's lifetime budget."""
    path = ledger_path(site)
    runs = read_runs(path)
    if not runs:
        return [f"privacy: no DP-SGD steps released yet (no runs in {path})"]
    lines = [f"privacy ledger {path}:"]
    everything: list[tuple[float, float, int]] = []
    for run_id, run in runs.items():
        history = [(float(s), float(q), int(t)) for s, q, t in run["history"]]
        eps = epsilon_for(history, float(run["delta"]), str(run["accountant"]))
        lines.append(f"  run {run_id}: ε = {eps:.3f} at δ = {float(run['delta']):.2g} ({run['accountant']}), "
                     f"{sum(t for _, _, t in history)} steps over {len(run['rounds'])} round(s), "
                     f"budget {float(run['target_epsilon']):g}")
        everything += history
    for delta, accountant in sorted({(float(r["delta"]), str(r["accountant"])) for r in runs.values()}):
        total = epsilon_for(everything, delta, accountant)
        lines.append(f"  all runs together at δ = {delta:.2g} ({accountant}): ε = {total:.3f} "
                     f"(lifetime budget {site.privacy.lifetime_budget():g})")
    return lines


def print_report(site: Any, out: Callable[[str], None] = print) -> int:
    """Print the report; the exit code (0)."""
    for line in report_lines(site):
        out(line)
    return 0
