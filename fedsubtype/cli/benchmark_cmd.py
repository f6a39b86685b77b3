"""`fedsubtype benchmark paper`: the paper's protocol and ablation table on the phantom or any manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsubtype.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _patience(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", "never"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of epochs or 'none', got {text!r}") from None


def _decay(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or 'none', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="reproduce the paper's protocol (ablation table, radiomics, oracle)",
                       description=__doc__)
    bsub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    paper = bsub.add_parser("paper", help="the paper's table: 7 network rows, 2 radiomics rows, oracle",
                            description="Internal cases split 7:1:2 per seed; the smallest site (74 cases on the "
                                        "default phantom) is the external cohort, scored in five folds. Resumable.")
    src = paper.add_mutually_exclusive_group()
    src.add_argument("--cohort", type=Path, default=Path("data/phantom"),
                     help="phantom folder; generated (960 cases, 5 sites, seed 0) if absent (default: data/phantom)")
    src.add_argument("--manifest", type=Path, help="any manifest instead of the phantom")
    paper.add_argument("--out", type=Path, default=Path("results/paper"), help="output folder (default: results/paper)")
    paper.add_argument("--cache", type=Path, default=Path("cache"), help="preprocessing/feature cache (default: cache)")
    paper.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    paper.add_argument("--rows", default=None,
                       help="comma-separated rows (default: the nine of the paper; statistics_lr adds a linear model "
                            "on the networks' region intensity statistics)")
    paper.add_argument("--external-site", default=None, help="site held out as external (default: the smallest)")
    paper.add_argument("--size", type=int, default=32, help="model input edge in voxels (default: 32)")
    paper.add_argument("--min-fov-mm", type=float, default=0.0,
                       help="smallest field of view in mm; a fixed FOV (e.g. 64) keeps tumour size visible to the "
                            "network (default: 0, the FOV follows the tumour's extent)")
    paper.add_argument("--physical-size", action=argparse.BooleanOptionalAction, default=False,
                       help="give the networks the tumour's volume and field of view, which resizing the crop to "
                            "S³ hides (default: off)")
    paper.add_argument("--stem", choices=("strided", "deep"), default="strided",  # model.STEMS; not imported: torch
                       help="deep: a full-resolution convolution before the first downsampling, so voxel-scale "
                            "texture is read at the input's resolution (default: strided)")
    paper.add_argument("--pooling", choices=("mean", "mean_std"), default="mean",  # model.POOLINGS
                       help="statistics pooled per region: mean, or mean_std (also the standard deviation, "
                            "so within-region heterogeneity is read directly) (default: mean)")
    paper.add_argument("--region-mixing", choices=("softmax_sum", "gated_concat"), default="softmax_sum",  # REGION_MIXINGS
                       help="how region vectors combine: a softmax-weighted sum, or sigmoid-gated and concatenated "
                            "so each region keeps its features (default: softmax_sum)")
    paper.add_argument("--task-branches", action=argparse.BooleanOptionalAction, default=False,
                       help="give each task its own attention, region weighting and representation over the "
                            "shared extractor (default: off)")
    paper.add_argument("--region-statistics", action=argparse.BooleanOptionalAction, default=False,
                       help="give the shared representation the input's intensity mean and sd per region "
                            "(image, smoothed, fine residual) and the regions' volumes (default: off)")
    paper.add_argument("--statistics-heads", action=argparse.BooleanOptionalAction, default=False,
                       help="give each task its own linear read-out of those region statistics, added to its "
                            "head's output and started from a per-task linear model of the training cases "
                            "(a wide-and-deep model) (default: off)")
    paper.add_argument("--peritumoral-profile", action=argparse.BooleanOptionalAction, default=False,
                       help="add the peritumoral profile to those statistics (the image's mean in four distance "
                            "bands of the peritumoral shell; also for the statistics_lr row) (default: off)")
    paper.add_argument("--epochs", type=int, default=12, help="maximum epochs per network (default: 12)")
    paper.add_argument("--patience", type=_patience, default=4,
                       help="early-stopping patience in epochs, or 'none' to run every epoch and keep the best on "
                            "validation (default: 4)")
    paper.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 0.001)")
    paper.add_argument("--ema-decay", type=_decay, default=None,
                       help="validate, select and keep an exponential moving average of the weights with this "
                            "per-step decay (e.g. 0.995), or 'none' (default: none)")
    paper.add_argument("--augment-strength", type=float, default=1.0,
                       help="scale of the scanner-difference augmentations, 0 = none (default: 1.0)")
    paper.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                       help="after validation has chosen the epoch, retrain each network on train + validation "
                            "for that many epochs, as the radiomics rows fit on both (default: off)")
    paper.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for CIs (default: 500)")
    paper.add_argument("--workers", type=int, default=1, help="processes for preprocessing/radiomics (default: 1)")
    paper.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    paper.set_defaults(func=run)

    att = bsub.add_parser("attention", help="attention share in the regions where the phantom put the evidence",
                          description="Needs a phantom cohort (latents.csv next to the manifest).")
    att.add_argument("--model", type=Path, required=True, help="model.pt")
    att.add_argument("--manifest", type=Path, required=True, help="phantom manifest (latents.csv beside it)")
    att.add_argument("--splits", type=Path, help="splits.csv of the training run: use its test cases only")
    att.add_argument("--cache", type=Path, default=None, help="preprocessing cache folder to reuse")
    att.add_argument("--out", type=Path, default=Path("results/attention"), help="output folder")
    att.set_defaults(func=run_attention)


def run(args: argparse.Namespace) -> int:
    from fedsubtype.benchmarks.paper import NETWORK_ROWS, RADIOMICS_ROWS, PaperBenchmark, run_paper_benchmark
    from fedsubtype.configio import from_dict
    from fedsubtype.model import ModelConfig
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.train.loop import TrainConfig

    manifest = args.manifest
    if manifest is None:
        manifest = args.cohort / "manifest.csv"
        if not manifest.is_file():
            from fedsubtype.phantom import generate_cohort

            print(f"generating the phantom cohort in {args.cohort} (960 cases, 5 sites, seed 0)")
            manifest = generate_cohort(args.cohort, cases=960, sites=5, seed=0)
    if not Path(manifest).is_file():
        raise UserError("manifest not found", "check the path", where=str(manifest))
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else [*NETWORK_ROWS, *RADIOMICS_ROWS]
    bench = PaperBenchmark(
        manifest=Path(manifest), out=args.out, cache_dir=args.cache, seeds=args.seeds, rows=rows,
        external_site=args.external_site, workers=max(1, args.workers), n_boot=args.n_boot,
        preprocess=from_dict(PreprocessConfig, {"size": args.size, "min_fov_mm": args.min_fov_mm}, "--size/--min-fov-mm"),
        model=ModelConfig(physical_size=args.physical_size, stem=args.stem, pooling=args.pooling,
                          region_mixing=args.region_mixing, task_branches=args.task_branches,
                          region_statistics=args.region_statistics, statistics_heads=args.statistics_heads,
                          peritumoral_profile=args.peritumoral_profile),
        training=from_dict(TrainConfig, {"epochs": args.epochs, "patience": args.patience, "lr": args.lr, "progress": False,
                                         "device": args.device, "ema_decay": args.ema_decay,
                                         "augment_strength": args.augment_strength}, "training"),
        refit=args.refit,
    )
    table = run_paper_benchmark(bench)
    print((args.out / "table.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/table.md, table.csv, delong.csv, roc_*.png ({len(table['rows'])} rows)")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    import csv

    from fedsubtype.benchmarks.attention_evidence import run_attention_benchmark

    ids = None
    if args.splits is not None:
        if not args.splits.is_file():
            raise UserError("splits file not found", "pass the splits.csv of a training run", where=str(args.splits))
        ids = [r["case_id"] for r in csv.DictReader(open(args.splits, encoding="utf-8")) if r.get("split") == "test"]
    run_attention_benchmark(args.model, args.manifest, args.out, case_ids=ids, cache_dir=args.cache)
    print((args.out / "attention_evidence.md").read_text(encoding="utf-8"))
    return 0
