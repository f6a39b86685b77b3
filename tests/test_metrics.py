"""Metrics: AUC and bootstrap CI against scikit-learn, DeLong against a brute-force implementation written
from DeLong et al. (1988), a null simulation, Ki-67 error, subtype rules, calibration, metrics.json shape."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from fedsubtype.evaluate.metrics import (SUBTYPES, SubtypeRules, auc_with_ci, brier, compute_metrics, delong_test, ece,
                                ki67_metrics, subtype_from_biomarkers, subtype_metrics)


def _scores(n: int, seed: int, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    return y, y * strength + rng.normal(size=n)


def test_auc_matches_sklearn_and_ci_contains_it() -> None:
    y, p = _scores(120, 0)
    res = auc_with_ci(y, p, n_boot=500, seed=1)
    assert res["auc"] == pytest.approx(roc_auc_score(y, p))
    lo, hi = res["auc_ci"]
    assert lo < res["auc"] < hi and hi - lo < 0.3
    assert res["n"] == 120 and res["n_pos"] == int(y.sum())
    assert auc_with_ci(y, p, n_boot=500, seed=1) == res  # seeded
    assert auc_with_ci(y, p, n_boot=500, seed=2)["auc_ci"] != res["auc_ci"]


def test_bootstrap_auc_replicates_match_sklearn() -> None:
    from fedsubtype.evaluate.metrics import _auc_rows
    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 5, (4, 7)).astype(float), rng.integers(0, 5, (4, 9)).astype(float)  # with ties
    for k in range(4):
        y = np.r_[np.ones(7), np.zeros(9)]
        assert _auc_rows(pos, neg)[k] == pytest.approx(roc_auc_score(y, np.r_[pos[k], neg[k]]))


def test_auc_missing_labels_and_single_class() -> None:
    y = np.array([1, 0, np.nan, 1, 0, np.nan])
    p = np.array([0.9, 0.1, 0.5, 0.8, 0.3, 0.2])
    res = auc_with_ci(y, p, n_boot=50)
    assert res["n"] == 4 and res["auc"] == 1.0
    one = auc_with_ci([1, 1, np.nan], [0.2, 0.3, 0.4])
    assert one == {"auc": None, "auc_ci": None, "n": 2, "n_pos": 2}


def _delong_bruteforce(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[float, float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988) directly: psi kernel, placement values V10/V01, S10/S01."""
    def psi(x: float, yv: float) -> float:
        return 1.0 if x > yv else 0.5 if x == yv else 0.0

    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for p in (p1, p2):
        x, yy = p[pos], p[neg]
        kern = np.array([[psi(a, b) for b in yy] for a in x])
        aucs.append(kern.mean())
        v10.append(kern.mean(1))
        v01.append(kern.mean(0))
    s10 = np.array([[np.sum((v10[i] - aucs[i]) * (v10[j] - aucs[j])) / (m - 1) for j in range(2)] for i in range(2)])
    s01 = np.array([[np.sum((v01[i] - aucs[i]) * (v01[j] - aucs[j])) / (n - 1) for j in range(2)] for i in range(2)])
    s = s10 / m + s01 / n
    z = (aucs[0] - aucs[1]) / math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return aucs[0], aucs[1], z


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_bruteforce_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60).astype(float)
    p1 = np.round(y + rng.normal(size=60), 1)  # rounding creates ties
    p2 = np.round(0.5 * y + rng.normal(size=60), 1)
    a1, a2, z = _delong_bruteforce(y, p1, p2)
    res = delong_test(y, p1, p2)
    assert res["auc1"] == pytest.approx(a1) and res["auc2"] == pytest.approx(a2)
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)


def test_delong_null_simulation_is_calibrated_and_has_power() -> None:
    rng = np.random.default_rng(42)
    null_p, alt_p = [], []
    for _ in range(300):
        y = rng.integers(0, 2, 80).astype(float)
        shared = rng.normal(size=80)  # correlated scores of equal quality
        p1 = y + shared + 0.7 * rng.normal(size=80)
        p2 = y + shared + 0.7 * rng.normal(size=80)
        null_p.append(delong_test(y, p1, p2)["p"])
        alt_p.append(delong_test(y, 2 * y + shared, p2)["p"])
    rate = np.mean(np.array(null_p) < 0.05)
    assert 0.02 <= rate <= 0.09, rate
    assert stats.kstest(null_p, "uniform").pvalue > 0.01
    assert np.mean(np.array(alt_p) < 0.05) > 0.8


def test_delong_edge_cases() -> None:
    y = np.array([0, 1, 0, 1, np.nan])
    p = np.array([0.1, 0.9, 0.2, 0.7, 0.5])
    same = delong_test(y, p, p * 2)  # identical ranking
    assert same["z"] == 0.0 and same["p"] == 1.0 and same["n"] == 4
    assert delong_test([1, 1], [0.1, 0.2], [0.3, 0.4])["p"] is None
    one_pos = delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.1, 0.9, 0.2])
    assert one_pos["auc1"] == 1.0 and one_pos["auc2"] == 0.0 and one_pos["p"] is None
    with pytest.raises(ValueError, match="differ in length"):
        delong_test([0, 1], [0.1, 0.2], [0.3])


def test_ki67_metrics() -> None:
    y = np.array([10.0, 20.0, np.nan, 40.0])
    pred = np.array([12.0, 15.0, 99.0, 41.0])
    res = ki67_metrics(y, pred, n_boot=200, seed=0)
    assert res["n"] == 3 and res["mae"] == pytest.approx((2 + 5 + 1) / 3)
    assert res["pearson_r"] == pytest.approx(np.corrcoef(y[[0, 1, 3]], pred[[0, 1, 3]])[0, 1])
    assert res["mae_ci"][0] <= res["mae"] <= res["mae_ci"][1]
    assert ki67_metrics([np.nan], [3.0]) == {"mae": None, "mae_ci": None, "pearson_r": None, "n": 0}
    assert ki67_metrics([5.0, 6.0], [7.0, 7.0])["pearson_r"] is None  # constant prediction


def test_brier_and_ece_by_hand() -> None:
    y = np.array([1, 0, 1, 0, np.nan])
    p = np.array([0.9, 0.2, 0.65, 0.05, 0.5])
    assert brier(y, p) == pytest.approx((0.01 + 0.04 + 0.1225 + 0.0025) / 4)
    # bins: 0.9 -> 9 (y 1), 0.2 -> 2 (y 0), 0.65 -> 6 (y 1), 0.05 -> 0 (y 0)
    assert ece(y, p) == pytest.approx((0.1 + 0.2 + 0.35 + 0.05) / 4)
    assert ece([1, 0], [1.0, 0.0]) == 0.0


@pytest.mark.parametrize("er,pr,her2,ki67,expected", [
    (1, 1, 0, 10, "Luminal A"),
    (1, 1, 0, 20, "Luminal B (HER2-)"),  # cut-off is inclusive
    (1, 0, 0, 5, "Luminal B (HER2-)"),  # PR-negative counts as PR < 20 %
    (0, 1, 0, 5, "Luminal A"),  # ER-/PR+ is hormone-receptor positive
    (1, 1, 1, 5, "Luminal B (HER2+)"),
    (1, np.nan, 1, np.nan, "Luminal B (HER2+)"),  # decidable without PR and Ki-67
    (0, 0, 1, 50, "HER2-enriched"),
    (0, 0, 0, 50, "Triple-negative"),
    (1, 1, 0, np.nan, None),  # Luminal A or B needs Ki-67
    (1, np.nan, 0, 30, "Luminal B (HER2-)"),
    (1, np.nan, 0, 10, None),
    (0, np.nan, 0, 10, None),
    (1, 1, np.nan, 10, None),
])
def test_st_gallen_rule_table(er: float, pr: float, her2: float, ki67: float, expected: str | None) -> None:
    assert subtype_from_biomarkers([er], [pr], [her2], [ki67]) == [expected]


def test_subtype_rules_are_configurable() -> None:
    assert subtype_from_biomarkers([1], [1], [0], [15], SubtypeRules(ki67_cutoff=14)) == ["Luminal B (HER2-)"]
    assert subtype_from_biomarkers([1], [0], [0], [5], SubtypeRules(pr_negative_is_low=False)) == ["Luminal A"]


def test_subtype_metrics() -> None:
    true = ["Luminal A", "Luminal A", "Triple-negative", None, "HER2-enriched"]
    pred = ["Luminal A", "Triple-negative", "Triple-negative", "Luminal A", None]
    res = subtype_metrics(true, pred)
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    # per class F1: Luminal A 2/3 (p 1, r 1/2), Triple-negative 2/3 (p 1/2, r 1)
    assert res["macro_f1"] == pytest.approx(2 / 3)
    # kappa: po 2/3, pe = (2/3 * 1/3) + (1/3 * 2/3) = 4/9
    assert res["kappa"] == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    m = np.array(res["confusion"]["matrix"])
    assert res["confusion"]["labels"] == list(SUBTYPES) and m.sum() == 3 and m[0, 0] == 1 and m[0, 4] == 1


def test_compute_metrics_keys_missing_labels_and_json() -> None:
    rng = np.random.default_rng(0)
    n = 60
    labels = np.column_stack([rng.integers(0, 2, (n, 3)), rng.uniform(0, 60, n)]).astype(float)
    labels[:20, 3] = np.nan  # a public cohort without Ki-67
    labels[::3, 1] = np.nan
    labels[:, 2] = np.where(np.arange(n) < 30, 1.0, np.nan)  # HER2: only positives known
    probs = np.clip(0.6 * labels[:, :3] + 0.4 * rng.uniform(size=(n, 3)), 0, 1)
    probs = np.where(np.isnan(probs), 0.5, probs)
    res = compute_metrics(labels, probs, rng.uniform(0, 60, n), n_boot=100, seed=0)
    assert {"er", "pr", "her2", "ki67", "mean_auc", "subtype"} <= set(res)
    assert {"auc", "auc_ci", "n", "brier", "ece"} <= set(res["er"])
    assert {"mae", "mae_ci", "pearson_r", "n"} <= set(res["ki67"])
    assert {"accuracy", "macro_f1", "kappa", "n", "confusion"} <= set(res["subtype"])
    assert res["er"]["n"] == 60 and res["pr"]["n"] == 40 and res["ki67"]["n"] == 40
    assert res["her2"]["auc"] is None and res["her2"]["n"] == 30
    assert res["er"]["auc"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    assert res["mean_auc"] == pytest.approx((res["er"]["auc"] + res["pr"]["auc"]) / 2)
    json.dumps(res, allow_nan=False)


def test_compute_metrics_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected labels"):
        compute_metrics(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros(3))
