"""Which latent phenotype, read imperfectly from the image, costs the most AUC? (analysis script, phantom only)

1. For every case, 61 region statistics of the preprocessed input (per core / rim / peritumoral region:
   mean and sd of the image, of a Gaussian blur at two widths and of the residuals, log coefficients of
   variation, percentiles, log volume fraction; peritumoral means in distance bands from the tumour).
2. Each latent is predicted from those statistics (ridge, 5-fold cross-validated predictions).
3. The oracle (fedsubtype.phantom.oracle) is refitted with one latent replaced by its image estimate
   ("swap in"), or with every latent estimated except one kept exact ("only this true"). The AUC moves
   show which latent's recovery limits an image model.

Run from the repository root after a paper benchmark (its test splits are reused):

    python -m research.latent_swap --cache cache/sim-32 --size 32 --results results/paper-v7

Phantom figures are engineering evidence, never clinical claims.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from fedsubtype.benchmarks.paper import split_external
from fedsubtype.data.cache import PreprocessCache
from fedsubtype.data.manifest import read_manifest
from fedsubtype.phantom.oracle import fit_oracle, latent_columns
from fedsubtype.data.preprocess import PreprocessConfig

warnings.filterwarnings("ignore")


def _blur(a: np.ndarray, m: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(a * m, sigma) / np.maximum(ndimage.gaussian_filter(m.astype(float), sigma), 1e-6)


def case_statistics(img: np.ndarray, reg: np.ndarray, scale: float) -> list[float]:
    """61 numbers; `scale` = voxels per 32³-voxel (1 at 32³, 2 at 64³)."""
    seen = (reg > 0).astype(float)
    b1, b2 = _blur(img, seen, scale) * seen, _blur(img, seen, 2 * scale) * seen
    out: list[float] = []
    for r in (1, 2, 3):
        m = reg == r
        if m.sum() < 2:
            m = reg > 0
        for a in (img, b1, img - b1, b2, b1 - b2):
            out += [a[m].mean(), a[m].std()]
        out.append(np.log(max(m.mean(), 1e-4)))
        mu = abs(img[m].mean()) + 0.5
        out += [np.log(a[m].std() / mu + 1e-3) for a in (img, b1, b2, img - b1)]
        out += list(np.percentile(img[m], [10, 50, 90]))
    dist = ndimage.distance_transform_edt(~((reg == 1) | (reg == 2)))
    peri = reg == 3
    bands = []
    for lo, hi in ((0, 1.5), (1.5, 3), (3, 5), (5, 99)):
        m = peri & (dist > lo * scale) & (dist <= hi * scale)
        bands.append(img[m].mean() if m.sum() else img[peri].mean() if peri.any() else 0.0)
    return out + bands + [bands[0] - bands[3], bands[1] - bands[3], bands[0] - bands[2]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.latent_swap", description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data/phantom/manifest.csv")
    ap.add_argument("--latents", default="data/phantom/latents.csv")
    ap.add_argument("--cache", default="cache/sim-32")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--results", default="results/paper-v7", help="a paper benchmark folder (its test splits)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    cases = read_manifest(args.manifest)
    cache = PreprocessCache(Path(args.cache), PreprocessConfig(size=args.size))
    ids = [c.case_id for c in cases]
    x = np.array([case_statistics(p.image.astype(float), p.regions, args.size / 32)
                  for p in map(cache.get, cases)])
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    man = pd.read_csv(args.manifest).set_index("case_id").loc[ids]
    lat = pd.read_csv(args.latents).set_index("case_id").loc[ids][latent_columns()]
    est = lat.copy()
    for col in lat.columns:
        est[col] = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 4, 13)), x, lat[col].to_numpy(), cv=5)
    labels = man[["er", "pr", "her2", "ki67"]]
    internal = man.index.isin([c.case_id for c in split_external(cases, None)[1]])  # the benchmark's held-out site

    def score(latents: pd.DataFrame) -> np.ndarray:
        per_seed = []
        for seed in map(int, args.seeds.split(",")):
            test_ids = pd.read_csv(Path(args.results) / "runs" / "full" / f"seed{seed}" / "test.csv").case_id
            is_test = man.index.isin(test_ids)
            pred = fit_oracle(latents[internal & ~is_test], labels[internal & ~is_test], seed=seed).predict(latents[is_test])
            per_seed.append([roc_auc_score(labels[t][is_test].dropna(), pred[t][labels[t][is_test].notna().to_numpy()])
                             for t in ("er", "pr", "her2")])
        return np.mean(per_seed, axis=0)

    exact, estimated = score(lat), score(est)
    print(f"{x.shape[1]} statistics at {args.size}³; AUC ER / PR / HER2 (avg)")
    print(f"oracle, exact latents      {np.round(exact, 3)} ({exact.mean():.3f})")
    print(f"every latent from stats    {np.round(estimated, 3)} ({estimated.mean():.3f})")
    print("latent                 rho(stats)  swap in: Δ ER/PR/HER2      only this true: Δ ER/PR/HER2")
    for col in lat.columns:
        swap, keep = lat.copy(), est.copy()
        swap[col], keep[col] = est[col], lat[col]
        rho = spearmanr(est[col], lat[col])[0]
        print(f"{col:22s} {rho:6.2f}      {np.round(score(swap) - exact, 3)}    {np.round(score(keep) - estimated, 3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
