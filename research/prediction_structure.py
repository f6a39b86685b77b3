"""How many things does a row of the paper table actually predict? Rank correlations between its task
outputs per seed and, on the phantom, between each output and the latent phenotypes.

A multi-task network whose four outputs are monotone in one score (ER~PR ρ = 1) has collapsed onto a
single direction, whatever its AUCs say; radiomics models, fitted per task, do not. Reads only the
`runs/<row>/seed<k>/test.csv` files a `fedsubtype benchmark paper` folder keeps.

    python -m research.prediction_structure results/paper-v5 --latents data/phantom/latents.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from fedsubtype.errors import UserError

OUTPUTS: tuple[str, ...] = ("er_prob", "pr_prob", "her2_prob", "ki67_pred")
PAIRS: tuple[tuple[str, str], ...] = (("er_prob", "pr_prob"), ("er_prob", "her2_prob"), ("er_prob", "ki67_pred"))
LATENTS: tuple[str, ...] = ("diameter_mm", "spiculation", "necrosis", "heterogeneity_fine", "heterogeneity_coarse",
                            "rim_enhancement", "oedema", "peri_enhancement")


def _runs(results: Path) -> dict[str, dict[int, pd.DataFrame]]:
    runs: dict[str, dict[int, pd.DataFrame]] = {}
    for path in sorted(results.glob("runs/*/seed*/test.csv")):
        frame = pd.read_csv(path)
        if set(OUTPUTS) <= set(frame.columns):
            runs.setdefault(path.parent.parent.name, {})[int(path.parent.name.removeprefix("seed"))] = frame
    if not runs:
        raise UserError("no runs/<row>/seed<k>/test.csv with predictions found", "pass a `fedsubtype benchmark paper` "
                        "output folder", where=str(results))
    return runs


def output_correlations(results: str | Path) -> pd.DataFrame:
    """One line per (row, seed): Spearman ρ between the row's task outputs over the internal test cases."""
    rows = []
    for row, seeds in _runs(Path(results)).items():
        for seed, frame in sorted(seeds.items()):
            line = {"row": row, "seed": seed}
            for a, b in PAIRS:
                line[f"{a.split('_')[0]}~{b.split('_')[0]}"] = float(spearmanr(frame[a], frame[b])[0])
            rows.append(line)
    return pd.DataFrame(rows)


def latent_profile(results: str | Path, latents: str | Path) -> pd.DataFrame:
    """Mean over seeds of Spearman ρ between each output of each row and each latent phenotype (phantom only)."""
    table = pd.read_csv(latents).set_index("case_id")
    missing = [c for c in LATENTS if c not in table.columns]
    if missing:
        raise UserError(f"latents file lacks {', '.join(missing)}", "pass the phantom's latents.csv", where=str(latents))
    lines = []
    for row, seeds in _runs(Path(results)).items():
        for output in OUTPUTS:
            per_seed = []
            for frame in seeds.values():
                joined = frame.set_index("case_id")[[output]].join(table[list(LATENTS)], how="inner")
                per_seed.append([float(spearmanr(joined[output], joined[c])[0]) for c in LATENTS])
            lines.append({"row": row, "output": output, **dict(zip(LATENTS, np.mean(per_seed, axis=0)))})
    return pd.DataFrame(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.prediction_structure",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a `fedsubtype benchmark paper` output folder")
    parser.add_argument("--latents", type=Path, default=None, help="the phantom's latents.csv (optional)")
    args = parser.parse_args(argv)
    try:
        print(output_correlations(args.results).round(3).to_string(index=False))
        if args.latents is not None:
            print()
            print(latent_profile(args.results, args.latents).round(2).to_string(index=False))
    except UserError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
