"""`fedsubtype predict`: biomarkers, subtype and (with --explain) attention maps for new cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsubtype.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict ER/PR/HER2, Ki-67 and subtype for a case or a cohort",
                       description="One case (--image/--mask) prints JSON; a cohort (--manifest/--out) writes "
                                   "predictions.csv. --explain DIR writes attention maps (NIfTI on the input grid) "
                                   "and a PNG per case. Research use only.")
    p.add_argument("--model", type=Path, required=True, help="model.pt from `fedsubtype train` or a federation")
    p.add_argument("--image", type=Path, help="post-contrast image (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("--mask", type=Path, help="tumour mask on the same physical space")
    p.add_argument("--manifest", type=Path, help="a whole cohort instead of one case")
    p.add_argument("--out", type=Path, help="output folder for --manifest (predictions.csv)")
    p.add_argument("--explain", type=Path, metavar="DIR", help="write attention maps and figures here")
    p.add_argument("--cache", type=Path, default=None, help="preprocessing cache folder to reuse (cohort mode)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    single = args.image is not None or args.mask is not None
    if single and args.manifest is not None:
        raise UserError("give either --image/--mask or --manifest, not both", "choose one case or a cohort")
    if single and (args.image is None or args.mask is None):
        raise UserError("--image and --mask go together", "pass both the image and its tumour mask")
    if not single and args.manifest is None:
        raise UserError("nothing to predict", "pass --image IMG --mask MASK, or --manifest M --out DIR")
    if args.manifest is not None and args.out is None:
        raise UserError("--manifest needs --out DIR", "name a folder for predictions.csv")

    from fedsubtype.train.checkpoint import load_model
    from fedsubtype.train.runtime import resolve_device

    model, bundle = load_model(args.model, device=str(resolve_device(args.device)))
    if single:
        for flag, path in (("--image", args.image), ("--mask", args.mask)):
            if not path.exists():
                raise UserError("file not found", "check the path", where=f"{flag} {path}")
        from fedsubtype.inference.predict import predict_one

        print(json.dumps(predict_one(model, bundle, args.image, args.mask, explain_dir=args.explain), indent=2))
        return 0

    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.inference.predict import predict_cohort, predict_one
    from fedsubtype.data.validation import validate_cases

    report = validate_cases(read_manifest(args.manifest), progress=True)
    for problem in report.problems:
        if problem.severity == "error":
            print(f"skipping {problem.line()}")
    args.out.mkdir(parents=True, exist_ok=True)

    def explain_case(case, _res):
        if args.explain is not None:
            predict_one(model, bundle, case.image, case.mask, explain_dir=args.explain, case_id=case.case_id)

    n = predict_cohort(model, bundle, report.cases, args.out / "predictions.csv", cache_dir=args.cache,
                       on_case=explain_case)
    print(f"wrote {args.out / 'predictions.csv'} ({n} cases)")
    return 0
