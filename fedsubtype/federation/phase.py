"""One phase (train or evaluate) of a round: push the strategy's messages, pull the replies until they are all
in or the round timeout passed, and sort them into answers (in a fixed order) and failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from fedsubtype.federation.config import FederationConfig
from fedsubtype.federation.reply_checks import COUNT_KEY, count_problem, metrics_problem
from fedsubtype.federation.runstore import RoundRecord, SiteResult

POLL_S = 0.2
"""How often replies are pulled from the SuperLink (Grid.send_and_receive sleeps 3 s between pulls)."""
NODES_FILE = "nodes.json"
"""Registered node id -> site name, written by fedsubtype-server at registration."""


def node_names(run_dir: Path) -> dict[int, str]:
    """Registered node id -> site name, for readable logs ({} when the run has none, as in simulation)."""
    path = Path(run_dir) / NODES_FILE
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError):
        return {}


def exchange(grid: Grid, messages: list[Message], timeout: float, poll_s: float = POLL_S) -> list[Message]:
    """Push `messages` and pull their replies until all arrived or `timeout` passed.

    One pull always follows the deadline: a pull can block (Flower retries the objects of a reply whose
    sender died mid-upload), and a reply that reached the SuperLink meanwhile still counts."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        late = time.monotonic() >= deadline
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or late:
            break
        time.sleep(poll_s)
    return replies


def reply_problem(msg: Message, phase: str, max_examples: int) -> str | None:
    """Why a reply's metrics or example count cannot be used (None when they can); never raises."""
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return f"expected one metric record, got {len(records)}"
    metrics = dict(records[0])
    return metrics_problem(metrics, phase) or count_problem(metrics[COUNT_KEY], phase, max_examples)


def _sort_replies(replies: list[Message], target: dict[str, int], names: dict[int, str], phase: str,
                  max_examples: int) -> tuple[list[tuple[SiteResult, Message]], list[str], set[int]]:
    """(answers sorted by site, failure lines, nodes heard from) from the replies of one phase."""
    answers, failed, seen = [], [], set()
    for msg in replies:
        node = target.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
        seen.add(node)
        who = names.get(node, f"node {node}")
        if msg.has_error():
            failed.append(f"{who}: {msg.error.reason}")
            continue
        name = str(msg.content["site"].get("name", who)) if "site" in msg.content.config_records else who
        why = reply_problem(msg, phase, max_examples)
        if why:
            failed.append(f"{name}: {why}")
            continue
        metrics = {k: float(v) for k, v in next(iter(msg.content.metric_records.values())).items()}
        answers.append((SiteResult(name, node, metrics), msg))
    # replies come in arrival order; a fixed order makes the weighted float sums of aggregation reproducible
    answers.sort(key=lambda pair: (pair[0].site, pair[0].node_id))
    return answers, failed, seen


def run_phase(grid: Grid, cfg: FederationConfig, messages: list[Message], rnd: int, phase: str
              ) -> tuple[RoundRecord, list[Message]]:
    """Send one phase's messages, wait up to the round timeout; the phase's record and the good replies."""
    t0 = time.perf_counter()
    names = node_names(cfg.run_dir)
    down = sum(m.content.array_records["arrays"].count_bytes() for m in messages if "arrays" in m.content.array_records)
    replies = exchange(grid, messages, cfg.round_timeout_s) if messages else []
    target = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
    answers, failed, seen = _sort_replies(replies, target, names, phase, cfg.reply_checks.max_examples)
    results, ok = [r for r, _ in answers], [m for _, m in answers]
    failed += [f"{names.get(n, f'node {n}')}: no answer within {cfg.round_timeout_s:g} s"
               for n in target.values() if n not in seen]
    up = sum(r.count_bytes() for m in ok for r in m.content.array_records.values())
    record = RoundRecord(round=rnd, phase=phase, asked=len(messages), answered=results, failed=failed,
                         accepted=len(ok) >= cfg.min_sites, seconds=time.perf_counter() - t0,
                         bytes_down=int(down), bytes_up=int(up))
    return record, ok
