"""DP-SGD with real Opacus through `fedsubtype.train.loop.fit` and through a site's SiteAlgo rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fedsubtype.errors import UserError
from fedsubtype.model import ModelConfig, build_model
from fedsubtype.privacy import PrivacyConfig
from fedsubtype.privacy.accounting import epsilon_for, make_plan
from fedsubtype.privacy.engine import OpacusPrivacy, check_model
from fedsubtype.train.config import TrainConfig
from fedsubtype.train.loop import fit

TINY = ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16)
SIZE = 16


class TinyCases(Dataset):
    """n seeded synthetic cases shaped like CaseDataset items (including the string fields)."""

    def __init__(self, n: int = 16) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        labels = torch.tensor([i % 2, (i // 2) % 2, (i // 4) % 2, 10.0 + 3 * i], dtype=torch.float32)
        return {"image": torch.randn(1, SIZE, SIZE, SIZE, generator=g),
                "regions": torch.randint(0, 4, (SIZE, SIZE, SIZE), generator=g),
                "labels": labels, "present": torch.ones(4, dtype=torch.bool), "case_id": f"case{i}", "site": "a"}


def _plan(n: int, **kw):
    cfg = PrivacyConfig(enabled=True, target_epsilon=kw.pop("eps", 8.0), accountant="rdp", **kw)
    return make_plan(cfg, n_train=n, batch_size=8, rounds=2, local_epochs=1)


def test_batchnorm_is_refused_with_the_layer_named():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU())
    with pytest.raises(UserError, match="BatchNorm") as info:
        check_model(model)
    assert "\n" not in str(info.value) and "GroupNorm" in str(info.value)
    check_model(build_model(TINY))  # the project's network is DP-compatible


def test_dp_fit_changes_weights_keeps_plain_names_and_spends_epsilon():
    torch.manual_seed(0)
    model = build_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(16)
    hook = OpacusPrivacy(plan, seed=3, server_round=1)
    cfg = TrainConfig(epochs=1, batch_size=8, augment=False, progress=False, device="cpu", patience=None)
    result = fit(model, TinyCases(16), None, cfg, privacy=hook)
    state = result.model.state_dict()
    assert list(state) == list(before)  # same keys, same order: no `_module.` prefixes
    assert not any("_module" in k for k in state)
    assert any(not torch.equal(before[k], state[k]) for k in before)
    assert hook.steps == plan.steps_per_round == 2
    eps = epsilon_for(hook.entries(), plan.delta, "rdp")
    assert eps > 0
    assert not hasattr(next(result.model.parameters()), "grad_sample")


def test_dp_round_respects_its_step_cap_and_counts_empty_draws():
    plan = _plan(16, noise_multiplier=1.0)
    hook = OpacusPrivacy(plan, seed=5, max_steps=1)
    cfg = TrainConfig(epochs=3, batch_size=8, augment=False, progress=False, device="cpu", patience=None)
    fit(build_model(TINY), TinyCases(16), None, cfg, privacy=hook)
    assert hook.steps == 1  # three epochs asked, the privacy plan allowed one step
    # an empty Poisson draw still releases a noisy step and is counted
    hook2 = OpacusPrivacy(plan, seed=5)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    private_model, dp_opt, _ = hook2.make_private(model, opt, torch.utils.data.DataLoader(TinyCases(16), batch_size=8))
    before = [p.detach().clone() for p in model.parameters()]
    hook2.noise_only_step()
    assert hook2.steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # noise moved the weights
    hook2.finish(private_model)


def test_dp_and_plain_sites_send_interchangeable_weights():
    from fedsubtype.federation.site_algo import get_weights

    cfg = TrainConfig(epochs=1, batch_size=8, augment=False, progress=False, device="cpu", patience=None)
    torch.manual_seed(0)
    dp = fit(build_model(TINY), TinyCases(16), None, cfg, privacy=OpacusPrivacy(_plan(16), seed=1)).model
    torch.manual_seed(0)
    plain = fit(build_model(TINY), TinyCases(16), None, cfg).model
    w_dp, w_plain = get_weights(dp), get_weights(plain)
    assert [w.shape for w in w_dp] == [w.shape for w in w_plain]
    assert list(dp.state_dict()) == list(plain.state_dict())
    average = [(a + b) / 2 for a, b in zip(w_dp, w_plain)]  # what FedAvg does
    assert all(np.isfinite(w).all() for w in average)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [3.5])
def test_site_rounds_spend_from_one_ledger_and_decline_past_the_budget(phantom_cohort, tmp_path, eps):
    """SiteAlgo with privacy on: ε grows over rounds in one ledger, survives a restart, the site declines at the end."""
    from fedsubtype.configio import to_dict
    from fedsubtype.federation.site_algo import SiteAlgo, get_weights
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.privacy.site import PrivacyBudgetExhausted
    from fedsubtype.federation.site_config import SiteConfig

    import csv

    with open(phantom_cohort, newline="", encoding="utf-8") as fh:
        site_name = sorted({row["site"] for row in csv.DictReader(fh)})[0]
    prep = PreprocessConfig(size=SIZE)
    privacy = PrivacyConfig(enabled=True, target_epsilon=eps, noise_multiplier=1.5, accountant="rdp")
    site = SiteConfig(name="dp-site", manifest=phantom_cohort, manifest_site=site_name, cache=tmp_path / "cache",
                      work_dir=tmp_path / "state", preprocess=prep, privacy=privacy, batch_size=4, device="cpu")
    round_config = {"local-epochs": 1, "batch-size": 4, "augment": False, "seed": 0, "run-id": "run-A",
                    "num-rounds": 3, "model-config": json.dumps(to_dict(TINY)),
                    "preprocess-config": json.dumps(to_dict(prep))}
    algo = SiteAlgo(site).initialize()
    weights = get_weights(build_model(TINY))
    spent = []
    declined_at = None
    for rnd in range(1, 30):
        try:
            weights, n, metrics = algo.train(weights, {**round_config, "server-round": rnd})
        except PrivacyBudgetExhausted as exc:
            declined_at = rnd
            assert exc.metrics["budget_exhausted"] == 1 and "budget exhausted" in exc.line()
            break
        spent.append(metrics["epsilon"])
        assert np.isnan(metrics["train-loss"])  # under DP the training loss is not sent
        assert len(weights) == len(get_weights(build_model(TINY)))
        if rnd == 1:  # a site restart mid-run keeps the ledger
            algo = SiteAlgo(site).initialize()
    assert declined_at is not None and len(spent) >= 2
    assert spent == sorted(spent) and spent[-1] <= eps
    ledger = json.loads((tmp_path / "state" / "privacy_ledger.json").read_text(encoding="utf-8"))
    assert [r["round"] for r in ledger["runs"]["run-A"]["rounds"]] == list(range(1, declined_at))


def test_identical_dp_runs_draw_different_noise_and_plain_runs_stay_seeded(tmp_path):
    """Same config, seed, run id and round at two sites: entropy-seeded DP noise differs; the simulation opt-in
    and training without DP give the same weights."""
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.privacy.site import SitePrivacy

    cfg = TrainConfig(epochs=1, batch_size=8, augment=False, progress=False, device="cpu", patience=None, seed=0)

    def weights(privacy=None) -> list[np.ndarray]:
        torch.manual_seed(0)
        return get_weights(fit(build_model(TINY), TinyCases(16), None, cfg, privacy=privacy).model)

    def hook(folder: str, **kw):
        pc = PrivacyConfig(enabled=True, target_epsilon=8.0, noise_multiplier=1.0, accountant="rdp", **kw)
        return SitePrivacy.start(pc, site="s", n_train=16, batch_size=8, rounds=2, run_id="same",
                                 state_dir=tmp_path / folder).hook(1)

    a, b = weights(hook("a")), weights(hook("b"))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    c, d = weights(hook("c", reproducible_noise=True)), weights(hook("d", reproducible_noise=True))
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    assert all(np.array_equal(x, y) for x, y in zip(weights(), weights()))


def test_dp_loss_gives_each_case_a_gradient_independent_of_other_cases_labels():
    """Per-sample clipping bounds a case's influence only if its gradient ignores which others have labels."""
    from fedsubtype.model.loss import JointLoss

    def case0_grad(loss_fn, present_other: bool):
        logits = torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.5, -1.0]], requires_grad=True)
        ki67 = torch.tensor([0.2, 0.4], requires_grad=True)
        labels = torch.tensor([[1.0, 0.0, 1.0, 30.0], [0.0, 1.0, 0.0, 10.0]])
        present = torch.tensor([[True] * 4, [present_other] * 4])
        loss, _ = loss_fn({"logits": logits, "ki67": ki67}, labels, present)
        loss.backward()
        return logits.grad[0].clone()

    dp_loss, default_loss = JointLoss(per_case=True), JointLoss()
    assert torch.allclose(case0_grad(dp_loss, True), case0_grad(dp_loss, False))
    assert not torch.allclose(case0_grad(default_loss, True), case0_grad(default_loss, False))
    out = {"logits": torch.zeros(2, 3), "ki67": torch.zeros(2)}
    labels, present = torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool)
    assert float(dp_loss(out, labels, present)[0]) == pytest.approx(float(default_loss(out, labels, present)[0]))


def test_every_poisson_draw_is_either_a_batch_or_a_noise_only_step():
    """Small q on a small site: empty draws (even the first) are noise-only steps, never dropped or crashing."""
    cfg = PrivacyConfig(enabled=True, target_epsilon=50.0, noise_multiplier=1.0, accountant="rdp")
    plan = make_plan(cfg, n_train=16, batch_size=1, rounds=1)  # q = 1/16: P(empty draw) ≈ 0.36
    assert plan.steps_per_round == 16
    empties_seen = 0
    for seed in range(4):
        hook = OpacusPrivacy(plan, seed=seed)
        model = build_model(TINY)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _, _, loader = hook.make_private(model, opt, torch.utils.data.DataLoader(TinyCases(16), batch_size=1))
        batches = list(loader)
        assert all(isinstance(b, dict) and b["image"].shape[0] > 0 and "case_id" not in b for b in batches)
        assert len(batches) + hook.steps == 16  # noise-only steps were taken for the empty draws
        empties_seen += hook.steps
    assert empties_seen > 0


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 1, 2), stride=(2, 1, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
    dict(kernel_size=1, stride=1, padding=0),
    dict(kernel_size=3, stride=1, padding=1, groups=3, out_channels=6),
])
def test_grouped_conv3d_grads_equal_per_case_autograd(kwargs):
    """fedsubtype's Conv3d grad sampler gives each case's own gradient (autograd, one case at a time),
    including strided, dilated, bias-free and grouped layers."""
    import torch
    from torch import nn

    from fedsubtype.privacy.conv_grad import conv3d_per_case_grads

    torch.manual_seed(0)
    layer = nn.Conv3d(3, kwargs.pop("out_channels", 4), **kwargs).double()
    x = torch.randn(5, 3, 7, 8, 9, dtype=torch.double)
    out = layer(x)
    target = torch.randn_like(out)
    backprops = target  # d(sum(out * target))/d(out)
    got = conv3d_per_case_grads(layer, x, backprops)
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i:i + 1]) * target[i:i + 1]).sum().backward()
        assert torch.allclose(got[layer.weight][i], layer.weight.grad, atol=1e-10)
        if layer.bias is not None:
            assert torch.allclose(got[layer.bias][i], layer.bias.grad, atol=1e-10)
    assert set(got) == {layer.weight} | ({layer.bias} if layer.bias is not None else set())


def test_the_dp_engine_uses_fedsubtypes_conv3d_sampler():
    import torch
    from opacus.grad_sample.grad_sample_module import GradSampleModule
    from torch import nn

    from fedsubtype.privacy.conv_grad import register

    register(native=False)
    stock = GradSampleModule.GRAD_SAMPLERS[nn.Conv3d]
    model = build_model(TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    OpacusPrivacy(_plan(16), seed=0).make_private(model, opt, torch.utils.data.DataLoader(TinyCases(16), batch_size=8))
    sampler = GradSampleModule.GRAD_SAMPLERS[nn.Conv3d]
    assert sampler is not stock and sampler.__module__ == "fedsubtype.privacy.conv_grad"
