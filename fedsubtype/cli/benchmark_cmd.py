"""`fedsubtype benchmark paper`: the paper's protocol and ablation table on the phantom or any manifest."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


SETTING_FLAGS: dict[str, str] = {
    "size": "preprocess.size", "min_fov_mm": "preprocess.min_fov_mm", "read_out": "model.read_out",
    "epochs": "training.epochs", "patience": "training.patience", "lr": "training.lr",
    "ema_decay": "training.ema_decay", "augment_strength": "training.augment_strength", "device": "training.device",
}
"""Flags that set a run-config key (argparse dest -> section.key); given, they override --config."""
BENCHMARK_DEFAULTS: dict[str, dict[str, Any]] = {
    "preprocess": {"size": 32, "min_fov_mm": 0.0}, "model": {"read_out": "none"},
    "training": {"epochs": 12, "patience": 4, "lr": 1e-3, "ema_decay": None, "augment_strength": 1.0, "device": "auto"},
}
"""The benchmark's settings without --config (the rest: library defaults)."""
OLD_READ_OUT_FLAGS: tuple[str, ...] = ("region_statistics", "statistics_heads", "peritumoral_profile")
"""The switches --read-out replaced, still accepted so the commands in docs/paper-benchmark.md run unchanged."""


def _setting_flags(paper: argparse.ArgumentParser) -> None:
    """The flags of SETTING_FLAGS (absent unless given, so --config keeps its values) and the old read-out switches."""
    from fedsubtype.model.config import READ_OUTS

    quiet = argparse.SUPPRESS
    paper.add_argument("--size", type=int, default=quiet, help="model input edge in voxels (default: 32)")
    paper.add_argument("--min-fov-mm", type=float, default=quiet,
                       help="smallest field of view in mm; a fixed FOV (e.g. 64) keeps tumour size visible to the "
                            "network (default: 0, the FOV follows the tumour's extent)")
    paper.add_argument("--read-out", choices=READ_OUTS, default=quiet,
                       help="how the networks read the input's intensity statistics per region: none; statistics "
                            "(into the shared representation); linear_heads (also a per-task linear read-out, "
                            "started from linear fits on the training cases); linear_heads_profile (also the "
                            "peritumoral profile; the best configuration) (default: none; see docs/model.md)")
    for name in OLD_READ_OUT_FLAGS:
        paper.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=quiet,
                           help="earlier switch, kept for older commands: --region-statistics is --read-out "
                                "statistics, with --statistics-heads linear_heads, with --peritumoral-profile too "
                                "linear_heads_profile" if name == "region_statistics" else quiet)
    paper.add_argument("--epochs", type=int, default=quiet, help="maximum epochs per network (default: 12)")
    paper.add_argument("--patience", type=_patience, default=quiet,
                       help="early-stopping patience in epochs, or 'none' to run every epoch and keep the best on "
                            "validation (default: 4)")
    paper.add_argument("--lr", type=float, default=quiet, help="peak AdamW learning rate (default: 0.001)")
    paper.add_argument("--ema-decay", type=_decay, default=quiet,
                       help="validate, select and keep an exponential moving average of the weights with this "
                            "per-step decay (e.g. 0.995), or 'none' (default: none)")
    paper.add_argument("--augment-strength", type=float, default=quiet,
                       help="scale of the scanner-difference augmentations, 0 = none (default: 1.0)")
    paper.add_argument("--device", default=quiet, help="auto, cpu or cuda (default: auto)")


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
    paper.add_argument("--config", type=Path,
                       help="run config YAML, as for `fedsubtype train --config` (e.g. configs/best.yaml): its "
                            "preprocess, model and training sections set the networks' settings, omitted keys at the "
                            "library defaults; the flags below override it (without it: the defaults they list)")
    _setting_flags(paper)
    paper.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                       help="after validation has chosen the epoch, retrain each network on train + validation "
                            "for that many epochs, as the radiomics rows fit on both (default: off)")
    paper.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for CIs (default: 500)")
    paper.add_argument("--workers", type=int, default=1, help="processes for preprocessing/radiomics (default: 1)")
    paper.set_defaults(func=run)

    att = bsub.add_parser("attention", help="attention share in the regions where the phantom put the evidence",
                          description="Needs a phantom cohort (latents.csv next to the manifest).")
    att.add_argument("--model", type=Path, required=True, help="model.pt")
    att.add_argument("--manifest", type=Path, required=True, help="phantom manifest (latents.csv beside it)")
    att.add_argument("--splits", type=Path, help="splits.csv of the training run: use its test cases only")
    att.add_argument("--cache", type=Path, default=None, help="preprocessing cache folder to reuse")
    att.add_argument("--out", type=Path, default=Path("results/attention"), help="output folder")
    att.set_defaults(func=run_attention)


def _old_read_out(args: argparse.Namespace) -> str | None:
    """The --read-out that the earlier switches given describe (None when none was given)."""
    from fedsubtype.migrate import read_out_of

    given = [name for name in OLD_READ_OUT_FLAGS if hasattr(args, name)]
    if not given:
        return None
    flags = "/".join(f"--{name.replace('_', '-')}" for name in given)
    if hasattr(args, "read_out"):
        raise UserError(f"{flags} and --read-out both given", "use --read-out alone", where=flags)
    return read_out_of(*(bool(getattr(args, name, False)) for name in OLD_READ_OUT_FLAGS), where=flags)


def run_settings(args: argparse.Namespace) -> Any:
    """The networks' RunConfig: --config (or BENCHMARK_DEFAULTS), then the flags given, validated once."""
    from fedsubtype.configio import from_dict, to_dict
    from fedsubtype.train.run_config import RunConfig, load_run_config

    if args.config is not None:
        raw = to_dict(load_run_config(args.config))
        where = f"{args.config} (with the command-line flags)"
    else:
        raw = to_dict(from_dict(RunConfig, BENCHMARK_DEFAULTS, "benchmark defaults"))
        where = "command-line flags"
    given = {dotted: getattr(args, dest) for dest, dotted in SETTING_FLAGS.items() if hasattr(args, dest)}
    old = _old_read_out(args)
    if old is not None:
        given["model.read_out"] = old
    for dotted, value in {**given, "training.progress": False}.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return from_dict(RunConfig, raw, where=where)


def run(args: argparse.Namespace) -> int:
    from fedsubtype.benchmarks.paper import NETWORK_ROWS, RADIOMICS_ROWS, PaperBenchmark, run_paper_benchmark

    settings = run_settings(args)
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
        preprocess=settings.preprocess, model=settings.model, training=settings.training, refit=args.refit,
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
