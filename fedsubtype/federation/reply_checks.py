"""The coordinator's checks on every site reply before it is aggregated (`reply_checks:` in federation.yaml).

A reply is left out, with one reason per site and round in rounds.json, when its metrics are not the site
allow-list's keys and numbers, its example count is not a plausible integer, its weights are not finite or
not exactly the layout sent, or its update norm is far above the round's median. A training count is
bounded by `max_examples`, by the count the site declared when it enrolled (`declared_examples` in its
`sites:` entry, when given) and by the first count the same node reported in this run (a site's training
split does not change within a run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from fedsubtype.errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module: keep Flower and the site code out of its import
    from flwr.app import Message, RecordDict

    from fedsubtype.federation.runstore import RoundRecord

COUNT_KEY = "num-examples"
ARRAYS_KEY = "arrays"


@dataclass
class ReplyChecksConfig:
    """Bounds on what a site's reply may claim."""

    max_norm_ratio: float | None = 10.0
    """Leave out an update whose norm exceeds this multiple of the round's median update norm (None: off)."""
    max_examples: int = 100_000
    """Largest example count a site may report (training or evaluation)."""

    def validate(self, where: str = "reply_checks") -> None:
        if self.max_norm_ratio is not None and not self.max_norm_ratio >= 1:
            raise ConfigError(f"max_norm_ratio must be >= 1, got {self.max_norm_ratio}", "use e.g. 10, or null for off",
                              where=f"{where}.max_norm_ratio")
        if self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples}", "use e.g. 100000",
                              where=f"{where}.max_examples")


def metrics_problem(metrics: Mapping[str, Any], phase: str) -> str | None:
    """Why a reply's metrics are not among the site allow-list's keys, one number each, with an example count."""
    from fedsubtype.federation.site_algo import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, check_metrics

    allowed = TRAIN_METRIC_KEYS if phase == "train" else EVAL_METRIC_KEYS
    odd = sorted(k for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float)))
    if odd:
        return f"metric {odd[0]!r} is not a number"
    try:
        check_metrics(metrics, allowed, (COUNT_KEY,))
    except ValueError as exc:
        return str(exc)
    return None


def count_problem(count: Any, phase: str, max_examples: int, first: float | None = None) -> str | None:
    """Why an example count is implausible: not an integer, not positive (training), above the bounds."""
    value = float(count)
    least = 1 if phase == "train" else 0
    if not math.isfinite(value) or value != int(value) or value < least:
        return f"example count {value:g} is not an integer >= {least}"
    if value > max_examples:
        return f"example count {value:g} is above reply_checks.max_examples {max_examples}"
    if first is not None and value > first:
        return f"example count {value:g} is above the {first:g} this site declared or first reported in this run"
    return None


def weights_problem(content: RecordDict, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a reply's weights are not finite floats in exactly the layout sent (None when they are)."""
    if list(content.array_records) != [ARRAYS_KEY]:
        return f"weights must be one array record '{ARRAYS_KEY}', got {sorted(content.array_records)}"
    arrays = content[ARRAYS_KEY].to_numpy_ndarrays()
    got = [tuple(a.shape) for a in arrays]
    if got != shapes:
        return f"weights have layout {got[:3]}{'...' if len(got) > 3 else ''}, not the {len(shapes)}-array layout sent"
    if any(not np.issubdtype(a.dtype, np.floating) for a in arrays):
        return "weights are not floating point"
    if not all(np.isfinite(a).all() for a in arrays):
        return "weights contain NaN or infinite values"
    return None


def flat_weights(content: RecordDict) -> np.ndarray:
    """A reply's weights as one float64 vector."""
    return np.concatenate([np.ravel(a) for a in content[ARRAYS_KEY].to_numpy_ndarrays()]).astype(np.float64)


def norm_outliers(updates: Mapping[int, np.ndarray], ratio: float | None) -> dict[int, str]:
    """Node -> reason, for each update whose norm exceeds `ratio` × the median norm of `updates`."""
    norms = {node: float(np.linalg.norm(u)) for node, u in updates.items()}
    median = float(np.median(list(norms.values()))) if norms else 0.0
    if ratio is None or median <= 0:
        return {}
    return {node: f"update norm {n:.3g} is above {ratio:g} × the round's median {median:.3g}"
            for node, n in norms.items() if n > ratio * median}


def first_counts(records: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Node id -> the first training example count it reported in this run (from rounds.json's records)."""
    out: dict[int, float] = {}
    for r in records:
        if r["phase"] == "train":
            for a in r["answered"]:
                count = (a.get("metrics") or {}).get(COUNT_KEY)
                if count is not None:
                    out.setdefault(int(a["node_id"]), float(count))
    return out


def count_bounds(first: Mapping[int, float], declared: Mapping[str, int | None],
                 registered: Mapping[int, str]) -> dict[int, float]:
    """Node id -> the most examples a training reply may claim: the first count it reported in this run and
    the count its site declared at enrolment (matched by the registered name, not the name a reply gives)."""
    out = dict(first)
    for node, name in registered.items():
        limit = declared.get(name)
        if limit is not None:
            out[node] = min(out.get(node, math.inf), float(limit))
    return out


def screen_train(record: RoundRecord, replies: list[Message], global_arrays: list[np.ndarray],
                 cfg: ReplyChecksConfig, first: Mapping[int, float]) -> list[Message]:
    """The training replies that pass every check; the others move from `record.answered` to `record.failed`."""
    shapes = [tuple(a.shape) for a in global_arrays]
    reasons: dict[int, str] = {}
    for result, msg in zip(record.answered, replies):
        why = (count_problem(result.metrics.get(COUNT_KEY, float("nan")), "train", cfg.max_examples,
                             first.get(result.node_id))
               or weights_problem(msg.content, shapes))
        if why:
            reasons[result.node_id] = f"{result.site}: {why}"
    base = np.concatenate([np.ravel(a) for a in global_arrays]).astype(np.float64)
    updates = {r.node_id: flat_weights(m.content) - base
               for r, m in zip(record.answered, replies) if r.node_id not in reasons}
    names = {r.node_id: r.site for r in record.answered}
    reasons.update({node: f"{names[node]}: {why}" for node, why in norm_outliers(updates, cfg.max_norm_ratio).items()})
    kept = [(r, m) for r, m in zip(record.answered, replies) if r.node_id not in reasons]
    record.failed += [reasons[r.node_id] for r in record.answered if r.node_id in reasons]
    record.answered = [r for r, _ in kept]
    return [m for _, m in kept]
