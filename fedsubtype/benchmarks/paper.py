"""The paper's protocol (docs/paper-benchmark.md) on the phantom or any manifest: `fedsubtype benchmark paper`.

Internal cases (every site but the external one) are split 7:1:2, stratified by ER/PR/HER2 pattern, per
seed. Every network row is trained with the one training function on the train split, selected on the
validation split (optionally refitted on train + validation for the chosen number of epochs), and scored
on the internal test split. The external site is never used for training
or model selection: the internally trained models are applied to it unchanged, its cases are split
into five stratified folds, and the external figures are the mean ± sd of the per-fold AUCs (the
paper's five-fold evaluation of the external cohort). Each (row, seed) run is stored and skipped on a
rerun, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.configio import atomic_write_text, dump_yaml, to_dict
from fedsubtype.migrate import SETTINGS_VERSION, VERSION_KEY, migrate_result_settings
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case
from fedsubtype.model import VARIANTS, ModelConfig
from fedsubtype.data.preprocess import PreprocessConfig
from fedsubtype.evaluate.experiments import (mark_finished, mean_sd, pyplot, read_finished, refuse_other_settings,
                                             roc_points, save_png)
from fedsubtype.evaluate.predictions import Predictions
from fedsubtype.train.config import TrainConfig

NETWORK_ROWS: tuple[str, ...] = tuple(VARIANTS)
RADIOMICS_ROWS: dict[str, str] = {"radiomics_lr": "lr", "radiomics_svm": "svm"}
STATISTICS_ROWS: dict[str, str] = {"statistics_lr": "lr"}
"""Opt-in reference rows (not in the paper): the radiomics LR pipeline on the 7 intensity statistics per
region that `region_stats.region_statistics` computes from each network input — what a linear reader gets from them."""
ROW_NAMES: dict[str, str] = {**VARIANTS, "radiomics_lr": "radiomics (LR)", "radiomics_svm": "radiomics (SVM)",
                             "statistics_lr": "region intensity statistics (LR)",
                             "oracle": "oracle on phantom latents (upper bound)"}
KNOWN_ROWS: tuple[str, ...] = (*NETWORK_ROWS, *RADIOMICS_ROWS, *STATISTICS_ROWS)
PAPER_TABLE: dict[str, tuple[float, float, float, float]] = {
    "full": (0.893, 0.824, 0.857, 0.858),
    "no_multiscale_attention": (0.861, 0.789, 0.824, 0.825),
    "no_peritumoral": (0.871, 0.801, 0.842, 0.838),
    "no_multitask": (0.857, 0.781, 0.819, 0.819),
    "no_shared_extractor": (0.864, 0.792, 0.829, 0.828),
    "single_scale_attention": (0.859, 0.785, 0.823, 0.822),
    "core_only": (0.845, 0.772, 0.811, 0.809),
    "radiomics_lr": (0.782, 0.724, 0.758, 0.755),
    "radiomics_svm": (0.771, 0.718, 0.749, 0.746),
}
"""The paper's AUC table (ER, PR, HER2, Avg) for side-by-side display."""


@dataclass
class PaperBenchmark:
    """Settings of one benchmark run (CLI flags map onto these)."""

    manifest: Path
    out: Path
    cache_dir: Path
    seeds: Sequence[int] = (0, 1, 2)
    rows: Sequence[str] = (*NETWORK_ROWS, *RADIOMICS_ROWS)
    external_site: str | None = None
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(size=32))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(read_out="none"))  # the paper's network
    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, patience=4, progress=False,
                                                                      ema_decay=None, augment_strength=1.0))
    n_boot: int = 500
    external_folds: int = 5
    workers: int = 1
    refit: bool = False
    """After validation has chosen the epoch, retrain each network on train + validation for that many
    epochs and keep the last weights (scikit-learn's refit; the radiomics rows fit on train + validation too)."""

    def validate(self) -> None:
        unknown = [r for r in self.rows if r not in KNOWN_ROWS]
        if unknown:
            raise UserError(f"unknown row {unknown[0]!r}", f"choose among {', '.join(KNOWN_ROWS)}", where="--rows")
        if not self.seeds:
            raise UserError("no seeds given", "pass e.g. --seeds 0,1,2", where="--seeds")
        if self.external_folds < 2:
            raise UserError(f"external_folds={self.external_folds}", "use at least 2 folds", where="--external-folds")


def _stratum(labels: np.ndarray) -> np.ndarray:
    """ER/PR/HER2 pattern per case (missing = 9) for stratified folds."""
    codes = np.nan_to_num(labels[:, :3], nan=9).astype(int)
    return codes[:, 0] * 100 + codes[:, 1] * 10 + codes[:, 2]


def external_folds(labels: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Indices of `n_folds` stratified folds (by ER, the most balanced task) of the external cases
    (fewer folds when the site has fewer cases)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    er = np.nan_to_num(labels[:, 0], nan=9).astype(int)
    n_folds = min(n_folds, len(er))
    if n_folds < 2:
        return [np.arange(len(er))]
    counts = np.bincount(er)
    splitter = (StratifiedKFold(n_folds, shuffle=True, random_state=seed)
                if counts[counts > 0].min() >= n_folds else KFold(n_folds, shuffle=True, random_state=seed))
    return [test for _, test in splitter.split(np.zeros(len(er)), er)]


def _row_predictions(row: str, seed: int, bench: PaperBenchmark, splits: dict[str, list[Case]],
                     external: list[Case], cache, features: dict[str, dict[str, np.ndarray]],
                     log: Callable[[str], None]) -> tuple[Predictions, Predictions]:
    """Predictions of one (row, seed) on the internal test split and the external site (cached on disk)."""
    run_dir = bench.out / "runs" / row / f"seed{seed}"
    done = run_dir / "done.json"
    if read_finished(done) is not None:
        return Predictions.read_csv(run_dir / "test.csv"), Predictions.read_csv(run_dir / "external.csv")
    run_dir.mkdir(parents=True, exist_ok=True)
    if row in RADIOMICS_ROWS:
        test, ext = _radiomics_predictions(RADIOMICS_ROWS[row], seed, splits, external, features["radiomics"])
    elif row in STATISTICS_ROWS:
        test, ext = _radiomics_predictions(STATISTICS_ROWS[row], seed, splits, external, features["statistics"])
    else:
        test, ext = _network_predictions(row, seed, bench, splits, external, cache, run_dir, log)
    test.to_csv(run_dir / "test.csv")
    ext.to_csv(run_dir / "external.csv")
    mark_finished(done, {"row": row, "seed": seed})
    return test, ext


def _network_predictions(row: str, seed: int, bench: PaperBenchmark, splits: dict[str, list[Case]],
                         external: list[Case], cache, run_dir: Path,
                         log: Callable[[str], None]) -> tuple[Predictions, Predictions]:
    """Train the row's network through the one pipeline (refit on train + validation when asked) and predict
    the internal test split and the external site."""
    import dataclasses

    from fedsubtype.data.dataset import CaseDataset
    from fedsubtype.model import build_model
    from fedsubtype.train.pipeline import PipelineJob, run_pipeline

    job = PipelineJob(lambda: build_model(dataclasses.replace(bench.model, variant=row)),
                      CaseDataset(splits["train"], cache), CaseDataset(splits["val"], cache),
                      dataclasses.replace(bench.training, seed=seed),
                      predict={"test": CaseDataset(splits["test"], cache), "external": CaseDataset(external, cache)},
                      refit_on=CaseDataset(splits["train"] + splits["val"], cache) if bench.refit else None)
    preds = run_pipeline(job, out_dir=run_dir, log=log).predictions
    return preds["test"], preds["external"]


def statistics_features(cases: Sequence[Case], cache, profile: bool = False) -> dict[str, np.ndarray]:
    """Per case, the statistics the full network reads from the same cached input (`input_statistics`:
    7 per region for core, rim and peritumoral tissue, plus the peritumoral profile with `profile`)."""
    import torch

    from fedsubtype.model.region_stats import input_statistics
    from fedsubtype.model.regions_pool import region_masks
    from fedsubtype.model.variants import ALL_REGIONS

    out = {}
    with torch.no_grad():
        for case in cases:
            pc = cache.get(case)
            masks = region_masks(torch.from_numpy(pc.regions.astype(np.int64))[None], ALL_REGIONS)
            stats = input_statistics(torch.from_numpy(pc.image)[None, None], masks, ALL_REGIONS, profile)
            out[case.case_id] = stats[0].double().numpy()
    return out


def _labels_of(cases: Sequence[Case]) -> np.ndarray:
    return np.stack([c.label_vector() for c in cases]).astype(float)


def _radiomics_predictions(kind: str, seed: int, splits: dict[str, list[Case]], external: list[Case],
                           features: dict[str, np.ndarray]) -> tuple[Predictions, Predictions]:
    from fedsubtype.evaluate.radiomics import RadiomicsBaseline

    train = splits["train"] + splits["val"]  # cross-validation inside the pipeline replaces the val split
    model = RadiomicsBaseline(kind, seed=seed).fit(np.stack([features[c.case_id] for c in train]), _labels_of(train))

    def predict(cases: Sequence[Case]) -> Predictions:
        probs, ki67 = model.predict(np.stack([features[c.case_id] for c in cases]))
        return Predictions([c.case_id for c in cases], [c.site for c in cases], probs, ki67, _labels_of(cases))

    return predict(splits["test"]), predict(external)


def _score(preds: Predictions, n_boot: int, seed: int) -> dict[str, Any]:
    from fedsubtype.evaluate.metrics import compute_metrics

    return compute_metrics(preds.labels, preds.probs, preds.ki67, n_boot=n_boot, seed=seed)


def _mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sd over seeds (or folds), as the table stores them."""
    m, sd, _ = mean_sd(values)
    return m, sd


def _auc(m: dict[str, Any], task: str) -> float | None:
    v = m.get(task, {}).get("auc")
    return None if v is None else float(v)


RESULT_SETTINGS: tuple[str, ...] = ("external_site", "preprocess", "model", "training", "external_folds", "refit")
"""Settings that change what a stored (row, seed) run means; resuming with others would mix two tables."""
MACHINE_SETTINGS: tuple[str, ...] = ("device", "progress", "threads", "num_workers")
"""Training settings that change where and how fast a run goes, not its result."""


def check_same_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into `folder` when its stored runs were made with other RESULT_SETTINGS; an older
    folder's config.yaml is read in today's form (fedsubtype.migrate), or refused when it cannot be."""
    stored = folder / "config.yaml"
    refuse_other_settings(stored, settings, RESULT_SETTINGS, ignore={"training": MACHINE_SETTINGS},
                          migrate=lambda old: migrate_result_settings(old, str(stored)))


def split_external(cases: Sequence[Case], external_site: str | None, where: str = "manifest"
                   ) -> tuple[str, list[Case], list[Case]]:
    """The held-out site (the one given, else the smallest; ties by name), the internal and the external cases."""
    sites = sorted({c.site for c in cases})
    if len(sites) < 2:
        raise UserError("the paper protocol needs at least two sites (one is held out as external)",
                        "use a manifest with several sites", where=where)
    counts = {s: sum(c.site == s for c in cases) for s in sites}
    ext_site = external_site or min(sites, key=lambda s: (counts[s], s))
    if ext_site not in counts:
        raise UserError(f"external site {ext_site!r} is not in the manifest", f"choose among {', '.join(sites)}",
                        where="--external-site")
    return ext_site, [c for c in cases if c.site != ext_site], [c for c in cases if c.site == ext_site]


def _usable_cases(bench: PaperBenchmark, log: Callable[[str], None]) -> list[Case]:
    """The manifest's cases that pass validation (each skipped one reported on one line)."""
    from fedsubtype.data.manifest import read_manifest
    from fedsubtype.data.validation import validate_cases

    report = validate_cases(read_manifest(bench.manifest), workers=bench.workers, progress=True)
    for p in report.problems:
        if p.severity == "error":
            log(f"skipping {p.line()}")
    return list(report.cases)


def _reference_features(bench: PaperBenchmark, cases: list[Case], cache) -> dict[str, dict[str, np.ndarray]]:
    """Per case, the feature vectors the radiomics and statistics rows fit on (only those the rows need)."""
    features: dict[str, dict[str, np.ndarray]] = {}
    if any(r in RADIOMICS_ROWS for r in bench.rows):
        from fedsubtype.evaluate.radiomics import feature_matrix

        matrix, _ = feature_matrix(cases, cache_dir=bench.cache_dir, workers=bench.workers)
        features["radiomics"] = {c.case_id: matrix[i] for i, c in enumerate(cases)}
    if any(r in STATISTICS_ROWS for r in bench.rows):
        features["statistics"] = statistics_features(cases, cache, bench.model.read_out_parts.profile)
    return features


def run_paper_benchmark(bench: PaperBenchmark, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every (row, seed) and write the table, DeLong tests and ROC curves under `bench.out`."""
    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.data.splits import stratified_split

    bench.validate()
    settings = {VERSION_KEY: SETTINGS_VERSION, **{k: to_dict(v) for k, v in vars(bench).items()}}
    check_same_settings(bench.out, settings)
    cases = _usable_cases(bench, log)
    ext_site, internal, external = split_external(cases, bench.external_site, where=str(bench.manifest))
    log(f"internal: {len(internal)} cases from {len({c.site for c in internal})} sites; "
        f"external: {len(external)} cases ({ext_site})")
    bench.out.mkdir(parents=True, exist_ok=True)
    dump_yaml(settings, bench.out / "config.yaml")

    cache = PreprocessCache(bench.cache_dir, bench.preprocess)
    cache.warm(cases, workers=bench.workers, progress=True)
    features = _reference_features(bench, cases, cache)

    oracle_dir = bench.manifest.parent if (bench.manifest.parent / "latents.csv").is_file() else None
    per_seed: dict[str, list[dict[str, Any]]] = {r: [] for r in bench.rows}
    per_seed_ext: dict[str, list[list[dict[str, Any]]]] = {r: [] for r in bench.rows}
    oracle_rows: list[dict[str, Any]] = []
    delong_rows: list[dict[str, Any]] = []
    roc_inputs: dict[str, Predictions] = {}
    for seed in bench.seeds:
        splits = stratified_split(internal, (0.7, 0.1, 0.2), seed=seed)
        preds: dict[str, Predictions] = {}
        for row in bench.rows:
            log(f"[seed {seed}] {ROW_NAMES[row]}")
            test, ext = _row_predictions(row, seed, bench, splits, external, cache, features, log)
            preds[row] = test
            per_seed[row].append(_score(test, bench.n_boot, seed))
            folds = external_folds(ext.labels, bench.external_folds, seed)
            per_seed_ext[row].append([_score(ext.subset(f), 0, seed) for f in folds])
        if seed == bench.seeds[0]:
            roc_inputs = preds
        if oracle_dir is not None:
            from fedsubtype.phantom.oracle import oracle_metrics

            oracle_rows.append(oracle_metrics(oracle_dir, [c.case_id for c in splits["train"] + splits["val"]],
                                              [c.case_id for c in splits["test"]], seed=seed))
        if "full" in preds:
            delong_rows += _delong_rows(preds, seed)

    table = _table(bench, per_seed, per_seed_ext, oracle_rows, delong_rows)
    _write_outputs(bench, table, delong_rows, roc_inputs, ext_site, len(internal), len(external))
    return table


def _delong_rows(preds: dict[str, Predictions], seed: int) -> list[dict[str, Any]]:
    from fedsubtype.evaluate.metrics import delong_test

    full = preds["full"]
    rows = []
    for row, p in preds.items():
        if row == "full":
            continue
        for j, task in enumerate(CLASSIFICATION_TASKS):
            y = full.labels[:, j]
            ok = ~np.isnan(y) & ~np.isnan(full.probs[:, j]) & ~np.isnan(p.probs[:, j])
            if len(np.unique(y[ok])) < 2:
                continue
            res = delong_test(y[ok].astype(int), full.probs[ok, j], p.probs[ok, j])
            if res.get("p") is None:  # undefined, e.g. a single case of one class
                continue
            rows.append({"seed": seed, "row": row, "task": task, "auc_full": res["auc1"], "auc_row": res["auc2"],
                         "z": res["z"], "p": res["p"]})
    return rows


def _external_avg(folds: list[dict[str, Any]]) -> float | None:
    """Mean over tasks of the per-task mean fold AUC (tasks without a defined AUC left out)."""
    task_means = [_mean_sd([_auc(f, t) for f in folds])[0] for t in CLASSIFICATION_TASKS]
    finite = [v for v in task_means if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _table(bench: PaperBenchmark, per_seed: dict[str, list[dict[str, Any]]],
           per_seed_ext: dict[str, list[list[dict[str, Any]]]], oracle_rows: list[dict[str, Any]],
           delong_rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for row in bench.rows:
        ms = per_seed[row]
        entry: dict[str, Any] = {"name": ROW_NAMES[row]}
        for task in CLASSIFICATION_TASKS:
            entry[task] = _mean_sd([_auc(m, task) for m in ms])
            entry[f"{task}_ci_seed{bench.seeds[0]}"] = ms[0].get(task, {}).get("auc_ci")
            ext = [_mean_sd([_auc(f, task) for f in folds])[0] for folds in per_seed_ext[row]]
            entry[f"external_{task}"] = _mean_sd(ext)
            ps = [d["p"] for d in delong_rows if d["row"] == row and d["task"] == task]
            entry[f"delong_p_{task}"] = float(np.median(ps)) if ps else None
        entry["avg"] = _mean_sd([m.get("mean_auc") for m in ms])
        entry["external_avg"] = _mean_sd([_external_avg(folds) for folds in per_seed_ext[row]])
        entry["ki67_mae"] = _mean_sd([m.get("ki67", {}).get("mae") for m in ms])
        rows[row] = entry
    if oracle_rows:
        rows["oracle"] = {"name": ROW_NAMES["oracle"],
                          **{t: _mean_sd([o.get(f"{t}_auc") for o in oracle_rows]) for t in CLASSIFICATION_TASKS},
                          "avg": _mean_sd([o.get("avg_auc") for o in oracle_rows]),
                          "ki67_mae": _mean_sd([o.get("ki67_mae") for o in oracle_rows])}
    return {"seeds": list(bench.seeds), "rows": rows}


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    if ms is None or ms[0] is None or math.isnan(ms[0]):
        return "—"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    return "—" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _write_outputs(bench: PaperBenchmark, table: dict[str, Any], delong_rows: list[dict[str, Any]],
                   roc_inputs: dict[str, Predictions], ext_site: str, n_int: int, n_ext: int) -> None:
    import csv
    import io

    rows = table["rows"]
    lines = [
        "# The paper's table on this cohort",
        "",
        "> Phantom results are engineering evidence, never clinical claims.",
        "",
        f"Internal: {n_int} cases (7:1:2 split per seed); external: {n_ext} cases from site `{ext_site}` "
        f"(never trained on; mean over up to {bench.external_folds} stratified folds). Seeds: {table['seeds']}; "
        "mean ± sd over seeds. DeLong p: full model vs the row on the internal test split (median over seeds).",
        "",
        "## Internal test split (AUC)",
        "",
        "| Method | ER | PR | HER2 | Avg | Ki-67 MAE (pp) | DeLong p (ER / PR / HER2) | paper Avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        p = " / ".join(_fmt_p(r.get(f"delong_p_{t}")) for t in CLASSIFICATION_TASKS) if key not in ("full", "oracle") else "—"
        paper = PAPER_TABLE.get(key)
        lines.append(f"| {r['name']} | {_fmt(r['er'])} | {_fmt(r['pr'])} | {_fmt(r['her2'])} | {_fmt(r['avg'])} | "
                     f"{_fmt(r['ki67_mae'], 1)} | {p} | {paper[3] if paper else '—'} |")
    lines += ["", f"## External site `{ext_site}` (AUC, mean of fold means)", "",
              "| Method | ER | PR | HER2 | Avg |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        if key == "oracle":
            continue
        lines.append(f"| {r['name']} | {_fmt(r['external_er'])} | {_fmt(r['external_pr'])} | "
                     f"{_fmt(r['external_her2'])} | {_fmt(r['external_avg'])} |")
    lines += ["", "ROC curves (first seed, internal test): " +
              ", ".join(f"![{t}](roc_{t}.png)" for t in CLASSIFICATION_TASKS), ""]
    atomic_write_text(bench.out / "table.md", "\n".join(lines))

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "method", "metric", "mean", "sd"])
    for key, r in rows.items():
        for metric in ("er", "pr", "her2", "avg", "ki67_mae", "external_er", "external_pr", "external_her2",
                       "external_avg"):
            if metric in r:
                w.writerow([key, r["name"], metric, *r[metric]])
    atomic_write_text(bench.out / "table.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["seed", "row", "task", "auc_full", "auc_row", "z", "p"], lineterminator="\n")
    w.writeheader()
    w.writerows(delong_rows)
    atomic_write_text(bench.out / "delong.csv", buf.getvalue())
    atomic_write_text(bench.out / "table.json", json.dumps(table, indent=2, default=float))
    _plot_rocs(roc_inputs, bench.out)


def _plot_rocs(preds: dict[str, Predictions], out: Path) -> None:
    """roc_<task>.png: every row's ROC curve on the internal test split of the first seed."""
    plt = pyplot()
    for j, task in enumerate(CLASSIFICATION_TASKS):
        fig, ax = plt.subplots(figsize=(5, 5))
        for row, p in preds.items():
            points = roc_points(p.labels[:, j], p.probs[:, j])
            if points is not None:
                ax.plot(*points, lw=2 if row == "full" else 1, label=ROW_NAMES[row])
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"{task.upper()} — phantom, internal test")
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        save_png(fig, out / f"roc_{task}.png")
