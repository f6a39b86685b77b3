"""`fedsubtype phantom`: write a phantom cohort (NIfTI images, masks, manifest, latents)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `phantom` subcommand."""
    p = subparsers.add_parser(
        "phantom", help="generate a phantom breast DCE-MRI cohort",
        description="Write a phantom cohort: single-phase post-contrast breast MRI (NIfTI), tumour masks, "
                    "manifest.csv (ER/PR/HER2/Ki-67) and latents.csv. Same seed, same bytes. "
                    "Phantom results are engineering evidence, never clinical claims.")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or an earlier phantom cohort)")
    p.add_argument("--cases", type=int, default=960, help="number of cases (default 960)")
    p.add_argument("--sites", type=int, default=5, help="number of sites, 1-12 (default 5; the last one is the "
                   "small external site)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: every CPU core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print where its manifest is."""
    import time

    from fedsubtype.phantom import generate_cohort

    start = time.perf_counter()
    manifest = generate_cohort(args.out, cases=args.cases, sites=args.sites, seed=args.seed,
                               workers=args.workers, progress=not args.no_progress)
    size = sum(f.stat().st_size for f in manifest.parent.rglob("*") if f.is_file())
    print(f"wrote {args.cases} cases from {args.sites} site(s) in {time.perf_counter() - start:.1f} s, "
          f"{size / 1e6:.1f} MB: {manifest}")
    print("phantom data: engineering evidence, never clinical claims")
    return 0
