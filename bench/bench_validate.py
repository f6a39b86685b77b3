"""Validation time ÷ plain SimpleITK read time, and the thread-pool speed-up, measured in one run.

    nice -n 10 python bench/bench_validate.py --manifest data/phantom/manifest.csv   # a cohort you have
    nice -n 10 python bench/bench_validate.py --cases 96                             # a synthetic cohort

The reference is the I/O floor: `SimpleITK.ReadImage` of every image and mask, one after the other.
Validation reads every voxel once more (NIfTI integrity + NaN scan) and checks masks and grids, so
its ratio to the floor says what the checks cost. Reports medians of --repeats runs (wall and CPU
seconds, cases/s), writes JSON to results/bench/bench_validate.json. On a loaded machine wall times
swell; CPU seconds a case are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsubtype.configio import atomic_write_text  # noqa: E402
from fedsubtype.data.imageio import write_image  # noqa: E402
from fedsubtype.data.manifest import load_manifest  # noqa: E402
from fedsubtype.data.validation import validate_cases  # noqa: E402


def synthetic_cohort(folder: Path, n: int, seed: int = 0) -> Path:
    """n cases of 100×100×40 float32 (0.7×0.7×2 mm) with an ellipsoid tumour, and their manifest."""
    zz, yy, xx = np.indices((40, 100, 100))
    base = 100 + 50 * np.sin(xx / 9.0) * np.cos(yy / 13.0)

    def one(i: int) -> str:
        rng = np.random.default_rng(seed + i)
        arr = (base + rng.normal(0, 8, base.shape)).astype(np.float32)
        inside = ((xx - 50) / 10) ** 2 + ((yy - 50) / 10) ** 2 + ((zz - 20) / 4) ** 2 <= 1
        arr[inside] += 300
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.7, 0.7, 2.0))
        mask = sitk.GetImageFromArray(inside.astype(np.uint8))
        mask.CopyInformation(img)
        write_image(img, folder / "img" / f"c{i:04d}.nii.gz")
        write_image(mask, folder / "msk" / f"c{i:04d}.nii.gz")
        return f"c{i:04d},img/c{i:04d}.nii.gz,msk/c{i:04d}.nii.gz,site{i % 5},{i % 2},,{(i // 2) % 2},{i % 90}\n"

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(one, range(n)))
    manifest = folder / "manifest.csv"
    manifest.write_text("case_id,image,mask,site,er,pr,her2,ki67\n" + "".join(rows), encoding="utf-8")
    return manifest


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="an existing manifest (default: a synthetic cohort in a temp folder)")
    parser.add_argument("--cases", type=int, default=96, help="synthetic cohort size (default 96)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/bench/bench_validate.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(args.manifest) if args.manifest else synthetic_cohort(Path(tmp), args.cases)
        cases, problems = load_manifest(manifest)
        n = len(cases)

        def read_all() -> None:
            for c in cases:
                sitk.ReadImage(str(c.image))
                sitk.ReadImage(str(c.mask))

        runs = {"read_only": read_all,
                "validate_1_worker": lambda: validate_cases(cases, workers=1),
                "validate_2_workers": lambda: validate_cases(cases, workers=2)}
        read_all()  # warm the page cache so every contender reads from memory
        results = {}
        for name, fn in runs.items():
            samples = [timed(fn) for _ in range(args.repeats)]
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            results[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cases_per_s": round(n / wall, 1),
                             "cpu_ms_per_case": round(1000 * cpu / n, 1)}
            print(f"{name:20s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  {n / wall:7.1f} cases/s  "
                  f"{1000 * cpu / n:6.1f} ms CPU/case", flush=True)
    ratio = results["validate_1_worker"]["wall_s"] / results["read_only"]["wall_s"]
    speedup = results["validate_1_worker"]["wall_s"] / results["validate_2_workers"]["wall_s"]
    print(f"validate ÷ read-only (1 worker): {ratio:.2f}; 2 workers speed-up: {speedup:.2f}× ({n} cases)")
    atomic_write_text(args.out, json.dumps({"cases": n, "manifest": str(manifest) if args.manifest else "synthetic",
                               "results": results, "validate_over_read": round(ratio, 3),
                               "speedup_2_workers": round(speedup, 3)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
