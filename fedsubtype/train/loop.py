"""The one training function: centralized training, every federated site round and the simulation call `fit`.

No Flower types here. Differential privacy plugs in through the small :class:`PrivacyHook` protocol,
FedProx through ``proximal_mu`` / ``global_params``.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import ConfigError

DEFAULT_TASK_WEIGHTS: dict[str, float] = {t: 1.0 for t in TASKS}


@dataclass
class TrainConfig:
    """How one training run (or one federated local round) is done; the `training:` section of a run config."""

    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int | None = 8
    augment: bool = True
    augment_strength: float = 1.0
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    ki67_loss: Literal["mse", "huber"] = "mse"
    class_weighting: bool = False
    progress: bool = True
    eval_every: int = 1
    ema_decay: float | None = None  # exponential moving average of the weights, per step (e.g. 0.995); None = off

    def validate(self, where: str = "training") -> None:
        """Reject impossible values with one line naming the key."""
        def bad(key: str, what: str, fix: str) -> ConfigError:
            return ConfigError(what, fix, where=f"{where}.{key}")

        if self.epochs < 1:
            raise bad("epochs", f"must be at least 1, got {self.epochs}", "set a positive number of epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be at least 1, got {self.max_steps}", "set a positive number or remove it")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be at least 1, got {self.batch_size}", "use e.g. 8")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"must be a positive number, got {self.lr}", "use e.g. 0.001")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}", "use e.g. 0.0001")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}", "use e.g. 0.05")
        if self.patience is not None and self.patience < 1:
            raise bad("patience", f"must be at least 1, got {self.patience}", "set a positive number or null to disable")
        if self.augment_strength < 0:
            raise bad("augment_strength", f"must be >= 0, got {self.augment_strength}", "use 1.0 for the default")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}", "use 0 to load in the main process")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", f"must be at least 1, got {self.threads}", "set a positive number or null")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise bad("device", f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        if self.eval_every < 1:
            raise bad("eval_every", f"must be at least 1, got {self.eval_every}", "use 1 to validate every epoch")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise bad("ema_decay", f"must be in (0, 1), got {self.ema_decay}", "use e.g. 0.995, or null to disable")
        unknown = [k for k in self.task_weights if k not in TASKS]
        if unknown:
            raise bad("task_weights", f"unknown task '{unknown[0]}'", f"use keys among {', '.join(TASKS)}")
        for k, w in self.task_weights.items():
            if w < 0 or not math.isfinite(w):
                raise bad(f"task_weights.{k}", f"must be a finite number >= 0, got {w}", "use e.g. 1.0")
        if not any(self.task_weights.get(t, 1.0) > 0 for t in TASKS):
            raise bad("task_weights", "every task weight is 0", "give at least one task a positive weight")


class PrivacyHook(Protocol):
    """What `fit` needs from a differential-privacy engine (fedsubtype.privacy provides one on Opacus).

    ``make_private`` is called once after the model, optimizer and loader are built and returns their
    private counterparts (with Poisson sampling the loader is replaced); ``after_step`` after every
    optimizer step (bookkeeping); ``finish`` at the end and returns the plain, unwrapped module whose
    ``state_dict`` keys match the original model's.
    """

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: DataLoader) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]: ...

    def after_step(self) -> None: ...

    def finish(self, model: nn.Module) -> nn.Module: ...


@dataclass
class TrainResult:
    """What `fit` returns. ``model`` holds the selected (best) weights."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val: dict[str, Any] | None
    n_train: int
    steps: int
    samples_seen: int


@dataclass
class Predictions:
    """Per-case outputs of a model on a dataset; labels NaN where missing, Ki-67 in percent."""

    case_ids: list[str]
    sites: list[str]
    probs: np.ndarray
    ki67: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.case_ids)

    def to_csv(self, path: str | Path, thresholds: dict[str, float] | None = None) -> None:
        """Write one row per case (atomic): probabilities, Ki-67 prediction, calls at `thresholds`, true labels."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = ["case_id", "site", *[f"{t}_prob" for t in CLASSIFICATION_TASKS], "ki67_pred"]
        if thresholds:
            head += [f"{t}_call" for t in CLASSIFICATION_TASKS]
        head += [f"{t}_true" for t in TASKS]
        w.writerow(head)
        for i, cid in enumerate(self.case_ids):
            row: list[Any] = [cid, self.sites[i], *[f"{p:.6f}" for p in self.probs[i]], f"{self.ki67[i]:.3f}"]
            if thresholds:
                row += [int(self.probs[i, j] >= thresholds.get(t, 0.5)) for j, t in enumerate(CLASSIFICATION_TASKS)]
            row += ["" if np.isnan(v) else (f"{v:g}") for v in self.labels[i]]
            w.writerow(row)
        atomic_write_text(path, buf.getvalue())


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, otherwise CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available", "use device: auto or cpu", where="training.device")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    base = torch.initial_seed() % (2**32)
    random.seed(base)
    np.random.seed(base)
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "augment", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=base)


class _Augmented(Dataset):
    """A view of a dataset whose items pass through an augmentation transform (for datasets without `augment`)."""

    def __init__(self, base: Dataset, augment: Callable[[dict], dict]) -> None:
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return self.augment(dict(self.base[i]))


def _with_augmentation(data: Dataset, cfg: TrainConfig) -> Dataset:
    """The training data with seeded MONAI augmentations (unless disabled); a transform the caller set is kept, reseeded."""
    existing = getattr(data, "augment", None)
    if existing is not None:  # the caller's own transform: reseed it so the run stays reproducible
        if hasattr(existing, "set_random_state"):
            existing.set_random_state(seed=cfg.seed)
        return data
    if not cfg.augment or cfg.augment_strength == 0:
        return data
    from fedsubtype.data.augment import build_augmentation

    transform = build_augmentation(cfg.seed, strength=cfg.augment_strength)
    if hasattr(data, "augment"):
        view = copy.copy(data)
        view.augment = transform  # type: ignore[attr-defined]
        return view
    return _Augmented(data, transform)


def _label_matrix(data: Dataset) -> np.ndarray:
    if hasattr(data, "label_matrix"):
        return np.asarray(data.label_matrix(), dtype=np.float64)  # type: ignore[attr-defined]
    rows = []
    for i in range(len(data)):  # type: ignore[arg-type]
        item = data[i]
        lab = np.asarray(item["labels"], dtype=np.float64)
        rows.append(np.where(np.asarray(item["present"]), lab, np.nan))
    return np.stack(rows) if rows else np.zeros((0, len(TASKS)))


def _build_loss(cfg: TrainConfig, train_labels: np.ndarray, per_case: bool = False) -> Callable:
    """The joint loss with the configured task weights and, optionally, the training split's class weights."""
    from fedsubtype.model.loss import JointLoss, pos_weight_from_labels

    weights = tuple(float(cfg.task_weights.get(t, 1.0)) for t in TASKS)
    pos_weight = pos_weight_from_labels(train_labels) if cfg.class_weighting else None
    return JointLoss(task_weights=weights, ki67_loss=cfg.ki67_loss, pos_weight=pos_weight, per_case=per_case)


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to 0 (or constant), evaluated per optimizer step."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def _optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    global_params: Sequence[torch.Tensor] | None, mu: float) -> None:
    """One optimizer step with the FedProx gradient mu·(w − w_global) added to the (possibly private) gradient.

    The proximal term does not touch data, so under DP it is added after Opacus clipped and noised the
    data gradient (its ``pre_step``), which costs no privacy and is not clipped away.
    """
    private = hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer")
    if private and not optimizer.pre_step():  # type: ignore[attr-defined]
        return
    if mu > 0 and global_params is not None:
        with torch.no_grad():
            for p, g in zip(params, global_params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p.detach() - g, alpha=mu)
    if private:
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
    else:
        optimizer.step()


def proximal_term(params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float) -> float:
    """(mu/2)·||w − w_global||², the FedProx penalty (reported in the history)."""
    with torch.no_grad():
        return float(0.5 * mu * sum(((p - g) ** 2).sum() for p, g in zip(params, global_params)))


def _to_device(batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(model inputs, labels, present) of a batch on `device`."""
    inputs = {"image": batch["image"].to(device, non_blocking=True),
              "regions": batch["regions"].to(device, non_blocking=True)}
    if "voxel_mm" in batch:
        inputs["voxel_mm"] = batch["voxel_mm"].to(device)
    return inputs, batch["labels"].to(device).float(), batch["present"].to(device).bool()


def _batch_len(batch: dict) -> int:
    image = batch.get("image")
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


class _LossMeter:
    """Epoch means of the loss and of each task's term, each task weighted by how many cases had its label."""

    def __init__(self) -> None:
        self.total = 0.0
        self.batches = 0
        self.task_sum = {t: 0.0 for t in TASKS}
        self.task_n = {t: 0 for t in TASKS}

    def add(self, loss: float, parts: dict[str, Any]) -> None:
        self.total += loss
        self.batches += 1
        for t in TASKS:
            n = int(parts.get(f"n_{t}", 0))
            if n:
                self.task_sum[t] += float(parts[t]) * n
                self.task_n[t] += n

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train_loss": self.total / self.batches if self.batches else None}
        for t in TASKS:
            out[f"train_loss_{t}"] = self.task_sum[t] / self.task_n[t] if self.task_n[t] else None
        return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _run_predictions(model: nn.Module, data: Dataset, batch_size: int, device: torch.device,
                     loss_fn: Callable | None = None) -> tuple[Predictions, float | None]:
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    ids: list[str] = []
    sites: list[str] = []
    probs, ki67, labels = [], [], []
    loss_sum, loss_n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            inputs, lab, present = _to_device(batch, device)
            out = model(**inputs)
            if loss_fn is not None:
                loss, _ = loss_fn(out, lab, present)
                loss_sum += float(loss) * lab.shape[0]
                loss_n += lab.shape[0]
            probs.append(torch.sigmoid(out["logits"]).float().cpu().numpy())
            ki67.append((out["ki67"].float().cpu().numpy().reshape(-1)) * 100.0)
            labels.append(np.where(present.cpu().numpy(), lab.cpu().numpy(), np.nan))
            ids += [str(c) for c in batch["case_id"]]
            sites += [str(s) for s in batch["site"]]
    model.train(was_training)
    preds = Predictions(
        case_ids=ids, sites=sites,
        probs=np.concatenate(probs).astype(np.float64) if probs else np.zeros((0, 3)),
        ki67=np.concatenate(ki67).astype(np.float64) if ki67 else np.zeros(0),
        labels=np.concatenate(labels).astype(np.float64) if labels else np.zeros((0, 4)),
    )
    return preds, (loss_sum / loss_n if loss_n else None)


def predict_dataset(model: nn.Module, data: Dataset, *, batch_size: int = 16, device: str = "auto") -> Predictions:
    """Run the model over a dataset in order (eval mode, no gradients); the model is moved to `device`."""
    dev = resolve_device(device)
    model.to(dev)
    preds, _ = _run_predictions(model, data, batch_size, dev)
    return preds


def evaluate_dataset(model: nn.Module, data: Dataset, n_boot: int = 1000, seed: int = 0, *,
                     thresholds: dict[str, float] | None = None, batch_size: int = 16,
                     device: str = "auto") -> dict[str, Any]:
    """Predict and score with :func:`fedsubtype.evaluate.metrics.compute_metrics` (DESIGN.md §3 keys)."""
    preds = predict_dataset(model, data, batch_size=batch_size, device=device)
    return score_predictions(preds, n_boot=n_boot, seed=seed, thresholds=thresholds)


def score_predictions(preds: Predictions, *, n_boot: int = 1000, seed: int = 0,
                      thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Metrics of existing predictions (DESIGN.md §3 keys)."""
    from fedsubtype.evaluate.metrics import compute_metrics

    cut = tuple(float((thresholds or {}).get(t, 0.5)) for t in CLASSIFICATION_TASKS)
    return compute_metrics(preds.labels, preds.probs, preds.ki67, n_boot=n_boot, seed=seed, thresholds=cut)


def fixed_thresholds(method: str = "fixed") -> dict[str, dict[str, Any]]:
    """0.5 for every classification task, recorded with `method` (the reason)."""
    return {t: {"value": 0.5, "method": method} for t in CLASSIFICATION_TASKS}


def choose_thresholds(preds: Predictions, method: str = "youden") -> dict[str, dict[str, Any]]:
    """Per-task decision thresholds: Youden's J on these (validation) predictions, or fixed 0.5.

    Falls back to 0.5 (and says so) for a task whose labels are missing or of one class only.
    """
    from sklearn.metrics import roc_curve

    if method != "youden":
        return fixed_thresholds()
    out: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(CLASSIFICATION_TASKS):
        y = preds.labels[:, j]
        keep = ~np.isnan(y)
        if keep.sum() == 0 or len(np.unique(y[keep])) < 2:
            out[task] = {"value": 0.5, "method": "fixed (validation labels of one class or missing)"}
            continue
        fpr, tpr, thr = roc_curve(y[keep], preds.probs[keep, j])
        finite = np.isfinite(thr)
        best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
        out[task] = {"value": float(np.clip(thr[best], 0.0, 1.0)), "method": "youden", "n": int(keep.sum())}
    return out


def _val_summary(metrics: dict[str, Any], loss: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"val_loss": loss}
    mean_auc = metrics.get("mean_auc")
    row["val_mean_auc"] = _finite_or_none(mean_auc)
    for t in CLASSIFICATION_TASKS:
        row[f"val_{t}_auc"] = _finite_or_none((metrics.get(t) or {}).get("auc"))
    row["val_ki67_mae"] = _finite_or_none((metrics.get("ki67") or {}).get("mae"))
    return row


def _finite_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _is_better(row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Higher validation mean AUC wins; when AUC is undefined, lower validation loss."""
    if best is None:
        return True
    auc, best_auc = row.get("val_mean_auc"), best.get("val_mean_auc")
    if auc is not None and best_auc is not None:
        return auc > best_auc
    if auc is not None and best_auc is None:
        return True
    if auc is None and best_auc is not None:
        return False
    loss, best_loss = row.get("val_loss"), best.get("val_loss")
    return loss is not None and (best_loss is None or loss < best_loss)


def write_history_csv(history: list[dict[str, Any]], path: str | Path) -> None:
    """Per-epoch metrics table (atomic); columns are the union of the rows' keys in first-seen order."""
    from fedsubtype.configio import write_rows_csv

    write_rows_csv(path, history)


class _Selector:
    """Model selection and early stopping: keeps the best weights seen at validation, counts stale validations."""

    def __init__(self, model: nn.Module, has_val: bool) -> None:
        self.model, self.has_val = model, has_val
        self.best_row: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self.stale = 0

    def observe(self, row: dict[str, Any], evaluated: bool) -> bool:
        """Record an epoch's row; True when it is the new best."""
        if not self.has_val:  # no validation: the latest weights are the result
            self.best_epoch = row["epoch"]
            return False
        if not evaluated:
            return False
        if _is_better(row, self.best_row):
            self.best_row, self.best_epoch, self.best_state, self.stale = dict(row), row["epoch"], _snapshot(self.model), 0
            return True
        self.stale += 1
        return False


@dataclass
class _Run:
    """The pieces one training run moves through its epochs."""

    model: nn.Module  # what is called: the plain module, or the privacy hook's wrapper around it
    loader: Any
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.Tensor]
    global_params: list[torch.Tensor] | None
    mu: float
    privacy: PrivacyHook | None
    device: torch.device
    total_steps: int
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of `plain`, when `ema_decay` is set
    plain: nn.Module | None = None
    steps: int = 0
    samples: int = 0


def _train_epoch(run: _Run, desc: str, progress: bool) -> _LossMeter:
    """One pass over the loader (or until the step budget is reached); returns the epoch's loss means."""
    from tqdm.auto import tqdm

    run.model.train()
    meter = _LossMeter()
    bar = tqdm(run.loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for batch in bar:
        if run.steps >= run.total_steps:
            break
        n = _batch_len(batch)
        if n == 0:  # Poisson sampling can draw an empty batch
            continue
        inputs, labels, present = _to_device(batch, run.device)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = run.loss_fn(run.model(**inputs), labels, present)
        loss.backward()
        _optimizer_step(run.optimizer, run.params, run.global_params, run.mu)
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.plain)
        if run.privacy is not None:
            run.privacy.after_step()
        run.steps += 1
        run.samples += n
        meter.add(float(loss.detach()), parts)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return meter


def _global_params(params: list[torch.Tensor], given: list[torch.Tensor] | None,
                   device: torch.device) -> list[torch.Tensor]:
    if given is None:
        return [p.detach().clone() for p in params]
    if len(given) != len(params):
        raise ValueError(f"global_params has {len(given)} tensors, the model {len(params)} trainable parameters")
    return [g.detach().to(device, dtype=p.dtype) for g, p in zip(given, params)]


def _build_run(model: nn.Module, train_data: Dataset, cfg: TrainConfig, proximal_mu: float,
               global_params: list[torch.Tensor] | None, privacy: PrivacyHook | None,
               device: torch.device) -> tuple[_Run, Dataset]:
    """Loss, seeded loader, AdamW, the privacy hook's wrapping, and the warm-up + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema = _averaged_copy(model, cfg.ema_decay) if cfg.ema_decay is not None else None  # before any DP wrapping
    anchor = _global_params(params, global_params, device) if proximal_mu > 0 else None
    loss_fn = _build_loss(cfg, _label_matrix(train_data), per_case=privacy is not None)  # DP: per-case mean
    train_view = _with_augmentation(train_data, cfg)
    loader: Any = DataLoader(train_view, batch_size=cfg.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.num_workers,
                             worker_init_fn=_worker_init, pin_memory=device.type == "cuda")
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    called: nn.Module = model
    if privacy is not None:
        called, optimizer, loader = privacy.make_private(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_fraction * total_steps))
    base_optimizer = getattr(optimizer, "original_optimizer", optimizer)  # Opacus wraps the optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, _lr_lambda(total_steps, warmup, cfg.schedule))
    run = _Run(called, loader, loss_fn, optimizer, scheduler, params, anchor, proximal_mu, privacy, device, total_steps,
               ema=ema, plain=model)
    return run, train_view


def _averaged_copy(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of `model`'s weights (parameters and buffers), updated after every step.

    Averaging the weights of the last few hundred steps smooths the epoch-to-epoch noise of a small
    dataset; on differentially private training it is post-processing and costs no privacy.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset | None, cfg: TrainConfig, *,
        proximal_mu: float = 0.0, global_params: list[torch.Tensor] | None = None,
        privacy: PrivacyHook | None = None, out_dir: Path | None = None,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` on `train_data` for `cfg.epochs` epochs (or `cfg.max_steps` steps) and keep the best weights.

    AdamW with a per-step cosine schedule after linear warm-up; seeded shuffling and augmentation;
    validation every `eval_every` epochs selects the best weights (val mean AUC, else val loss) and drives
    early stopping. Without `val_data` the final weights are kept. With `cfg.ema_decay` an exponential
    moving average of the weights is what is validated, selected and returned. FedProx: with
    ``proximal_mu > 0`` the gradient of (mu/2)·||w − w_global||² is added, ``global_params`` defaulting
    to the weights at entry (trainable parameters in ``model.parameters()`` order).
    """
    from tqdm.auto import tqdm

    cfg.validate("training")
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise ConfigError("the training set is empty", "check the split and the manifest", where="training")
    if proximal_mu < 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu}", "use 0 for FedAvg", where="training")
    say = log or (lambda msg: tqdm.write(msg) if cfg.progress else None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    plain = model.to(device)
    _fit_statistics_heads(plain, train_data, privacy, cfg.seed)
    run, train_view = _build_run(plain, train_data, cfg, proximal_mu, global_params, privacy, device)
    steps_per_epoch = max(1, len(run.loader))
    max_epochs = math.ceil(run.total_steps / steps_per_epoch) if cfg.max_steps is not None else cfg.epochs
    has_val = val_data is not None and len(val_data) > 0  # type: ignore[arg-type]
    scored = run.ema.module if run.ema is not None else plain  # what is validated, selected and returned
    selector = _Selector(scored, has_val)
    history: list[dict[str, Any]] = []
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        if hasattr(train_view, "set_epoch"):
            train_view.set_epoch(epoch)  # selects the epoch's augmentation stream, independent of workers
        meter = _train_epoch(run, f"epoch {epoch}/{max_epochs}", cfg.progress)
        capped = privacy is not None and meter.batches == 0  # the hook's loader ended the round (budget/step cap)
        last_epoch = epoch == max_epochs or run.steps >= run.total_steps or capped
        row: dict[str, Any] = {"epoch": epoch, "steps": run.steps, "samples_seen": run.samples,
                               "lr": float(run.scheduler.get_last_lr()[0]), **meter.row()}
        if run.global_params is not None:
            row["proximal_term"] = proximal_term(run.params, run.global_params, proximal_mu)
        evaluated = has_val and (epoch % cfg.eval_every == 0 or last_epoch)
        if evaluated:
            preds, vloss = _run_predictions(scored, val_data, max(cfg.batch_size, 16), device, run.loss_fn)  # type: ignore[arg-type]
            row.update(_val_summary(score_predictions(preds, n_boot=0, seed=cfg.seed), vloss))
        row["seconds"] = time.perf_counter() - t0
        row["best"] = selector.observe(row, evaluated)
        history.append(row)
        say(_epoch_line(row))
        if out_dir is not None:
            write_history_csv(history, Path(out_dir) / "metrics_per_epoch.csv")
            if row["best"]:
                _save_state(selector.best_state, Path(out_dir) / "best_weights.pt", epoch)
        if last_epoch:
            break
        if cfg.patience is not None and evaluated and selector.stale >= cfg.patience:
            say(f"early stopping after epoch {epoch}: no validation improvement for {selector.stale} evaluations "
                f"(best epoch {selector.best_epoch})")
            break

    final = privacy.finish(run.model) if privacy is not None else plain
    if selector.best_state is not None:
        final.load_state_dict(selector.best_state)
    elif run.ema is not None:
        final.load_state_dict(run.ema.module.state_dict())
    final.eval()
    return TrainResult(model=final, history=history, best_epoch=selector.best_epoch, best_val=selector.best_row,
                       n_train=len(train_data), steps=run.steps, samples_seen=run.samples)  # type: ignore[arg-type]


def _fit_statistics_heads(model: nn.Module, train_data: Dataset, privacy: PrivacyHook | None, seed: int) -> None:
    """Start the statistics read-outs from per-task linear models of the training cases, once (before any
    averaged copy is taken)."""
    from fedsubtype.model.region_stats import fit_statistics_heads, unfitted_statistics_heads

    if not unfitted_statistics_heads(model):
        return
    if privacy is not None:
        raise ConfigError("model.statistics_heads starts from linear models fitted on the site's cases, which "
                          "differential privacy does not cover", "turn model.statistics_heads off for private "
                          "training", where="model.statistics_heads")
    fit_statistics_heads(model, train_data, seed)


def _save_state(state: dict[str, torch.Tensor] | None, path: Path, epoch: int) -> None:
    if state is None:
        return
    from fedsubtype.configio import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"epoch": epoch, "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _epoch_line(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"steps {row['steps']}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    if row.get("val_loss") is not None:
        parts.append(f"val loss {row['val_loss']:.4f}")
    if row.get("val_mean_auc") is not None:
        parts.append(f"val mean AUC {row['val_mean_auc']:.3f}")
    if row.get("val_ki67_mae") is not None:
        parts.append(f"val Ki-67 MAE {row['val_ki67_mae']:.1f}")
    if row.get("best"):
        parts.append("(best)")
    return " | ".join(parts)
