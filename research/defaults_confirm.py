"""Confirm a change of defaults the way a user meets it: `fedsubtype train` runs, old settings against new.

Each arm is a `fedsubtype train --config` file (an empty file = the defaults), optionally `@` a checkout whose
code runs it (the code before a change: `git worktree add ../old <commit>`), run on one manifest for each
seed with `--size`; `--table` then reads the run folders and writes the paper table's statistics per
arm: mean AUC per task (mean ± sd over seeds), the 95 % bootstrap intervals of each seed's test AUC, Ki-67
MAE, and DeLong's test of each arm against the first on the same test cases (p per task and seed).

    python -m research.defaults_confirm --manifest M --arms old=empty.yaml@../old,new=empty.yaml --seeds 3,4,5 \
        --size 32 --out results/confirm/A
    python -m research.defaults_confirm --table results/confirm/A
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

TASKS3 = ("er", "pr", "her2")


def run_arms(manifest: Path, arms: dict[str, str], seeds: list[int], size: int, out: Path) -> None:
    """One `fedsubtype train` per arm and seed (a finished run folder is kept)."""
    for seed in seeds:
        for name, spec in arms.items():
            run = (out / name / f"s{seed}").absolute()
            if (run / "metrics.json").is_file():
                continue
            config, _, code = spec.partition("@")
            cmd = [sys.executable, "-m", "fedsubtype", "train", "--config", str(Path(config).absolute()),
                   "--manifest", str(manifest.absolute()), "--seed", str(seed), "--size", str(size), "--out", str(run),
                   "--quiet", "--overwrite"]
            print(f"== {name} seed {seed} ({code or 'this checkout'}): {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=code or None)


def _predictions(run: Path) -> Any:
    from fedsubtype.evaluate.predictions import Predictions

    return Predictions.read_csv(run / "predictions.csv")


def arm_rows(root: Path) -> list[dict[str, Any]]:
    """One row per arm and seed: test AUCs with intervals, Ki-67 MAE, epochs kept, DeLong p against the first arm."""
    from fedsubtype.evaluate.metrics import delong_test

    arms = sorted(p.name for p in root.iterdir() if p.is_dir())
    order = json.loads((root / "arms.json").read_text()) if (root / "arms.json").is_file() else arms
    rows = []
    for arm in order:
        for run in sorted((root / arm).glob("s*")):
            metrics = json.loads((run / "metrics.json").read_text())
            row: dict[str, Any] = {"arm": arm, "seed": run.name[1:], "mean_auc": metrics["mean_auc"],
                                   "ki67_mae": metrics["ki67"]["mae"], "best_epoch": metrics.get("best_epoch")}
            for t in TASKS3:
                row[t] = metrics[t]["auc"]
                row[f"{t}_ci"] = metrics[t].get("auc_ci")
            reference = root / order[0] / run.name
            if arm != order[0] and (reference / "predictions.csv").is_file():
                ours, ref = _predictions(run), _predictions(reference)
                assert list(ours.case_ids) == list(ref.case_ids), f"{run} and {reference} scored different cases"
                for j, t in enumerate(TASKS3):
                    row[f"{t}_p"] = delong_test(ours.labels[:, j], ours.probs[:, j], ref.probs[:, j])["p"]
            rows.append(row)
    return rows


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""


def table(root: Path) -> str:
    """The markdown tables (arm means, then per seed) of a confirmation folder."""
    rows = arm_rows(root)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | ER | PR | HER2 | mean AUC (± sd over seeds) | Ki-67 MAE (pp) | seeds |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        m = {k: np.mean([r[k] for r in mine]) for k in ("er", "pr", "her2", "mean_auc", "ki67_mae")}
        sd = np.std([r["mean_auc"] for r in mine], ddof=1) if len(mine) > 1 else 0.0
        lines.append(f"| {arm} | {m['er']:.3f} | {m['pr']:.3f} | {m['her2']:.3f} | {m['mean_auc']:.3f} ± {sd:.3f} | "
                     f"{m['ki67_mae']:.1f} | {len(mine)} |")
    lines += ["", "| arm | seed | ER [95 % CI] | PR [95 % CI] | HER2 [95 % CI] | mean AUC | Ki-67 MAE | epoch kept "
              f"| DeLong p vs {arms[0]} (ER / PR / HER2) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = " / ".join(f"{r[f'{t}_p']:.2f}" if r.get(f"{t}_p") is not None else "—" for t in TASKS3)
        cells = " | ".join(f"{r[t]:.3f} {_ci(r[f'{t}_ci'])}" for t in TASKS3)
        lines.append(f"| {r['arm']} | {r['seed']} | {cells} | {r['mean_auc']:.3f} | {r['ki67_mae']:.1f} | "
                     f"{r['best_epoch']} | {p if r['arm'] != arms[0] else '—'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, help="write table.md of a finished confirmation folder")
    p.add_argument("--manifest", type=Path)
    p.add_argument("--arms", help="name=config.yaml[@checkout],... (the first is the reference)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.table:
        text = table(args.table)
        (args.table / "table.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    if not (args.manifest and args.arms and args.out):
        p.error("--manifest, --arms and --out are needed (or --table)")
    arms = dict(a.split("=", 1) for a in args.arms.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arms.json").write_text(json.dumps(list(arms)), encoding="utf-8")
    run_arms(args.manifest, arms, [int(s) for s in args.seeds.split(",")], args.size, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
