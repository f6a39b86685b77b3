"""Phantom generation speed and size: median of repeats on a small cohort, optionally one full 960-case run.

Reference measured in the same run: writing the same number of volumes of the same sizes (random int16,
SimpleITK, gzip) - the I/O floor of any generator. Machine load is quoted because the CPU may be shared.

    nice -n 10 python bench/bench_phantom.py                 # 24 cases x 3 repeats, 2 workers
    nice -n 10 python bench/bench_phantom.py --full          # plus one 960-case, 5-site run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedsubtype.phantom import generate_cohort
from fedsubtype.phantom.plan import plan_cohort


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def reference_io(cases: int, sites: int, folder: Path) -> float:
    """Seconds to write `cases` random int16 volumes of the sites' shapes plus masks (single process)."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for p in plan_cohort(cases, sites, 0):
        shape = p.site.scanner.shape[::-1]
        img = sitk.GetImageFromArray(rng.integers(0, 1000, size=shape, dtype=np.int16))
        sitk.WriteImage(img, str(folder / f"{p.case_id}.nii.gz"), True)
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(folder / f"{p.case_id}_m.nii.gz"), True)
    return time.perf_counter() - start


def timed_generation(cases: int, sites: int, workers: int, folder: Path, seed: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its workers, bytes on disk)."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "phantom.json").is_file():
        raise SystemExit(f"{folder}: not empty and not a phantom cohort; choose another --keep")
    cpu0 = sum(os.times()[:4])
    start = time.perf_counter()
    manifest = generate_cohort(folder, cases=cases, sites=sites, seed=seed, workers=workers, progress=False)
    wall = time.perf_counter() - start
    return wall, sum(os.times()[:4]) - cpu0, folder_bytes(manifest.parent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also one 960-case, 5-site run")
    parser.add_argument("--keep", type=Path, help="write the full cohort here and keep it (e.g. data/phantom-bench)")
    parser.add_argument("--json", type=Path, default=Path("results/bench_phantom.json"))
    args = parser.parse_args()

    report: dict = {"cpu_count": os.cpu_count(), "workers": args.workers, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_phantom_") as tmp:
        root = Path(tmp)
        walls, cpus, refs = [], [], []
        size = 0
        for r in range(args.repeats):
            wall, cpu, size = timed_generation(args.cases, args.sites, args.workers, root / "small", seed=r)
            ref_dir = root / f"ref{r}"
            ref_dir.mkdir()
            refs.append(reference_io(args.cases, args.sites, ref_dir))
            walls.append(wall)
            cpus.append(cpu)
        med_wall, med_ref = statistics.median(walls), statistics.median(refs)
        report["small"] = {
            "cases": args.cases, "sites": args.sites, "repeats": args.repeats,
            "wall_s_median": round(med_wall, 2), "cases_per_s": round(args.cases / med_wall, 2),
            "cpu_s_per_case_median": round(statistics.median(cpus) / args.cases, 3),
            "reference_io_s_median": round(med_ref, 2), "ratio_to_reference": round(med_wall / med_ref, 2),
            "mb_per_case": round(size / args.cases / 1e6, 3),
        }
        print(f"{args.cases} cases x {args.repeats}: median {med_wall:.1f} s ({args.cases / med_wall:.2f} cases/s, "
              f"{report['small']['cpu_s_per_case_median']:.3f} CPU-s/case) with {args.workers} workers; "
              f"I/O reference {med_ref:.1f} s (ratio {med_wall / med_ref:.2f}); {size / args.cases / 1e6:.2f} MB/case")
        if args.full:
            wall, cpu, size = timed_generation(960, 5, args.workers, args.keep or root / "full", seed=0)
            report["full"] = {"cases": 960, "sites": 5, "wall_s": round(wall, 1), "cases_per_s": round(960 / wall, 2),
                              "cpu_s_per_case": round(cpu / 960, 3), "size_mb": round(size / 1e6, 1)}
            print(f"960 cases, 5 sites: {wall:.1f} s ({960 / wall:.2f} cases/s, {cpu / 960:.3f} CPU-s/case), "
                  f"{size / 1e6:.0f} MB on disk")
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before'][0]:.1f}, after {report['load_after'][0]:.1f} "
          f"on {os.cpu_count()} cores (other work shares the CPU)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
