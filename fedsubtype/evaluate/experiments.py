"""What the two experiment harnesses (the paper benchmark, the simulation study) share: finished-run markers
that make a study resumable, the same-settings guard, mean ± sd over seeds, and ROC curves in PNG figures."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fedsubtype.configio import atomic_write_bytes, atomic_write_text
from fedsubtype.errors import UserError


def read_finished(path: Path, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record of a finished run (its marker file, written last), or None: missing, half-written, or made
    under other settings (a key of `expect` with another value)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if any(record.get(k) != v for k, v in (expect or {}).items()):
        return None
    return record


def mark_finished(path: Path, record: dict[str, Any], *, indent: int | None = None,
                  default: Callable[[Any], Any] | None = None) -> None:
    """Write a run's record as its finished marker, atomically (write it after everything else of the run)."""
    atomic_write_text(path, json.dumps(record, indent=indent, default=default))


def flat_settings(cfg: dict[str, Any], keys: Sequence[str], ignore: dict[str, Iterable[str]] | None = None
                  ) -> dict[str, Any]:
    """The settings `keys` of `cfg` as flat dotted keys (`model.variant`) in JSON form, leaving out the
    sub-keys `ignore[key]` (settings that change where and how fast a run goes, not its result)."""
    flat: dict[str, Any] = {}
    for key in keys:
        if key not in cfg:
            continue
        value = json.loads(json.dumps(cfg.get(key), default=str))
        if isinstance(value, dict):
            skip = set((ignore or {}).get(key, ()))
            flat.update({f"{key}.{k}": v for k, v in value.items() if k not in skip})
        else:
            flat[key] = value
    return flat


def refuse_other_settings(path: Path, settings: dict[str, Any], keys: Sequence[str], *,
                          legacy: dict[str, Any] | None = None, ignore: dict[str, Iterable[str]] | None = None,
                          migrate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Refuse to resume into the folder of `path` (its stored settings YAML) when its results were made with
    other values of `keys`; the stored settings pass through `migrate` (older versions in today's form) and a
    key still missing counts as its `legacy` value."""
    import yaml

    if not path.is_file():
        return
    stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    old = {**(legacy or {}), **flat_settings(migrate(stored) if migrate else stored, keys, ignore)}
    new = flat_settings(settings, keys, ignore)
    diff = sorted(k for k in new if k in old and old[k] != new[k])
    if diff:
        raise UserError(f"its runs were made with other settings ({', '.join(diff)})",
                        "pass a new --out, or delete the folder to start over", where=str(path.parent))


def mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample sd (0 for one value) and count of the finite values (None and NaN left out)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, *, tight: bool = False) -> None:
    """Write a figure as PNG (110 dpi; `tight` trims the margins) atomically, and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(false-positive rate, true-positive rate) of `scores` against binary `labels`, cases with either missing
    left out; None when the labels are not of both classes."""
    from sklearn.metrics import roc_curve

    ok = ~np.isnan(labels) & ~np.isnan(scores)
    if len(np.unique(labels[ok])) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels[ok], scores[ok])
    return fpr, tpr
