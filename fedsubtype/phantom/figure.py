"""docs/img/phantom_cases.png: an axial slice through the tumour of one case per subtype, with the mask contour.

Run: ``python -m fedsubtype.phantom.figure [OUT_PNG] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from fedsubtype.phantom.biology import LATENT_COLUMNS
from fedsubtype.phantom.cohort import render_case
from fedsubtype.phantom.plan import PlannedCase, plan_cohort

SUBTYPES: dict[str, str] = {
    "luminal_a": "Luminal A",
    "luminal_b": "Luminal B",
    "her2_enriched": "HER2-enriched",
    "triple_negative": "Triple-negative",
}


def pick_examples(seed: int = 0, pool: int = 400) -> list[PlannedCase]:
    """One typical case per subtype (latents nearest the subtype's median, tumour 15-30 mm), each from a
    different site where possible."""
    planned = plan_cohort(pool, 5, seed)
    cols = list(LATENT_COLUMNS)
    table = np.array([[p.latents[c] for c in cols] for p in planned])
    scale = table.std(axis=0) + 1e-9
    chosen: list[PlannedCase] = []
    used_sites: set[str] = set()
    for subtype in SUBTYPES:
        members = [i for i, p in enumerate(planned) if p.biology.subtype == subtype]
        agree = [i for i in members if _labels_agree(planned[i])]
        median = np.median(table[members], axis=0)
        options = [i for i in agree if 15 <= planned[i].latents["diameter_mm"] <= 30]
        options.sort(key=lambda i: float((((table[i] - median) / scale) ** 2).sum()))
        fresh = [i for i in options if planned[i].site.name not in used_sites] or options
        pick = planned[fresh[0]]
        chosen.append(pick)
        used_sites.add(pick.site.name)
    return chosen


def _labels_agree(p: PlannedCase) -> bool:
    b, lab = p.biology, p.labels
    return (lab["er"], lab["pr"], lab["her2"]) == (b.er, b.pr, b.her2) and lab["ki67"] is not None \
        and (lab["ki67"] < 20) == (b.ki67 < 20)


def _label(p: PlannedCase) -> str:
    lab = p.labels
    def show(k: str) -> str:
        v = lab[k]
        return "?" if v is None else ("+" if v == 1 else "-") if k != "ki67" else f"{v:.0f}%"
    s = p.site.scanner
    return (f"{SUBTYPES[p.biology.subtype]}\nER{show('er')} PR{show('pr')} HER2{show('her2')} Ki-67 {show('ki67')}\n"
            f"{p.site.name}: {s.field_strength:.1f} T, {'fat-sat' if s.fat_suppression else 'no fat-sat'}")


def plot_examples(out_png: str | Path, seed: int = 0) -> Path:
    """Render the examples and save the figure (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = pick_examples(seed)
    fig, axes = plt.subplots(2, len(cases), figsize=(3.3 * len(cases), 7.0), dpi=110)
    for col, p in enumerate(cases):
        r = render_case(p, seed)
        img = sitk.DICOMOrient(r.image, "LPS")  # rows anterior->posterior, columns right->left (radiological)
        msk = sitk.DICOMOrient(r.mask, "LPS")
        k = img.TransformPhysicalPointToIndex(r.centre_mm)[2]
        a, m = sitk.GetArrayFromImage(img)[k].astype(float), sitk.GetArrayFromImage(msk)[k]
        sx, sy = img.GetSpacing()[:2]
        extent = (0, a.shape[1] * sx, a.shape[0] * sy, 0)
        vmax = np.percentile(a, 99.7)
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(a, cmap="gray", vmin=0, vmax=vmax, extent=extent, interpolation="bilinear")
            ax.contour(np.arange(a.shape[1]) * sx + sx / 2, np.arange(a.shape[0]) * sy + sy / 2, m, levels=[0.5],
                       colors="#ff5a36", linewidths=0.9 if row == 0 else 1.2)
            if row == 1:
                cy, cx = np.argwhere(m).mean(axis=0) * (sy, sx)
                half = max(18.0, 0.9 * p.latents["diameter_mm"] + 8)
                ax.set_xlim(cx - half, cx + half)
                ax.set_ylim(cy + half, cy - half)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(_label(p), fontsize=9)
    axes[1, 0].set_ylabel("zoom on the tumour", fontsize=9)
    fig.suptitle("fedsubtype phantom: axial slice through the tumour (first post-contrast phase), mask contour in red\n"
                 "synthetic data, engineering evidence only, not a clinical claim", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    """Write the figure (default docs/img/phantom_cases.png)."""
    parser = argparse.ArgumentParser(prog="python -m fedsubtype.phantom.figure", description=__doc__.splitlines()[0])
    parser.add_argument("out_png", nargs="?", default="docs/img/phantom_cases.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(plot_examples(args.out_png, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
