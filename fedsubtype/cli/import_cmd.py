"""`fedsubtype import mama-mia ROOT --out manifest.csv`: public cohorts' layouts -> case manifest."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="turn a public cohort's folder layout into a case manifest",
                              description="Turn a public cohort's folder layout into a case manifest.")
    sources = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    m = sources.add_parser(
        "mama-mia", help="MAMA-MIA (images/, segmentations/expert/, clinical_and_imaging_info.xlsx)",
        description="Write a manifest for MAMA-MIA: one post-contrast phase image, the expert segmentation, "
                    "ER/PR/HER2 as 0/1/missing, Ki-67 missing. Cases without image, segmentation or clinical "
                    "row are reported one line each and left out.",
    )
    m.add_argument("root", metavar="ROOT", help="MAMA-MIA folder holding images/ and segmentations/")
    m.add_argument("--out", required=True, metavar="MANIFEST", help="manifest CSV to write (paths relative to it)")
    m.add_argument("--phase", type=int, default=1,
                   help="DCE phase: 0 pre-contrast, 1 first post-contrast (default), 2, …")
    m.add_argument("--site-column", default="dataset", choices=("dataset", "site", "manufacturer"),
                   help="clinical column that defines a site (default: dataset)")
    m.add_argument("--clinical", metavar="FILE",
                   help="clinical table (xlsx sheet 'dataset_info', or csv); default ROOT/clinical_and_imaging_info.xlsx")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsubtype.data.importers.mama_mia import import_mama_mia

    summary = import_mama_mia(args.root, args.out, phase=args.phase, site_column=args.site_column,
                              clinical=args.clinical)
    for line in summary.lines():
        print(line)
    print(f"next: fedsubtype validate {args.out}")
    return 0
