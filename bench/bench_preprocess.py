"""Preprocessing throughput: cold (empty cache) vs cached (warm), in cases/s, on a phantom cohort.

    python bench/bench_preprocess.py [--cases 60] [--sites 3] [--repeats 3] [--size 64] [--workers 1] [--out FILE.json]
                                     [--manifest EXISTING.csv] [--figure FILE.png]

Each repeat preprocesses every case into a fresh, empty cache (cold; file hashes are recomputed too),
then reads them all back through the cache (cached) and through CaseDataset (what training sees).
Reported: medians over repeats and the cached/cold ratio. Phantom data: engineering evidence only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="model input edge (voxels)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the cold pass")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--manifest", type=Path, help="use this cohort instead of generating a phantom one")
    parser.add_argument("--figure", type=Path, help="also save a PNG of the first cases' regions and model input")
    args = parser.parse_args(argv)

    from fedsubtype.data import cache as cache_mod
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.configio import atomic_write_text
    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.phantom import generate_cohort
    from fedsubtype.data.preprocess import PreprocessConfig

    print("command:", shlex.join([sys.executable, *sys.argv]))
    cfg = PreprocessConfig(size=args.size)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        if args.manifest:
            cases = read_manifest(args.manifest)[:args.cases]
            print(f"cohort: {len(cases)} cases from {args.manifest}")
        else:
            t0 = time.perf_counter()
            manifest = generate_cohort(Path(tmp) / "cohort", cases=args.cases, sites=args.sites, seed=args.seed,
                                       progress=False)
            print(f"phantom cohort: {args.cases} cases, {args.sites} sites in {time.perf_counter() - t0:.1f} s")
            cases = read_manifest(manifest)
        if args.figure:
            save_figure(cases[:4], cfg, args.figure)
        cold, cached, dataset = [], [], []
        for rep in range(args.repeats):
            cache_mod._hash_memo.clear()  # cold means nothing known: hash the files again too
            cache = PreprocessCache(Path(tmp) / f"cache{rep}", cfg)
            first = cache.warm(cases, workers=args.workers, progress=False)
            assert first["miss"] == len(cases), first
            second = cache.warm(cases, progress=False)
            assert second["hit"] == len(cases), second
            ds = CaseDataset(cases, cache)
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            dataset.append(len(ds) / (time.perf_counter() - t))
            cold.append(first["cases_per_s"])
            cached.append(second["cases_per_s"])
            print(f"repeat {rep + 1}/{args.repeats}: cold {cold[-1]:.2f} cases/s, cached {cached[-1]:.1f} cases/s, "
                  f"dataset {dataset[-1]:.1f} items/s", flush=True)
        entry_bytes = [p.stat().st_size for p in (Path(tmp) / "cache0").rglob("*.fspc")]
    result = {
        "cases": len(cases), "sites": args.sites, "repeats": args.repeats, "size": args.size, "workers": args.workers,
        "cold_cases_per_s_median": statistics.median(cold),
        "cached_cases_per_s_median": statistics.median(cached),
        "dataset_items_per_s_median": statistics.median(dataset),
        "ratio_cached_over_cold": statistics.median(cached) / statistics.median(cold),
        "entry_kib_median": statistics.median(entry_bytes) / 1024,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "note": "phantom cohort: engineering evidence, not a clinical result",
    }
    print(f"cold   (empty cache): {result['cold_cases_per_s_median']:.2f} cases/s (median of {args.repeats})")
    print(f"cached (warm cache):  {result['cached_cases_per_s_median']:.1f} cases/s (median of {args.repeats})")
    print(f"dataset items:        {result['dataset_items_per_s_median']:.1f} items/s")
    print(f"ratio cached/cold:    {result['ratio_cached_over_cold']:.0f}x; entry size {result['entry_kib_median']:.0f} KiB")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def save_figure(cases: list, cfg, path: Path) -> None:
    """Axial slice through each tumour: original image with regions, and the model input with region contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    from fedsubtype.data.imageio import load_case_images
    from fedsubtype.data.preprocess import preprocess_images
    from fedsubtype.data.regions import body_mask, compute_regions

    fig, axes = plt.subplots(2, len(cases), figsize=(3.2 * len(cases), 6.6), squeeze=False)
    for col, case in enumerate(cases):
        image, mask = load_case_images(case)
        body = body_mask(image, air_fraction=cfg.air_fraction)
        regions = sitk.GetArrayFromImage(compute_regions(image, mask, rim_mm=cfg.rim_mm, peri_mm=cfg.peri_mm, body=body))
        z = int(np.argwhere(regions > 0)[:, 0].mean())
        top = axes[0, col]
        top.imshow(sitk.GetArrayViewFromImage(image)[z], cmap="gray")
        top.contour(sitk.GetArrayViewFromImage(body)[z], [0.5], colors="y", linewidths=0.8)
        top.imshow(np.ma.masked_equal(regions[z], 0), cmap="brg", alpha=0.45, vmin=1, vmax=3)
        top.set_title(f"{case.case_id} ({case.site})", fontsize=9)
        pre = preprocess_images(image, mask, cfg)
        k = cfg.size // 2
        bottom = axes[1, col]
        bottom.imshow(pre.image[:, :, k].T, cmap="gray", origin="lower")
        sl = pre.regions[:, :, k].T
        for region, colour in ((sl > 0, "g"), (np.isin(sl, (1, 2)), "r"), (sl == 1, "b")):
            bottom.contour(region.astype(float), [0.5], colors=colour, origin="lower", linewidths=0.9)
        bottom.set_title(f"model input {cfg.size}³, FOV {pre.meta['fov_mm']:.0f} mm", fontsize=9)
        for ax in (top, bottom):
            ax.set_axis_off()
    fig.suptitle("Core (blue), rim (red), peritumoral shell (green), body outline (yellow); below: model input "
                 "with the same regions — phantom data, not clinical",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
