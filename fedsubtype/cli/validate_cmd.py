"""`fedsubtype validate MANIFEST`: every problem of every case, one line each, then a summary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a case manifest and every image/mask it names",
        description="Read every case of a manifest and report every problem at once, one line each "
                    "(`case_id: what — how to fix`), then a summary of cases, sites and labels. "
                    "Exit 0 when every case is usable (warnings allowed), 1 otherwise.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="case manifest (CSV: case_id,image,mask,site,er,pr,her2,ki67)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="cases checked in parallel (default: CPU count, at most 8)")
    p.add_argument("--quiet", action="store_true", help="print errors only (no warnings, no progress bar)")
    p.add_argument("--json", metavar="FILE", help="also write the full report (problems + summary) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsubtype.configio import atomic_write_text
    from fedsubtype.data.itk_log import itk_without_threads
    from fedsubtype.errors import UserError
    from fedsubtype.data.validation import validate_manifest

    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1", "pass --workers 1 or more")
    logging.getLogger("fedsubtype.data.imageio").setLevel(logging.ERROR)  # DICOM series choices are reported as warnings
    with itk_without_threads():  # cases run in parallel already; no ITK worker thread outlives the report
        report = validate_manifest(args.manifest, workers=args.workers, progress=not args.quiet and sys.stderr.isatty())
    lines = report.format()
    if args.quiet:
        keep = set(report.errors)
        n_problems = len(report.problems)
        lines = [ln for p, ln in zip(report.problems, lines[:n_problems]) if p in keep] + lines[n_problems:]
    for line in lines:
        print(line)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    if not report.ok:
        print(f"fedsubtype validate: {len(report.errors)} error(s) — fix them, or let the trainer skip unusable cases",
              file=sys.stderr)
        return 1
    return 0
