"""How much of a wide-and-deep network's prediction is its linear read-out of the region statistics?

For a row trained with `model.read_out: linear_heads` (or `linear_heads_profile`), each task's logit is
the deep path (attention, region weighting, representation, head) plus a linear map of the standardised
region statistics. This splits the test-split logits of every seed into the two parts and reports their
spread and the AUC each part reaches alone: if the network's ranking is its read-out's, the convolutional
part has added nothing.

    python -m research.read_out_share results/paper-wide [--row full]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.errors import UserError
from research.head_refit import TrainedRun, folder_tool, trained_runs

PARTS: tuple[str, ...] = ("total", "read_out", "deep")


def logit_parts(run: TrainedRun, batch_size: int = 32) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"total", "read_out", "deep": [N] logits}} on the run's test split (total = read_out + deep)."""
    import torch
    from torch.utils.data import DataLoader

    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.model.regions_pool import region_masks

    model = run.model
    if getattr(model, "statistics_heads", None) is None:
        raise UserError("this row's network has no statistics read-outs", "pass a folder trained with "
                        "--read-out linear_heads or linear_heads_profile", where=str(run.folder))
    data = CaseDataset(run.splits["test"], run.cache)
    parts: dict[str, dict[str, list]] = {t: {p: [] for p in PARTS} for t in CLASSIFICATION_TASKS}
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            image, regions = batch["image"], batch["regions"]
            raw, _ = model.raw_outputs(image, regions)
            stats = model.input_statistics(image, region_masks(regions, model.spec.regions))
            for task in CLASSIFICATION_TASKS:
                read_out = model.statistics_heads(stats, task)
                parts[task]["total"].append(raw[task])
                parts[task]["read_out"].append(read_out)
                parts[task]["deep"].append(raw[task] - read_out)
    return {t: {p: torch.cat(v).double().numpy() for p, v in d.items()} for t, d in parts.items()}


def read_out_shares(results: str | Path, row: str = "full") -> pd.DataFrame:
    """One line per seed and task: test-split AUC of the whole logit, of the read-out alone and of the deep
    path alone, and the standard deviation of each part's logit over the test cases."""
    from sklearn.metrics import roc_auc_score

    lines: list[dict[str, Any]] = []
    for run in trained_runs(results, row):
        parts = logit_parts(run)
        labels = np.stack([c.label_vector() for c in run.splits["test"]]).astype(float)
        for j, task in enumerate(CLASSIFICATION_TASKS):
            ok = ~np.isnan(labels[:, j])
            line: dict[str, Any] = {"seed": run.seed, "task": task}
            both = len(np.unique(labels[ok, j])) == 2
            for part in PARTS:
                logits = parts[task][part]
                line[f"auc_{part}"] = roc_auc_score(labels[ok, j], logits[ok]) if both else float("nan")
                line[f"sd_{part}"] = float(logits.std())
            lines.append(line)
    return pd.DataFrame(lines)


def main(argv: list[str] | None = None) -> int:
    table = folder_tool(argv, "python -m research.read_out_share", __doc__,
                        "network row trained with --read-out linear_heads (default: full)", read_out_shares,
                        "read_out_share")
    return 1 if table is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
