"""ε as the site reports it agrees with an independent accountant (Google's dp-accounting) within 2 %.

Settings: the issue's reference point, and the phantom privacy scenario's (≈130 training cases per site,
batch 8 or 16, 6 rounds × 1 local epoch, σ for ε ≈ 8 / 3 / 1), plus a multi-round history with a change
of σ mid-run (how the ledger composes rounds).
"""

from __future__ import annotations

import pytest
from dp_accounting import dp_event, pld, rdp

from fedsubtype.privacy.accounting import epsilon_for, steps_per_epoch

PHANTOM_Q8, PHANTOM_Q16 = 8 / 130, 16 / 130
SETTINGS = [  # (history [(σ, q, steps)], δ)
    ([(1.1, PHANTOM_Q8, 400)], 1e-5),                                  # the issue's reference point
    ([(0.75, PHANTOM_Q16, 6 * steps_per_epoch(PHANTOM_Q16))], 1e-5),   # phantom, batch 16 (ε ≈ 11)
    ([(1.2, PHANTOM_Q8, 6 * steps_per_epoch(PHANTOM_Q8))], 1e-5),      # phantom, batch 8 (ε ≈ 3)
    ([(2.8, PHANTOM_Q8, 6 * steps_per_epoch(PHANTOM_Q8))], 1e-5),      # phantom, batch 8 (ε ≈ 1)
    ([(1.0, 0.5, 12)], 1e-3),                                          # tiny test site (16 cases, batch 8)
    ([(1.1, PHANTOM_Q8, 32), (1.1, PHANTOM_Q8, 32), (0.9, PHANTOM_Q8, 16)], 1e-5),  # several rounds, σ changed
]


def _event(history):
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), t)
        for s, q, t in history])


@pytest.mark.parametrize("history, delta", SETTINGS)
def test_prv_agrees_with_dp_accounting_pld(history, delta):
    ours = epsilon_for(history, delta, "prv")
    acc = pld.PLDAccountant()
    acc.compose(_event(history))
    theirs = acc.get_epsilon(delta)
    print(f"PRV {ours:.3f} vs dp-accounting PLD {theirs:.3f} ({100 * (ours - theirs) / theirs:+.2f} %) for {history}")
    assert ours == pytest.approx(theirs, rel=0.02)


@pytest.mark.parametrize("history, delta", SETTINGS)
def test_rdp_agrees_with_dp_accounting_rdp(history, delta):
    ours = epsilon_for(history, delta, "rdp")
    acc = rdp.RdpAccountant()
    acc.compose(_event(history))
    theirs = acc.get_epsilon(delta)
    print(f"RDP {ours:.3f} vs dp-accounting RDP {theirs:.3f} ({100 * (ours - theirs) / theirs:+.2f} %) for {history}")
    assert ours == pytest.approx(theirs, rel=0.02)


def test_issue_reference_point_and_prv_tighter_than_rdp():
    prv = epsilon_for([(1.1, PHANTOM_Q8, 400)], 1e-5, "prv")
    rdp_eps = epsilon_for([(1.1, PHANTOM_Q8, 400)], 1e-5, "rdp")
    assert prv == pytest.approx(7.06, abs=0.02)
    assert rdp_eps == pytest.approx(7.76, abs=0.02)
    assert prv < rdp_eps


def test_composing_rounds_is_cheaper_than_adding_per_round_epsilons():
    one = epsilon_for([(1.1, PHANTOM_Q8, 32)], 1e-5)
    five = epsilon_for([(1.1, PHANTOM_Q8, 5 * 32)], 1e-5)
    assert one < five < 5 * one
    assert epsilon_for([], 1e-5) == 0.0
