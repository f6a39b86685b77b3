"""report.md for a study: tables (mean ± sd over seeds) and PNG plots next to them.

Plots: label distribution per site, convergence per round, per-site AUC per method, ROC curves and
Ki-67 predicted vs true on the pooled test split, and the leave-one-site-out drop.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.evaluate.experiments import mean_sd, pyplot, roc_points, save_png

from .cohort import POOLED
from .runs import ALL_SITES as ALL
from .runs import RunKey
from .scenario import Scenario

DISCLAIMER = ("**Phantom results are engineering evidence, not clinical claims.** They show that the pipeline, "
              "the federation and the protocol behave as designed on synthetic images whose biology is known; "
              "they say nothing about performance on patients.")
METRICS = ("mean_auc", "er_auc", "pr_auc", "her2_auc", "ki67_mae")
HEAD = {"mean_auc": "mean AUC", "er_auc": "ER AUC", "pr_auc": "PR AUC", "her2_auc": "HER2 AUC", "ki67_mae": "Ki-67 MAE (pp)"}


def _value(rec: dict[str, Any], model: str, test_site: str, metric: str) -> float:
    for ev in rec["evaluations"]:
        if ev["model"] != model:
            continue
        m = ev["metrics"].get(test_site) or {}
        if metric == "mean_auc":
            v = m.get("mean_auc")
        elif metric == "ki67_mae":
            v = (m.get("ki67") or {}).get("mae")
        else:
            v = (m.get(metric.split("_")[0]) or {}).get("auc")
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")
    return float("nan")


def run_value(rec: dict[str, Any], test_site: str, metric: str, own_site: bool = False) -> float:
    """A run's score: the global model's, or for local-only the mean over its site models
    (each on `test_site`, or each on its own site's test split when own_site)."""
    if rec["family"] != "local":
        return _value(rec, "global", test_site, metric)
    vals = [_value(rec, ev["model"], ev["model"] if own_site else test_site, metric) for ev in rec["evaluations"]]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def fmt(values: list[float], digits: int = 3) -> str:
    m, s, n = mean_sd(values)
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _methods(records: list[dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for r in records:
        if r["method"] not in order:
            order.append(r["method"])
    return order


def _settings(records: list[dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for r in records:
        if r["setting"] not in order:
            order.append(r["setting"])
    return order


def _select(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def main_table(records: list[dict[str, Any]]) -> str:
    """Pooled-test metrics per setting and method, trained on all internal sites (mean ± sd over seeds)."""
    lines = ["| setting | method | seeds | " + " | ".join(HEAD[m] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for setting in _settings(records):
        for method in _methods(records):
            runs = _select(records, setting=setting, method=method, holdout=ALL)
            if not runs:
                continue
            cells = [fmt([run_value(r, POOLED, m) for r in runs], 1 if m == "ki67_mae" else 3) for m in METRICS]
            label = method + (" (mean of site models)" if runs[0]["family"] == "local" else "")
            lines.append(f"| {setting} | {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_site_table(records: list[dict[str, Any]], sites: list[str]) -> str:
    """Mean AUC on each site's test split (local-only: each site's own model)."""
    lines = ["| setting | method | " + " | ".join(sites) + f" | {POOLED} |", "|---|---|" + "---|" * (len(sites) + 1)]
    # local-only and FedBN: each site's own (personalised) model on its own test split
    for setting in _settings(records):
        for method in _methods(records):
            runs = _select(records, setting=setting, method=method, holdout=ALL)
            if not runs:
                continue
            cells = []
            for site in sites:
                if runs[0]["family"] in ("local", "fedbn") and any(ev["model"] == site for ev in runs[0]["evaluations"]):
                    cells.append(fmt([_value(r, site, site, "mean_auc") for r in runs]))
                else:
                    cells.append(fmt([run_value(r, site, "mean_auc") for r in runs]))
            cells.append(fmt([run_value(r, POOLED, "mean_auc") for r in runs]))
            lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The issue's targets per setting: federated ≥ 0.97 × pooled and ≥ local-only + 0.05 (pooled-test mean AUC)."""
    lines = ["| setting | method | mean AUC | pooled | ratio (≥ 0.97) | local-only | gain (≥ +0.05) | met |",
             "|---|---|---|---|---|---|---|---|"]
    out = []
    for setting in _settings(records):
        pooled = mean_sd([run_value(r, POOLED, "mean_auc") for r in _select(records, setting=setting, family="pooled", holdout=ALL)])[0]
        local = mean_sd([run_value(r, POOLED, "mean_auc") for r in _select(records, setting=setting, family="local", holdout=ALL)])[0]
        for method in _methods(records):
            runs = _select(records, setting=setting, method=method, holdout=ALL)
            if not runs or runs[0]["family"] in ("pooled", "local"):
                continue
            fed = mean_sd([run_value(r, POOLED, "mean_auc") for r in runs])[0]
            ratio = fed / pooled if math.isfinite(pooled) and pooled > 0 else float("nan")
            gain = fed - local if math.isfinite(local) else float("nan")
            met: bool | None = (ratio >= 0.97 and gain >= 0.05) if math.isfinite(ratio) and math.isfinite(gain) else None
            out.append({"setting": setting, "method": method, "fed": fed, "pooled": pooled, "ratio": ratio,
                        "local": local, "gain": gain, "met": met})
            verdict = "n/a (a baseline was not run)" if met is None else ("yes" if met else "no")
            lines.append(f"| {setting} | {method} | {fed:.3f} | {pooled:.3f} | {ratio:.3f} | {local:.3f} | {gain:+.3f} | "
                         f"{verdict} |")
    return "\n".join(lines), out


def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def _mean_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(len(CLASSIFICATION_TASKS)):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j]
        if len(np.unique(y)) == 2:
            aucs.append(roc_auc_score(y, probs[keep, j]))
    return float(np.mean(aucs)) if aucs else float("nan")


def paired_bootstrap_drop(with_site: dict[str, np.ndarray], without: dict[str, np.ndarray], site: str,
                          n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean AUC(with) − mean AUC(without) on `site`'s test cases, resampling cases
    (paired: both models score the same resampled cases)."""
    idx = np.flatnonzero(with_site["global__sites"] == site)
    idx_wo = np.flatnonzero(without["global__sites"] == site)
    if len(idx) < 2 or len(idx) != len(idx_wo):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    lab, p1, p2 = with_site["global__labels"][idx], with_site["global__probs"][idx], without["global__probs"][idx_wo]
    drops = []
    for _ in range(n_boot):
        b = rng.integers(0, len(idx), len(idx))
        d = _mean_auc(lab[b], p1[b]) - _mean_auc(lab[b], p2[b])
        if math.isfinite(d):
            drops.append(d)
    if len(drops) < n_boot // 2:
        return float("nan"), float("nan")
    return float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5))


def loso_table(records: list[dict[str, Any]], root: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Leave-one-site-out: each held-out site's test split scored by the model that never saw the site,
    against the all-sites model of the same seed; drop = all-sites − held-out. 95 % CI: t-interval over
    seeds when there are several, else a paired bootstrap over the site's test cases."""
    lines = ["| setting | method | held-out site | test cases | AUC, site in training | AUC, site unseen | drop | 95 % CI of drop |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for setting in _settings(records):
        for method in _methods(records):
            held = sorted({r["holdout"] for r in _select(records, setting=setting, method=method) if r["holdout"] != ALL})
            for site in held:
                with_site, without, drops, pairs = [], [], [], []
                for r in _select(records, setting=setting, method=method, holdout=site):
                    base = _select(records, setting=setting, method=method, holdout=ALL, seed=r["seed"])
                    out_auc = run_value(r, site, "mean_auc")
                    without.append(out_auc)
                    if base:
                        in_auc = run_value(base[0], site, "mean_auc")
                        with_site.append(in_auc)
                        drops.append(in_auc - out_auc)
                        pairs.append((base[0], r))
                m, s, n = mean_sd(drops)
                lo = hi = float("nan")
                if n > 1:
                    half = _t95(n) * s / math.sqrt(n)
                    lo, hi = m - half, m + half
                    how = "t, seeds"
                elif n == 1 and root is not None:
                    a, b = _predictions(root, pairs[0][0]), _predictions(root, pairs[0][1])
                    if a is not None and b is not None and "global__sites" in a and "global__sites" in b:
                        lo, hi = paired_bootstrap_drop(a, b, site, seed=int(pairs[0][1]["seed"]))
                    how = "paired bootstrap over cases"
                ci = f"[{lo:+.3f}, {hi:+.3f}] ({how})" if math.isfinite(lo) else "n/a"
                rows.append({"setting": setting, "method": method, "site": site, "drop": m, "lo": lo, "hi": hi,
                             "with": mean_sd(with_site)[0], "without": mean_sd(without)[0]})
                cases = _site_cases(pairs[0][1] if pairs else None, site)
                lines.append(f"| {setting} | {method} | {site} | {cases} | {fmt(with_site)} | {fmt(without)} | "
                             f"{m:+.3f} | {ci} |" if n else f"| {setting} | {method} | {site} | {cases} | – | {fmt(without)} | – | – |")
    return "\n".join(lines), rows


def _site_cases(rec: dict[str, Any] | None, site: str) -> str:
    """How many test cases a site's scores rest on (largest per-task count)."""
    if rec is None:
        return "–"
    m = rec["evaluations"][0]["metrics"].get(site) or {}
    counts = [int((m.get(t) or {}).get("n") or 0) for t in (*CLASSIFICATION_TASKS, "ki67")]
    return str(max(counts)) if counts else "–"


def label_table(partitions: dict[str, Any]) -> str:
    """Cases, positives and subtypes per site of each setting's partition."""
    blocks = []
    for setting, part in partitions.items():
        table = part.label_table()
        subtypes = sorted({k for row in table.values() for k in row} - {"cases", "er+", "pr+", "her2+"})
        cols = ["er+", "pr+", "her2+", *subtypes]
        lines = [f"| {setting}: site | cases | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for site, row in table.items():
            tag = " (external)" if site == part.external_site else ""
            lines.append(f"| {site}{tag} | {row['cases']} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- plots

def plot_labels(partitions: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(partitions), figsize=(4.2 * len(partitions), 3.4), squeeze=False)
    for ax, (setting, part) in zip(axes[0], partitions.items()):
        table = part.label_table()
        subtypes = sorted({k for row in table.values() for k in row if "/" in k or k == "unknown"})
        bottom = np.zeros(len(table))
        for st in subtypes:
            counts = np.array([row.get(st, 0) for row in table.values()], dtype=float)
            ax.bar(list(table), counts, bottom=bottom, label=st)
            bottom += counts
        ax.set_title(setting)
        ax.set_ylabel("cases")
        ax.tick_params(axis="x", rotation=45)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Molecular subtype per virtual site (phantom)", fontsize=10)
    save_png(fig, path, tight=True)


def _history_points(rec: dict[str, Any]) -> tuple[list[float], list[float]]:
    rows = rec["history"].get("global") or []
    xs, ys = [], []
    for row in rows:
        x = row.get("epoch_equiv", row.get("epoch"))
        y = row.get("val_mean_auc")
        if x is not None and y is not None:
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def plot_convergence(records: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = False
    for setting in _settings(records):
        for method in _methods(records):
            runs = [r for r in _select(records, setting=setting, method=method, holdout=ALL) if r["family"] != "local"]
            if not runs:
                continue
            xs, ys = _history_points(sorted(runs, key=lambda r: r["seed"])[0])
            if xs:
                label = method if len(_settings(records)) == 1 else f"{setting} {method}"
                ax.plot(xs, ys, marker="o", ms=3, label=label)
                drawn = True
    ax.set_xlabel("training epochs seen (federated: round × local epochs)")
    ax.set_ylabel("validation mean AUC")
    ax.set_title("Convergence (first seed; phantom)", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    save_png(fig, path, tight=True)
    return drawn


def _spent_epsilon(rec: dict[str, Any]) -> float | None:
    """ε the sites reported after the last round (example-weighted mean over sites), if they ran DP."""
    rows = rec["history"].get("global") or []
    value = rows[-1].get("epsilon") if rows else None
    return float(value) if value is not None else None


def sweep_table(records: list[dict[str, Any]]) -> str:
    """One row per setting and method: what the sweep changed, the privacy spent (DP runs) and the pooled-test figures."""
    lines = ["| setting | method | seeds | ε spent (sites' mean, last round) | mean AUC | Ki-67 MAE (pp) |",
             "|---|---|---|---|---|---|"]
    for setting in _settings(records):
        for method in _methods(records):
            runs = [r for r in _select(records, setting=setting, method=method, holdout=ALL) if r["family"] != "local"]
            if not runs:
                continue
            spent = [e for e in (_spent_epsilon(r) for r in runs) if e is not None]
            lines.append(f"| {setting} | {method} | {len(runs)} | {fmt(spent, 2) if spent else '— (no DP)'} | "
                         f"{fmt([run_value(r, POOLED, 'mean_auc') for r in runs])} | "
                         f"{fmt([run_value(r, POOLED, 'ki67_mae') for r in runs], 1)} |")
    return "\n".join(lines)


def plot_sweep(records: list[dict[str, Any]], path: Path) -> bool:
    """Pooled-test AUC and Ki-67 MAE against the swept setting (mean ± sd over seeds); False when nothing was swept."""
    settings = _settings(records)
    if len(settings) < 2:
        return False
    plt = pyplot()
    fig, (ax_auc, ax_mae) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(settings))
    methods = [m for m in _methods(records) if any(_select(records, method=m, holdout=ALL))]
    auc_lines = ([(m, "mean_auc") for m in methods] if len(methods) > 1
                 else [(methods[0], k) for k in ("mean_auc", "er_auc", "pr_auc", "her2_auc")])
    def line(ax: Any, method: str, metric: str, label: str) -> None:
        stats = [mean_sd([run_value(r, POOLED, metric) for r in _select(records, setting=st, method=method, holdout=ALL)])
                 for st in settings]
        ax.errorbar(x, [m for m, _, _ in stats], yerr=[sd if n > 1 else 0 for _, sd, n in stats],
                    marker="o", ms=4, capsize=3, label=label)

    for method, metric in auc_lines:
        line(ax_auc, method, metric, method if len(methods) > 1 else HEAD[metric])
    for method in methods:
        line(ax_mae, method, "ki67_mae", method)
    for ax, ylabel in ((ax_auc, "AUC on the pooled test split"), (ax_mae, "Ki-67 MAE (pp)")):
        ax.set_xticks(x)
        ax.set_xticklabels([st.replace("inf", "∞") for st in settings])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Against the swept setting (mean ± sd over seeds; phantom)", fontsize=10)
    save_png(fig, path, tight=True)
    return True


def plot_per_site(records: list[dict[str, Any]], sites: list[str], path: Path) -> None:
    plt = pyplot()
    settings = _settings(records)
    fig, axes = plt.subplots(1, len(settings), figsize=(max(6, 1.3 * len(sites) + 3) * len(settings), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        methods = [m for m in _methods(records) if _select(records, setting=setting, method=m, holdout=ALL)]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            runs = _select(records, setting=setting, method=method, holdout=ALL)
            local = runs[0]["family"] in ("local", "fedbn")
            stats = [mean_sd([_value(r, s, s, "mean_auc") if local else run_value(r, s, "mean_auc") for r in runs]) for s in sites]
            ax.bar(np.arange(len(sites)) + i * width, [m for m, _, _ in stats], width,
                   yerr=[sd if n > 1 else 0 for _, sd, n in stats], label=method, capsize=2)
        ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
        ax.set_xticklabels(sites, rotation=30)
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("mean AUC on the site's test split")
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Per-site AUC per method (phantom; local-only = each site's own model)", fontsize=10)
    save_png(fig, path, tight=True)


def _predictions(root: Path, rec: dict[str, Any]) -> dict[str, np.ndarray] | None:
    path = RunKey.of_record(rec).folder(root) / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _first_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    setting = _settings(records)[0]
    for method in _methods(records):
        runs = sorted(_select(records, setting=setting, method=method, holdout=ALL), key=lambda r: r["seed"])
        if runs and runs[0]["family"] != "local":
            out.append(runs[0])
    return out


def plot_roc(records: list[dict[str, Any]], root: Path, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for rec in _first_runs(records):
        preds = _predictions(root, rec)
        if preds is None:
            continue
        for j, (ax, task) in enumerate(zip(axes, CLASSIFICATION_TASKS)):
            points = roc_points(preds["global__labels"][:, j], preds["global__probs"][:, j])
            if points is None:
                continue
            ax.plot(*points, label=f"{rec['method']} (AUC {run_value(rec, POOLED, task + '_auc'):.2f})")
    for ax, task in zip(axes, CLASSIFICATION_TASKS):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task.upper()} — pooled test split", fontsize=10)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("ROC curves (first seed, all sites; phantom)", fontsize=10)
    save_png(fig, path, tight=True)


def plot_ki67(records: list[dict[str, Any]], root: Path, path: Path) -> None:
    plt = pyplot()
    runs = _first_runs(records)
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(3.4 * max(1, len(runs)), 3.4), squeeze=False)
    for ax, rec in zip(axes[0], runs):
        preds = _predictions(root, rec)
        if preds is None:
            continue
        y, p = preds["global__labels"][:, 3], preds["global__ki67"]
        keep = ~np.isnan(y)
        ax.scatter(y[keep], p[keep], s=8, alpha=0.6)
        ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls=":")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("true Ki-67 (%)")
        ax.set_ylabel("predicted Ki-67 (%)")
        ax.set_title(f"{rec['method']} (MAE {run_value(rec, POOLED, 'ki67_mae'):.1f})", fontsize=9)
    fig.suptitle("Ki-67 predicted vs true, pooled test split (first seed; phantom)", fontsize=10)
    save_png(fig, path, tight=True)


def plot_loso(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    methods = sorted({r["method"] for r in rows})
    sites = sorted({r["site"] for r in rows})
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        sel = {r["site"]: r for r in rows if r["method"] == method}
        vals = np.array([sel[s]["drop"] if s in sel else np.nan for s in sites])
        lo = np.array([sel[s]["lo"] if s in sel and math.isfinite(sel[s]["lo"]) else np.nan for s in sites])
        hi = np.array([sel[s]["hi"] if s in sel and math.isfinite(sel[s]["hi"]) else np.nan for s in sites])
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        ax.bar(np.arange(len(sites)) + i * width, vals, width, yerr=err, capsize=2, label=method)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
    ax.set_xticklabels(sites)
    ax.set_ylabel("mean-AUC drop when the site is unseen")
    ax.set_title("Leave-one-site-out drop with 95 % CI (phantom)", fontsize=10)
    ax.legend(fontsize=7)
    save_png(fig, path, tight=True)


# ---------------------------------------------------------------- the document

def write_report(scen: Scenario, records: list[dict[str, Any]], partitions: dict[str, Any], root: Path) -> Path:
    """Write report.md and its PNGs into `root`."""
    root = Path(root)
    sites = sorted({s for p in partitions.values() for s in p.sites})
    parts = [f"# Simulation report: `{scen.name}`", "", DISCLAIMER, "",
             f"{scen.description.strip()}" if scen.description else "",
             "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `fedsubtype-sim --scenario {scen.name}` · "
             f"config hash `{', '.join(sorted({r['config_hash'] for r in records})) or scen.config_hash()}` · seeds {scen.seeds} · partition `{scen.partition.kind}` · "
             f"budget {scen.federation.budget_epochs} epochs (federated: {scen.federation.rounds} rounds × "
             f"{scen.federation.local_epochs} local epoch(s)) for every method.", ""]
    if not records:
        parts.append("No finished runs yet.")
        atomic_write_text(root / "report.md", "\n".join(parts) + "\n")
        return root / "report.md"
    plot_labels(partitions, root / "labels_per_site.png")
    parts += ["## Virtual sites", "", label_table(partitions), "", "![labels per site](labels_per_site.png)", ""]
    parts += ["## Results on the pooled test split (trained on all internal sites)", "",
              "Mean ± sd over seeds. Local-only: the mean over the site models, each scored on the pooled test split.", "",
              main_table(records), ""]
    if plot_sweep(records, root / "sweep.png"):
        spent = any(_spent_epsilon(r) is not None for r in records)  # the table adds ε to the main table's figures
        parts += ["## Against the swept setting", "", *([sweep_table(records), ""] if spent else []),
                  "![sweep](sweep.png)", ""]
    target_md, _ = targets(records)
    if any(r["family"] == "pooled" for r in records):
        parts += ["## Targets", "", "Federated mean AUC against pooled (ratio ≥ 0.97) and against local-only (gain ≥ 0.05).",
                  "", target_md, ""]
    parts += ["## Per-site AUC", "", per_site_table(records, sites), "", "![per-site AUC](per_site_auc.png)", ""]
    plot_per_site(records, sites, root / "per_site_auc.png")
    if plot_convergence(records, root / "convergence.png"):
        parts += ["## Convergence", "", "Validation mean AUC per round (federated: the sites' aggregated validation metrics) "
                  "or per epoch (pooled).", "", "![convergence](convergence.png)", ""]
    plot_roc(records, root, root / "roc.png")
    plot_ki67(records, root, root / "ki67_scatter.png")
    parts += ["## ROC curves and Ki-67", "", "![ROC](roc.png)", "", "![Ki-67](ki67_scatter.png)", ""]
    loso_md, loso_rows = loso_table(records, root)
    if loso_rows:
        plot_loso(loso_rows, root / "loso_drop.png")
        parts += ["## Leave-one-site-out", "", "Each held-out site's test split scored by a model trained without the site, "
                  "against the model trained with it (same seed).", "", loso_md, "", "![LOSO](loso_drop.png)", ""]
    seen = defaultdict(list)
    for r in records:
        if r["holdout"] == ALL:
            counts = r["samples_seen"]
            seen[r["method"]].append(sum(counts.values()) if r["family"] == "local" else counts.get("global", 0))
    parts += ["## Compute budget", "", "Training samples seen per run (local-only: all site models together), "
              "trained on all internal sites.", "", "| method | samples seen (mean over seeds) |", "|---|---|"]
    parts += [f"| {m} | {np.mean(v):.0f} |" for m, v in seen.items()]
    parts += ["", "Files: `results.csv` (every metric of every run), `partition*.csv` (case_id, site, split), "
              "`runs/` (per-run records and predictions).", ""]
    atomic_write_text(root / "report.md", "\n".join(parts) + "\n")
    return root / "report.md"
