"""Render phantom cases and write a cohort folder: images/, masks/, manifest.csv, latents.csv, phantom.json.

The cohort is built in a hidden sibling folder and renamed into place at the end, so an interrupted
run never leaves a manifest that points at missing files. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case, write_manifest
from fedsubtype.phantom.anatomy import render_breast
from fedsubtype.phantom.plan import STREAM_IMAGE, PlannedCase, case_rng, latent_table, plan_cohort
from fedsubtype.phantom.scanner import Grid, acquire, reorient

GENERATOR_VERSION = "4"
MARKER = "phantom.json"
MAX_SITES = 12
MIN_CASES_PER_SITE = 4


@dataclass(frozen=True)
class RenderedCase:
    """A case's image and mask as stored by its site, and the latents actually rendered."""

    image: sitk.Image
    mask: sitk.Image
    latents: dict[str, float]
    centre_mm: tuple[float, float, float]  # tumour centre, physical LPS coordinates


def render_case(case: PlannedCase, seed: int) -> RenderedCase:
    """Draw breast, tumour and scanner effects for one planned case (single-threaded, deterministic)."""
    from fedsubtype.phantom.tumour import place, render_tumour

    scanner = case.site.scanner
    rng = case_rng(seed, case.index, STREAM_IMAGE)
    grid = Grid(scanner.shape, scanner.spacing)
    with threadpool_limits(1):
        breast = render_breast(rng, grid, scanner.fat_suppression, case.latents["fgt_density"], case.latents["bpe"])
        centre, latents = place(rng, grid, breast, case.latents)
        mask = render_tumour(rng, grid, breast, latents, centre, scanner.fat_suppression)
        stored = acquire(rng, breast.image, scanner)
    origin = -0.5 * grid.extent  # canonical grid centred on the scanner's isocentre
    images = []
    for arr in (stored, mask):
        data, spacing, org, direction = reorient(arr, scanner.spacing, origin, scanner)
        img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
        img.SetSpacing(spacing)
        img.SetOrigin(org)
        img.SetDirection(direction)
        images.append(img)
    centre_phys = tuple(float(v) for v in origin + centre)
    return RenderedCase(images[0], images[1], latents, centre_phys)


def _write_case(case: PlannedCase, seed: int, folder: str) -> tuple[int, dict[str, float]]:
    rendered = render_case(case, seed)
    root = Path(folder)
    sitk.WriteImage(rendered.image, str(root / "images" / f"{case.case_id}.nii.gz"), True, 1)
    sitk.WriteImage(rendered.mask, str(root / "masks" / f"{case.case_id}.nii.gz"), True, 1)
    return case.index, rendered.latents


def _write_case_packed(args: tuple[PlannedCase, int, str]) -> tuple[int, dict[str, float]]:
    return _write_case(*args)


def check_arguments(cases: int, sites: int, seed: int, workers: int | None) -> None:
    """One-line UserErrors for impossible cohort arguments."""
    if not 1 <= sites <= MAX_SITES:
        raise UserError(f"--sites {sites} is out of range", f"use 1 to {MAX_SITES} sites")
    if cases < sites * MIN_CASES_PER_SITE:
        raise UserError(f"--cases {cases} is too few for {sites} site(s)",
                        f"use at least {sites * MIN_CASES_PER_SITE} ({MIN_CASES_PER_SITE} per site)")
    if cases > 100_000:
        raise UserError(f"--cases {cases} is more than this generator is meant for", "use at most 100000")
    if seed < 0:
        raise UserError(f"--seed {seed} is negative", "use a seed >= 0")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be at least 1", "omit it to use every CPU core")


def is_phantom_cohort(folder: Path) -> bool:
    """True when `folder` holds a cohort written by this generator (it may then be overwritten)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("generator") == "fedsubtype.phantom"
    except (OSError, ValueError):
        return False


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("exists and is not a folder", "choose another --out", where=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_phantom_cohort(out_dir):
        raise UserError("folder is not empty and is not a phantom cohort",
                        "choose an empty or new --out folder (nothing was overwritten)", where=str(out_dir))


def _pool_context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds; workers use numpy/scipy/SimpleITK only
    return mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context("spawn")


def generate_cohort(out_dir: str | Path, *, cases: int = 960, sites: int = 5, seed: int = 0,
                    workers: int | None = None, progress: bool = True) -> Path:
    """Write a phantom cohort to `out_dir` and return its manifest path (`out_dir/manifest.csv`).

    Refuses a non-empty folder that is not a phantom cohort; replaces an earlier phantom cohort.
    """
    check_arguments(cases, sites, seed, workers)
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    planned = plan_cohort(cases, sites, seed)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    try:
        realised = _render_all(planned, seed, tmp, workers, progress)
        _write_tables(planned, realised, tmp, cases, sites, seed)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"


def _render_all(planned: list[PlannedCase], seed: int, tmp: Path, workers: int | None,
                progress: bool) -> dict[int, dict[str, float]]:
    from tqdm import tqdm

    n_workers = min(workers or os.cpu_count() or 1, len(planned))
    jobs = [(p, seed, str(tmp)) for p in planned]
    bar = tqdm(total=len(jobs), desc="phantom cases", unit="case", disable=not progress, file=sys.stderr)
    realised: dict[int, dict[str, float]] = {}
    try:
        if n_workers <= 1:
            for job in jobs:
                index, lat = _write_case_packed(job)
                realised[index] = lat
                bar.update()
        else:
            with ProcessPoolExecutor(n_workers, mp_context=_pool_context()) as pool:
                for index, lat in pool.map(_write_case_packed, jobs, chunksize=4):
                    realised[index] = lat
                    bar.update()
    finally:
        bar.close()
    return realised


def _write_tables(planned: list[PlannedCase], realised: dict[int, dict[str, float]], folder: Path,
                  cases: int, sites: int, seed: int) -> None:
    rows = []
    for p in planned:
        s = p.site.scanner
        rows.append(Case(
            case_id=p.case_id, image=folder / "images" / f"{p.case_id}.nii.gz",
            mask=folder / "masks" / f"{p.case_id}.nii.gz", site=p.site.name, labels=p.labels,
            extra={"manufacturer": s.manufacturer, "scanner": s.model, "field_strength": f"{s.field_strength:.1f}",
                   "fat_suppression": str(int(s.fat_suppression)), "cohort_kind": p.site.kind}))
    final = [PlannedCase(p.index, p.case_id, p.site, p.biology, realised[p.index], p.labels) for p in planned]
    latent_csv = latent_table(final).to_csv(index=False, lineterminator="\n", float_format="%.5g")
    atomic_write_text(folder / "latents.csv", latent_csv)
    write_manifest(rows, folder / "manifest.csv")
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.site.name] = counts.get(p.site.name, 0) + 1
    marker = {"generator": "fedsubtype.phantom", "version": GENERATOR_VERSION, "cases": cases, "sites": sites,
              "seed": seed, "site_cases": counts,
              "note": "phantom data: engineering evidence, never clinical claims"}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
