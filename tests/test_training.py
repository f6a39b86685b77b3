"""The one training function: reproducibility, early stopping, FedProx, missing labels, privacy hook, predictions."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fedsubtype.errors import ConfigError
from fedsubtype.model import ModelConfig, build_model
from fedsubtype.evaluate.predictions import Predictions, predict_dataset
from fedsubtype.evaluate.scoring import evaluate_dataset
from fedsubtype.evaluate.thresholds import choose_thresholds
from fedsubtype.train.config import TrainConfig
from fedsubtype.train.loop import fit
from fedsubtype.train.runtime import seed_everything

S = 16


class TensorCases(Dataset):
    """A small in-memory dataset with the CaseDataset item contract; ER shows as a brighter tumour core."""

    def __init__(self, n: int, seed: int, ki67: bool = True, site: str = "a") -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        zz, yy, xx = np.mgrid[:S, :S, :S] - (S - 1) / 2
        r = np.sqrt(zz**2 + yy**2 + xx**2)
        regions = np.select([r < 3, r < 4.5, r < 7], [1, 2, 3], 0).astype(np.int64)
        for i in range(n):
            er = float(i % 2)
            her2 = float(rng.random() < 0.4)
            k = float(rng.uniform(5, 60))
            img = rng.normal(0, 0.3, (S, S, S)).astype(np.float32)
            img[regions == 1] += 0.8 * er + 0.2
            img[regions == 3] += 0.5 * her2
            labels = np.array([er, er, her2, k if ki67 else 0.0], dtype=np.float32)
            present = np.array([True, i % 5 != 0, True, ki67])
            labels[~present] = 0.0
            self.items.append({"image": torch.from_numpy(img[None]), "regions": torch.from_numpy(regions),
                               "labels": torch.from_numpy(labels), "present": torch.from_numpy(present),
                               "case_id": f"{site}{i:03d}", "site": site})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])

    def label_matrix(self) -> np.ndarray:
        return np.stack([np.where(it["present"].numpy(), it["labels"].numpy(), np.nan) for it in self.items])


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16, blocks=(1, 1, 1),
                                   read_out="none"))  # the loop's mechanics, without a fitted start


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=3e-3, progress=False, patience=None, augment=False, threads=1,
                ema_decay=None)  # the raw weights: tests of the average ask for it
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data() -> tuple[TensorCases, TensorCases]:
    return TensorCases(16, seed=1), TensorCases(20, seed=2)  # 20: enough validation cases to select on


def _metrics(result) -> list[tuple]:
    return [(r.get("train_loss"), r.get("val_loss"), r.get("val_mean_auc")) for r in result.history]


def test_same_seed_same_numbers_and_different_seed_differs(data) -> None:
    train, val = data
    a = fit(_model(), train, val, _cfg(seed=3, augment=True))
    b = fit(_model(), train, val, _cfg(seed=3, augment=True))
    c = fit(_model(), train, val, _cfg(seed=4, augment=True))
    assert _metrics(a) == _metrics(b)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)
    assert _metrics(a) != _metrics(c)


def test_worker_processes_are_seeded_too(data) -> None:
    train, _ = data
    a = fit(_model(), train, None, _cfg(seed=5, augment=True, num_workers=1, epochs=1))
    b = fit(_model(), train, None, _cfg(seed=5, augment=True, num_workers=1, epochs=1))
    assert _metrics(a) == _metrics(b)


def test_history_csv_steps_and_samples(tmp_path: Path, data) -> None:
    train, val = data
    res = fit(_model(), train, val, _cfg(epochs=2), out_dir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics_per_epoch.csv", encoding="utf-8")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "val_mean_auc", "val_ki67_mae", "lr", "val_er_auc"):
        assert key in rows[0], key
    assert any(k.startswith("train_loss_") for k in rows[0])
    assert res.steps == 2 * math.ceil(16 / 4) and res.samples_seen == 32 and res.n_train == 16
    assert res.best_val is not None and res.best_epoch in (1, 2)
    assert (tmp_path / "best_weights.pt").is_file()


def test_max_steps_overrides_epochs(data) -> None:
    train, _ = data
    res = fit(_model(), train, None, _cfg(epochs=30, max_steps=3))
    assert res.steps == 3 and res.samples_seen == 12
    assert res.best_val is None and res.best_epoch == 1


def test_warmup_then_cosine_schedule(data) -> None:
    train, _ = data
    res = fit(_model(), train, None, _cfg(epochs=4, warmup_fraction=0.25, lr=1e-2))
    lrs = [r["lr"] for r in res.history]  # learning rate after each epoch's last step
    assert lrs[0] == pytest.approx(1e-2)  # warm-up (4 steps) ends exactly at the peak
    assert lrs[1] > lrs[2] > lrs[3] and lrs[3] == pytest.approx(0.0, abs=1e-9)


def test_constant_schedule_keeps_the_peak_rate(data) -> None:
    train, _ = data
    res = fit(_model(), train, None, _cfg(epochs=3, warmup_fraction=0.0, lr=1e-2, schedule="constant"))
    assert [r["lr"] for r in res.history] == [pytest.approx(1e-2)] * 3


def test_early_stopping_restores_best_weights(data) -> None:
    train, val = data
    # a learning rate of ~0 makes validation never improve after the first evaluation
    res = fit(_model(), train, val, _cfg(epochs=20, lr=1e-12, warmup_fraction=0.0, patience=2))
    assert len(res.history) == 3 and res.best_epoch == 1
    best = res.history[0]
    preds = predict_dataset(res.model, val, device="cpu")
    from fedsubtype.evaluate.metrics import compute_metrics

    again = compute_metrics(preds.labels, preds.probs, preds.ki67, n_boot=0, seed=0)
    assert again["mean_auc"] == pytest.approx(best["val_mean_auc"])


def _distance(model: torch.nn.Module, ref: list[torch.Tensor]) -> float:
    return float(sum(((p.detach() - g) ** 2).sum() for p, g in zip(model.parameters(), ref)).sqrt())


def test_fedprox_pulls_towards_global_weights(data) -> None:
    train, _ = data
    start = _model()
    global_params = [p.detach().clone() for p in start.parameters()]
    free = fit(_model(), train, None, _cfg(epochs=2, lr=1e-2))
    prox = fit(_model(), train, None, _cfg(epochs=2, lr=1e-2), proximal_mu=100.0, global_params=global_params)
    d_free, d_prox = _distance(free.model, global_params), _distance(prox.model, global_params)
    assert d_prox < 0.5 * d_free
    assert "proximal_term" in prox.history[-1]
    # mu = 0 is plain FedAvg local training: identical to no FedProx at all
    zero = fit(_model(), train, None, _cfg(epochs=2, lr=1e-2), proximal_mu=0.0, global_params=global_params)
    assert _distance(zero.model, global_params) == pytest.approx(d_free)


def test_weight_average_is_the_exponential_moving_average_of_the_steps(data) -> None:
    train, _ = data
    steady = dict(schedule="constant", warmup_fraction=0.0, lr=1e-2)
    w1 = fit(_model(), train, None, _cfg(max_steps=1, **steady)).model.state_dict()
    w2 = fit(_model(), train, None, _cfg(max_steps=2, **steady)).model.state_dict()
    ema = fit(_model(), train, None, _cfg(max_steps=2, ema_decay=0.9, **steady)).model.state_dict()
    assert list(ema) == list(w2)
    changed = 0
    for k in w2:  # the first step is copied, the second blended in with weight 1 - decay
        assert torch.allclose(ema[k], 0.9 * w1[k] + 0.1 * w2[k], atol=1e-6), k
        changed += not torch.allclose(w1[k], w2[k])
    assert changed > 0


def test_weight_average_is_what_is_validated_and_selected(data) -> None:
    train, val = data
    res = fit(_model(), train, val, _cfg(epochs=3, ema_decay=0.95))
    plain = fit(_model(), train, val, _cfg(epochs=3))
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in plain.history]  # same trajectory
    assert [r["val_loss"] for r in res.history] != [r["val_loss"] for r in plain.history]  # scored on the average
    preds = predict_dataset(res.model, val, device="cpu")
    from fedsubtype.evaluate.metrics import compute_metrics

    again = compute_metrics(preds.labels, preds.probs, preds.ki67, n_boot=0, seed=0)
    assert again["mean_auc"] == pytest.approx(res.best_val["val_mean_auc"])


def test_trains_without_any_ki67(data) -> None:
    train = TensorCases(12, seed=5, ki67=False)
    val = TensorCases(6, seed=6, ki67=False)
    res = fit(_model(), train, val, _cfg(epochs=2))
    assert all(np.isfinite(r["train_loss"]) for r in res.history)
    preds = predict_dataset(res.model, val, device="cpu")
    assert np.isnan(preds.labels[:, 3]).all() and np.isfinite(preds.ki67).all()
    metrics = evaluate_dataset(res.model, val, n_boot=0, seed=0, device="cpu")
    assert metrics["ki67"]["n"] == 0


def test_class_weighting_runs_and_changes_training(data) -> None:
    train, _ = data
    a = fit(_model(), train, None, _cfg(epochs=1))
    b = fit(_model(), train, None, _cfg(epochs=1, class_weighting=True))
    assert _metrics(a) != _metrics(b)


class CountingHook:
    """A privacy hook that records calls and passes everything through (the Opacus one lives in privacy/)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def make_private(self, model, optimizer, loader):
        self.calls.append("make_private")
        return model, optimizer, loader

    def after_step(self) -> None:
        self.calls.append("step")

    def finish(self, model):
        self.calls.append("finish")
        return model


def test_privacy_hook_protocol(data) -> None:
    train, _ = data
    hook = CountingHook()
    res = fit(_model(), train, None, _cfg(epochs=1), privacy=hook)
    assert hook.calls[0] == "make_private" and hook.calls[-1] == "finish"
    assert hook.calls.count("step") == res.steps == 4


class CappedHook(CountingHook):
    """Like a DP engine whose step cap (budget) ends the round early: the loader stops yielding."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.given = cap, 0

    def make_private(self, model, optimizer, loader):
        hook = self

        class Capped:
            dataset = loader.dataset

            def __len__(self) -> int:
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    if hook.given >= hook.cap:
                        return
                    hook.given += 1
                    yield batch

        return model, optimizer, Capped()


def test_a_capped_private_loader_ends_training(data) -> None:
    train, _ = data
    res = fit(_model(), train, None, _cfg(epochs=10), privacy=CappedHook(cap=6))
    assert res.steps == 6 and len(res.history) == 3  # 4 + 2 steps, then an empty epoch ends it


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fedprox_with_opacus_keeps_plain_state_dict(data) -> None:
    from opacus import PrivacyEngine

    class OpacusHook(CountingHook):
        def make_private(self, model, optimizer, loader):
            self.engine = PrivacyEngine(accountant="rdp")
            return self.engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)

        def finish(self, model):
            return model._module

    train, _ = data
    start = _model()
    names = list(start.state_dict())
    hook = OpacusHook()
    res = fit(start, train, None, _cfg(epochs=1, ema_decay=0.9), privacy=hook, proximal_mu=10.0)
    assert list(res.model.state_dict()) == names  # the weight average of a private run, too
    assert hook.engine.get_epsilon(1e-5) > 0


def test_predictions_csv_and_thresholds(tmp_path: Path, data) -> None:
    _, val = data
    preds = predict_dataset(_model(), val, device="cpu")
    assert preds.probs.shape == (20, 3) and preds.ki67.shape == (20,) and preds.labels.shape == (20, 4)
    assert ((preds.probs > 0) & (preds.probs < 1)).all() and ((preds.ki67 >= 0) & (preds.ki67 <= 100)).all()
    thr = choose_thresholds(preds, "youden")
    assert set(thr) == {"er", "pr", "her2"} and all(0 <= v["value"] <= 1 for v in thr.values())
    assert choose_thresholds(preds, "fixed")["er"] == {"value": 0.5, "method": "fixed"}
    preds.to_csv(tmp_path / "p.csv", {t: v["value"] for t, v in thr.items()})
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 20 and rows[0]["case_id"] == "a000"
    assert {"er_prob", "ki67_pred", "er_call", "ki67_true"} <= set(rows[0])


def test_thresholds_fall_back_for_one_class() -> None:
    p = Predictions(["x", "y"], ["s", "s"], np.array([[0.2, 0.3, 0.4], [0.6, 0.7, 0.8]]), np.array([10.0, 20.0]),
                    np.array([[1, np.nan, 0, np.nan], [1, np.nan, 1, np.nan]]))
    thr = choose_thresholds(p)
    assert thr["er"]["value"] == 0.5 and "one class" in thr["er"]["method"]
    assert thr["pr"]["value"] == 0.5 and thr["her2"]["method"] == "youden"


@pytest.mark.parametrize("key,value", [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("warmup_fraction", 1.0),
                                       ("patience", 0), ("device", "tpu"), ("task_weights", {"grade": 1.0}),
                                       ("ema_decay", 1.0), ("ema_decay", 0.0)])
def test_bad_config_is_one_line_error(key: str, value) -> None:
    from fedsubtype.configio import from_dict

    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {key: value}, where="training")
    assert f"training.{key}" in str(err.value) and "\n" not in str(err.value)


def test_learns_the_planted_signal(data) -> None:
    seed_everything(0)
    train, val = TensorCases(32, seed=11), TensorCases(20, seed=12)
    res = fit(_model(), train, val, _cfg(epochs=6, lr=1e-2, warmup_fraction=0.1))
    assert res.best_val is not None and res.best_val["val_er_auc"] >= 0.8


def test_statistics_heads_scaler_is_fitted_on_the_training_cases_once(data) -> None:
    from fedsubtype.model.region_stats import region_statistics
    from fedsubtype.model.regions_pool import region_masks

    train, val = data
    model = build_model(ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16, read_out="linear_heads"), seed=0)
    res = fit(model, train, val, _cfg(epochs=2, ema_decay=0.9))
    heads = res.model.statistics_heads
    image = torch.stack([it["image"] for it in train.items])
    regions = torch.stack([it["regions"] for it in train.items])
    stats = region_statistics(image, region_masks(regions, ("core", "rim", "peritumoral")))
    assert float(heads.fitted) == 1.0  # the selected (averaged) weights carry the fitted scaler
    torch.testing.assert_close(heads.center, stats.mean(0))
    assert float(heads.linear["her2"].weight.detach().abs().sum()) > 0  # the read-outs started from a fit
    twin = build_model(ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16, read_out="linear_heads"), seed=0)
    twin_state = fit(twin, train, val, _cfg(epochs=2, ema_decay=0.9)).model.state_dict()
    for name, value in res.model.state_dict().items():  # same config and seed, same weights
        torch.testing.assert_close(twin_state[name], value, rtol=0, atol=0)
    # a later round starts from those weights: the scaler travels with them and is not refitted on other cases
    again = fit(res.model, val, None, _cfg(epochs=1)).model.statistics_heads
    torch.testing.assert_close(again.center, stats.mean(0))
    private = build_model(ModelConfig(width=8, groups=4, feature_dim=16, hidden_dim=16, read_out="linear_heads"))
    fit(private, train, None, _cfg(epochs=1), privacy=CountingHook())  # DP-SGD would not cover a fit: none is made
    assert float(private.statistics_heads.fitted) == 0.0


def test_selection_follows_the_validation_loss_not_the_mean_auc() -> None:
    from fedsubtype.train.selection import is_better

    first = {"val_loss": 1.20, "val_mean_auc": 0.89}
    later = {"val_loss": 1.10, "val_mean_auc": 0.84}  # a few dozen cases: AUC jumps by chance, the loss moves smoothly
    assert is_better(later, first) and not is_better(first, later)
    assert is_better({"val_loss": None, "val_mean_auc": 0.7}, {"val_loss": None, "val_mean_auc": 0.6})
    assert not is_better({"val_loss": None, "val_mean_auc": 0.9}, first)


def test_a_validation_split_too_small_to_select_on_keeps_the_last_weights(data) -> None:
    from fedsubtype.train.selection import MIN_SELECTION_CASES

    train, _ = data
    small = TensorCases(MIN_SELECTION_CASES - 1, seed=2)
    said: list[str] = []
    res = fit(_model(), train, small, _cfg(epochs=3, patience=1), log=said.append)
    warnings = [line for line in said if line.startswith("warning: the validation split has")]
    assert len(warnings) == 1 and f"{MIN_SELECTION_CASES - 1} cases" in warnings[0] and "\n" not in warnings[0]
    assert len(res.history) == 3 and res.best_epoch == 3 and res.best_val is None  # no selection, no early stop
    assert all(r["val_loss"] is not None for r in res.history)  # validation still reports
