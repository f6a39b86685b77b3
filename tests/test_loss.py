"""Joint loss: hand-computed values, missing labels removing only their own term, class weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsubtype.model.loss import JointLoss, pos_weight_from_labels


def _bce(z: float, y: float, pw: float = 1.0) -> float:
    """Binary cross-entropy with logits written from its definition."""
    p = 1 / (1 + math.exp(-z))
    return -(pw * y * math.log(p) + (1 - y) * math.log(1 - p))


def _outputs(logits: list[list[float]], ki67: list[float]) -> dict:
    return {"logits": torch.tensor(logits, requires_grad=True), "ki67": torch.tensor(ki67, requires_grad=True)}


LOGITS = [[0.0, 2.0, -1.0], [1.5, -0.5, 0.3]]
KI67 = [0.25, 0.10]
LABELS = torch.tensor([[1.0, 0.0, 1.0, 30.0], [0.0, 1.0, 0.0, 10.0]])


def test_all_present_matches_hand_computation() -> None:
    out = _outputs(LOGITS, KI67)
    loss, log = JointLoss()(out, LABELS, torch.ones(2, 4, dtype=torch.bool))
    er = (_bce(0.0, 1) + _bce(1.5, 0)) / 2
    pr = (_bce(2.0, 0) + _bce(-0.5, 1)) / 2
    her2 = (_bce(-1.0, 1) + _bce(0.3, 0)) / 2
    ki = ((0.25 - 0.30) ** 2 + (0.10 - 0.10) ** 2) / 2
    assert loss.item() == pytest.approx(er + pr + her2 + ki, rel=1e-6)
    assert log["er"] == pytest.approx(er, rel=1e-6) and log["ki67"] == pytest.approx(ki, rel=1e-5)
    assert log["n_er"] == 2 and log["loss"] == pytest.approx(loss.item())


def test_missing_label_removes_only_that_term() -> None:
    present = torch.tensor([[True, False, True, False], [True, True, False, True]])
    labels = LABELS.clone()
    labels[0, 1] = float("nan")  # whatever sits in a missing slot must not matter
    labels[0, 3] = float("nan")
    weights = (1.0, 2.0, 0.5, 3.0)
    loss, log = JointLoss(task_weights=weights)(_outputs(LOGITS, KI67), labels, present)
    er = (_bce(0.0, 1) + _bce(1.5, 0)) / 2
    pr = _bce(-0.5, 1)  # only case 2
    her2 = _bce(-1.0, 1)  # only case 1
    ki = (0.10 - 0.10) ** 2
    assert loss.item() == pytest.approx(1.0 * er + 2.0 * pr + 0.5 * her2 + 3.0 * ki, rel=1e-6)
    assert (log["n_er"], log["n_pr"], log["n_her2"], log["n_ki67"]) == (2, 1, 1, 1)


def test_missing_cases_get_exactly_zero_gradient() -> None:
    out = _outputs(LOGITS, KI67)
    present = torch.tensor([[True, False, True, False], [False, True, False, True]])
    loss, _ = JointLoss()(out, LABELS, present)
    loss.backward()
    assert out["logits"].grad[0, 1] == 0 and out["logits"].grad[1, 0] == 0 and out["logits"].grad[1, 2] == 0
    assert out["ki67"].grad[0] == 0
    assert out["logits"].grad[0, 0] != 0 and out["ki67"].grad[1] == 0  # ki67 of case 2 is exact: zero error
    assert torch.isfinite(out["logits"].grad).all()


def test_all_missing_batch_is_zero_with_a_graph() -> None:
    out = _outputs(LOGITS, KI67)
    labels = torch.full((2, 4), float("nan"))
    loss, log = JointLoss(pos_weight=(2.0, 1.0, 3.0))(out, labels, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(out["logits"].grad, torch.zeros(2, 3))
    assert torch.equal(out["ki67"].grad, torch.zeros(2))
    assert log["n_ki67"] == 0 and log["ki67"] == 0.0


def test_huber_and_pos_weight() -> None:
    out = _outputs([[0.5, 0.0, 0.0]], [0.9])
    labels = torch.tensor([[1.0, 0.0, 0.0, 20.0]])
    present = torch.tensor([[True, False, False, True]])
    loss, _ = JointLoss(ki67_loss="huber", huber_delta=0.1, pos_weight=(3.0, 1.0, 1.0))(out, labels, present)
    err = 0.9 - 0.2
    huber = 0.1 * (err - 0.5 * 0.1)  # linear branch since |err| > delta
    assert loss.item() == pytest.approx(_bce(0.5, 1, pw=3.0) + huber, rel=1e-6)
    small, _ = JointLoss(ki67_loss="huber", huber_delta=0.1)(_outputs([[0.0] * 3], [0.25]), labels,
                                                             torch.tensor([[False, False, False, True]]))
    assert small.item() == pytest.approx(0.5 * 0.05 ** 2, rel=1e-5)  # quadratic branch


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="task_weights"):
        JointLoss(task_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="ki67_loss"):
        JointLoss(ki67_loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pos_weight"):
        JointLoss(pos_weight=(1.0, 0.0, 1.0))


def test_pos_weight_from_labels() -> None:
    labels = np.array([[1, 0, np.nan, 10], [1, 0, 1, np.nan], [0, 1, 1, 5], [1, np.nan, 1, 7]], dtype=float)
    assert pos_weight_from_labels(labels) == pytest.approx([1 / 3, 2.0, 1.0])
    assert pos_weight_from_labels(labels, max_weight=1.5) == pytest.approx([1 / 1.5, 1.5, 1.0])
    with pytest.raises(ValueError, match="labels"):
        pos_weight_from_labels(np.zeros(4))


def test_per_case_normalisation_for_dp_sgd() -> None:
    present = torch.tensor([[True, False, True, False], [True, True, False, True]])
    loss, _ = JointLoss(per_case=True)(_outputs(LOGITS, KI67), LABELS, present)
    case1 = _bce(0.0, 1) + _bce(-1.0, 1)
    case2 = _bce(1.5, 0) + _bce(-0.5, 1) + (0.10 - 0.10) ** 2
    assert loss.item() == pytest.approx((case1 + case2) / 2, rel=1e-6)
