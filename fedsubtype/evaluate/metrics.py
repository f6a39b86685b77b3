"""Honest evaluation: per-task AUC with stratified bootstrap CIs, DeLong's test, Ki-67 error,
St Gallen surrogate subtypes, and calibration. Every result is JSON-ready (floats, lists, None).

Missing labels (NaN) are dropped per task, and every block says on how many cases (`n`) it was
computed; a task without both classes gets `auc: None` rather than an error.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from fedsubtype import CLASSIFICATION_TASKS

SUBTYPES: tuple[str, ...] = ("Luminal A", "Luminal B (HER2-)", "Luminal B (HER2+)", "HER2-enriched",
                             "Triple-negative")
"""St Gallen surrogate molecular subtypes, in the order of confusion matrices."""


def _float(x: float | np.floating | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


def finite_or_none(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None (missing, NaN, infinite or not a number)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _binary(y: np.ndarray, p: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{where}: labels ({y.size}) and predictions ({p.size}) differ in length")
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if np.isnan(p).any():
        raise ValueError(f"{where}: predictions contain NaN for cases with a label")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{where}: labels must be 0, 1 or NaN")
    return y.astype(int), p


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row of `pos` [k,m] against the same row of `neg` [k,n] (ties count 1/2)."""
    m = pos.shape[1]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :m].sum(1) - m * (m + 1) / 2) / (m * neg.shape[1])


def auc_with_ci(y: Sequence[float], p: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
    """ROC AUC with a stratified bootstrap percentile CI (positives and negatives resampled separately,
    so every replicate keeps the case mix). NaN labels are dropped. `auc` is None with < 2 classes."""
    y, p = _binary(y, p, "auc")
    out = {"auc": None, "auc_ci": None, "n": int(y.size), "n_pos": int(y.sum())}
    if y.size == 0 or y.min() == y.max():
        return out
    out["auc"] = float(roc_auc_score(y, p))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        pos, neg = p[y == 1], p[y == 0]
        boots = []
        for start in range(0, n_boot, 200):
            k = min(200, n_boot - start)
            boots.append(_auc_rows(rng.choice(pos, (k, pos.size)), rng.choice(neg, (k, neg.size))))
        alpha = (1 - level) / 2
        lo, hi = np.quantile(np.concatenate(boots), [alpha, 1 - alpha])
        out["auc_ci"] = [float(lo), float(hi)]
    return out


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs [k] and placement values V10 [k,m], V01 [k,n] via midranks."""
    m, n = pos.shape[1], neg.shape[1]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_test(y: Sequence[float], p1: Sequence[float], p2: Sequence[float]) -> dict:
    """DeLong et al. (1988) test of two correlated AUCs on the same cases (two-sided).

    Returns auc1, auc2, z and p for auc1 - auc2 (all None with < 2 classes; z = 0 and p = 1 when the
    difference has zero variance, e.g. identical rankings; z and p None with < 2 cases of a class).
    NaN labels drop the case from both."""
    y_arr = np.asarray(y, dtype=float).ravel()
    p2_arr = np.asarray(p2, dtype=float).ravel()
    if p2_arr.shape != y_arr.shape:
        raise ValueError(f"delong: labels ({y_arr.size}) and second predictions ({p2_arr.size}) differ in length")
    yy, a = _binary(y_arr, p1, "delong")
    b = p2_arr[~np.isnan(y_arr)]
    out = {"auc1": None, "auc2": None, "z": None, "p": None, "n": int(yy.size)}
    if yy.size == 0 or yy.min() == yy.max():
        return out
    scores = np.stack([a, b])
    aucs, v10, v01 = _structural_components(scores[:, yy == 1], scores[:, yy == 0])
    out.update(auc1=float(aucs[0]), auc2=float(aucs[1]))
    if min(v10.shape[1], v01.shape[1]) < 2:  # a variance needs two cases of each class
        return out
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 1e-15:
        z, pval = 0.0, 1.0
    else:
        z = diff / np.sqrt(var)
        pval = 2 * stats.norm.sf(abs(z))
    out.update(z=float(z), p=float(pval))
    return out


def ki67_metrics(y: Sequence[float], pred: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Ki-67 mean absolute error in percentage points (bootstrap percentile CI) and Pearson r.
    Cases with a missing (NaN) label are dropped; r is None when fewer than 2 cases or a constant."""
    y, p = np.asarray(y, dtype=float).ravel(), np.asarray(pred, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"ki67: labels ({y.size}) and predictions ({p.size}) differ in length")
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    out = {"mae": None, "mae_ci": None, "pearson_r": None, "n": int(y.size)}
    if y.size == 0:
        return out
    err = np.abs(y - p)
    out["mae"] = float(err.mean())
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        means = err[rng.integers(0, err.size, (n_boot, err.size))].mean(1)
        alpha = (1 - level) / 2
        out["mae_ci"] = [float(v) for v in np.quantile(means, [alpha, 1 - alpha])]
    if y.size >= 2 and np.ptp(y) > 0 and np.ptp(p) > 0:
        out["pearson_r"] = float(stats.pearsonr(y, p)[0])
    return out


def brier(y: Sequence[float], p: Sequence[float]) -> float | None:
    """Brier score: mean squared difference between probability and outcome (NaN labels dropped)."""
    y, p = _binary(y, p, "brier")
    return float(np.mean((p - y) ** 2)) if y.size else None


def ece(y: Sequence[float], p: Sequence[float], n_bins: int = 10) -> float | None:
    """Expected calibration error: |mean probability - positive rate| over equal-width probability bins,
    weighted by the fraction of cases in each bin (NaN labels dropped)."""
    y, p = _binary(y, p, "ece")
    if not y.size:
        return None
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        sel = bins == b
        total += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(total)


def sensitivity_specificity(y: Sequence[float], p: Sequence[float], threshold: float = 0.5) -> dict:
    """Sensitivity and specificity of `p >= threshold` (None where a class is absent)."""
    y, p = _binary(y, p, "threshold")
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    return {"threshold": float(threshold),
            "sensitivity": float(pred[pos].mean()) if pos.any() else None,
            "specificity": float((~pred[neg]).mean()) if neg.any() else None}


@dataclass
class SubtypeRules:
    """St Gallen 2013 surrogate definitions (Goldhirsch et al.) with configurable cut-offs.

    HR+ = ER+ or PR+. HR+/HER2-: Luminal A when Ki-67 < `ki67_cutoff` and PR is high, otherwise
    Luminal B (HER2-). PR is binary here, so with `pr_negative_is_low` a PR-negative case counts as
    "PR < 20 %" (Luminal B) and a PR-positive case as "PR >= 20 %"; PR 1-19 % cannot be seen.
    """

    ki67_cutoff: float = 20.0
    """Ki-67 (percent) at or above which a HR+/HER2- tumour is Luminal B."""
    pr_negative_is_low: bool = True
    """Treat a PR-negative HR+/HER2- tumour as Luminal B whatever its Ki-67."""


def _known(v: float) -> bool:
    return not np.isnan(v)


def _one_subtype(er: float, pr: float, her2: float, ki67: float, rules: SubtypeRules) -> str | None:
    if er == 1 or pr == 1:
        hr = True
    elif er == 0 and pr == 0:
        hr = False
    else:
        return None
    if not _known(her2):
        return None
    if not hr:
        return "HER2-enriched" if her2 == 1 else "Triple-negative"
    if her2 == 1:
        return "Luminal B (HER2+)"
    if pr == 0 and rules.pr_negative_is_low:
        return "Luminal B (HER2-)"
    if _known(ki67) and ki67 >= rules.ki67_cutoff:
        return "Luminal B (HER2-)"
    if _known(ki67) and (pr == 1 or not rules.pr_negative_is_low):
        return "Luminal A"
    return None


def subtype_from_biomarkers(er: Sequence[float], pr: Sequence[float], her2: Sequence[float],
                            ki67: Sequence[float], rules: SubtypeRules = SubtypeRules()) -> list[str | None]:
    """Surrogate subtype per case from binary ER/PR/HER2 (NaN missing) and Ki-67 in percent (NaN missing);
    None where the available markers cannot decide it (e.g. HR+/HER2-/PR+ without Ki-67)."""
    cols = [np.asarray(c, dtype=float).ravel() for c in (er, pr, her2, ki67)]
    if len({c.size for c in cols}) != 1:
        raise ValueError("subtype: er, pr, her2 and ki67 must have the same length")
    return [_one_subtype(*vals, rules) for vals in zip(*cols)]


def subtype_metrics(true: Sequence[str | None], pred: Sequence[str | None]) -> dict:
    """Accuracy, macro-F1 (over subtypes present in truth or prediction), Cohen's kappa and the
    confusion matrix (rows truth, columns prediction, order SUBTYPES) on cases where both are known."""
    if len(true) != len(pred):
        raise ValueError("subtype: truth and prediction differ in length")
    pairs = [(t, p) for t, p in zip(true, pred) if t is not None and p is not None]
    out = {"accuracy": None, "macro_f1": None, "kappa": None, "n": len(pairs),
           "confusion": {"labels": list(SUBTYPES), "matrix": [[0] * len(SUBTYPES) for _ in SUBTYPES]}}
    if not pairs:
        return out
    t, p = zip(*pairs)
    present = [s for s in SUBTYPES if s in t or s in p]
    out["accuracy"] = float(np.mean([a == b for a, b in pairs]))
    out["macro_f1"] = float(f1_score(t, p, labels=present, average="macro", zero_division=0))
    if len(present) > 1:
        out["kappa"] = _float(cohen_kappa_score(t, p, labels=present))
    out["confusion"]["matrix"] = confusion_matrix(t, p, labels=list(SUBTYPES)).tolist()
    return out


def compute_metrics(labels: np.ndarray, probs: np.ndarray, ki67_pred: np.ndarray, *, n_boot: int = 1000,
                    seed: int = 0, thresholds: Sequence[float] = (0.5, 0.5, 0.5),
                    rules: SubtypeRules = SubtypeRules()) -> dict:
    """The metrics.json block: labels (N,4) er/pr/her2/ki67 with NaN missing, probs (N,3), ki67_pred (N,)
    in percent. Keys: er, pr, her2 (auc, auc_ci, n, n_pos, brier, ece, sensitivity, specificity),
    ki67 (mae, mae_ci, pearson_r, n), mean_auc (mean of the available AUCs) and subtype."""
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    ki67_pred = np.asarray(ki67_pred, dtype=float).ravel()
    n = labels.shape[0] if labels.ndim == 2 else -1
    if labels.ndim != 2 or labels.shape[1] != 4 or probs.shape != (n, 3) or ki67_pred.shape != (n,):
        raise ValueError(f"compute_metrics: expected labels (N,4), probs (N,3), ki67_pred (N,); got "
                         f"{labels.shape}, {probs.shape}, {ki67_pred.shape}")
    if len(thresholds) != 3:
        raise ValueError(f"compute_metrics: thresholds must be 3 numbers (er, pr, her2), got {list(thresholds)}")
    out: dict = {}
    for j, task in enumerate(CLASSIFICATION_TASKS):
        y, p = labels[:, j], probs[:, j]
        block = auc_with_ci(y, p, n_boot=n_boot, seed=seed + j)
        block["brier"] = brier(y, p)
        block["ece"] = ece(y, p)
        ss = sensitivity_specificity(y, p, thresholds[j])
        block.update(sensitivity=ss["sensitivity"], specificity=ss["specificity"], threshold=ss["threshold"])
        out[task] = block
    out["ki67"] = ki67_metrics(labels[:, 3], ki67_pred, n_boot=n_boot, seed=seed + 3)
    aucs = [out[t]["auc"] for t in CLASSIFICATION_TASKS if out[t]["auc"] is not None]
    out["mean_auc"] = float(np.mean(aucs)) if aucs else None
    binary = (probs >= np.asarray(thresholds, dtype=float)).astype(float)
    truth = subtype_from_biomarkers(labels[:, 0], labels[:, 1], labels[:, 2], labels[:, 3], rules)
    guess = subtype_from_biomarkers(binary[:, 0], binary[:, 1], binary[:, 2], ki67_pred, rules)
    out["subtype"] = subtype_metrics(truth, guess)
    out["subtype"]["rules"] = {"ki67_cutoff": float(rules.ki67_cutoff), "pr_negative_is_low": rules.pr_negative_is_low}
    return out
