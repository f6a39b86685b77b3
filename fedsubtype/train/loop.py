"""The one training function: centralized training, every federated site round and the simulation call `fit`.

No Flower types here. Differential privacy plugs in through the small :class:`PrivacyHook` protocol,
FedProx through ``proximal_mu`` / ``global_params``, model-specific preparation through the model's own
``prepare_for_training`` method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedsubtype.errors import ConfigError
from fedsubtype.evaluate.predictions import run_predictions
from fedsubtype.evaluate.scoring import score_predictions
from fedsubtype.train.config import TrainConfig
from fedsubtype.train.feed import label_matrix, with_augmentation, worker_init
from fedsubtype.train.history import LossMeter, epoch_line, write_history_csv
from fedsubtype.train.optimization import (anchor_params, averaged_copy, build_loss, lr_lambda, optimizer_step,
                                           proximal_term)
from fedsubtype.train.runtime import batch_len, batch_to_device, resolve_device, seed_everything
from fedsubtype.train.selection import (MIN_SELECTION_CASES, Selector, save_state, snapshot, too_few_to_select,
                                        val_summary)


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


def _train_epoch(run: _Run, desc: str, progress: bool) -> LossMeter:
    """One pass over the loader (or until the step budget is reached); returns the epoch's loss means."""
    from tqdm.auto import tqdm

    run.model.train()
    meter = LossMeter()
    bar = tqdm(run.loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for batch in bar:
        if run.steps >= run.total_steps:
            break
        n = batch_len(batch)
        if n == 0:  # Poisson sampling can draw an empty batch
            continue
        inputs, labels, present = batch_to_device(batch, run.device)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = run.loss_fn(run.model(**inputs), labels, present)
        loss.backward()
        optimizer_step(run.optimizer, run.params, run.global_params, run.mu)
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


def _build_run(model: nn.Module, train_data: Dataset, cfg: TrainConfig, proximal_mu: float,
               global_params: list[torch.Tensor] | None, privacy: PrivacyHook | None,
               device: torch.device) -> tuple[_Run, Dataset]:
    """Loss, seeded loader, AdamW, the privacy hook's wrapping, and the warm-up + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema = averaged_copy(model, cfg.ema_decay) if cfg.ema_decay is not None else None  # before any DP wrapping
    anchor = anchor_params(params, global_params, device) if proximal_mu > 0 else None
    loss_fn = build_loss(cfg, label_matrix(train_data), per_case=privacy is not None)  # DP: per-case mean
    train_view = with_augmentation(train_data, cfg)
    loader: Any = DataLoader(train_view, batch_size=cfg.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.num_workers,
                             worker_init_fn=worker_init, pin_memory=device.type == "cuda")
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    called: nn.Module = model
    if privacy is not None:
        called, optimizer, loader = privacy.make_private(model, optimizer, loader)
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_fraction * total_steps))
    base_optimizer = getattr(optimizer, "original_optimizer", optimizer)  # Opacus wraps the optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(total_steps, warmup, cfg.schedule))
    run = _Run(called, loader, loss_fn, optimizer, scheduler, params, anchor, proximal_mu, privacy, device, total_steps,
               ema=ema, plain=model)
    return run, train_view


@dataclass
class _Epochs:
    """What the epoch loop needs besides the run: the schedule, the validation data and the selection."""

    cfg: TrainConfig
    train_view: Dataset
    val_data: Dataset | None
    has_val: bool
    max_epochs: int
    scored: nn.Module  # what is validated, selected and returned: the plain model or its moving average
    selector: Selector
    out_dir: Path | None
    say: Callable[[str], None]


def _start(cfg: TrainConfig, train_data: Dataset, proximal_mu: float,
           log: Callable[[str], None] | None) -> tuple[Callable[[str], None], torch.device]:
    """Check the inputs, set the thread count, resolve the device and seed every generator; returns (say, device)."""
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
    return say, device


def _prepare_model(model: nn.Module, train_data: Dataset, privacy: PrivacyHook | None, seed: int) -> None:
    """Let the model prepare itself on the training cases (once, before any averaged copy is taken)."""
    prepare = getattr(model, "prepare_for_training", None)
    if prepare is not None:
        prepare(train_data, private=privacy is not None, seed=seed)


def _epoch_row(run: _Run, ep: _Epochs, epoch: int) -> tuple[dict[str, Any], bool, bool]:
    """Train one epoch and validate when due; returns (history row, validated, last epoch)."""
    t0 = time.perf_counter()
    if hasattr(ep.train_view, "set_epoch"):
        ep.train_view.set_epoch(epoch)  # selects the epoch's augmentation stream, independent of workers
    meter = _train_epoch(run, f"epoch {epoch}/{ep.max_epochs}", ep.cfg.progress)
    capped = run.privacy is not None and meter.batches == 0  # the hook's loader ended the round (budget/step cap)
    last_epoch = epoch == ep.max_epochs or run.steps >= run.total_steps or capped
    row: dict[str, Any] = {"epoch": epoch, "steps": run.steps, "samples_seen": run.samples,
                           "lr": float(run.scheduler.get_last_lr()[0]), **meter.row()}
    if run.global_params is not None:
        row["proximal_term"] = proximal_term(run.params, run.global_params, run.mu)
    evaluated = ep.has_val and (epoch % ep.cfg.eval_every == 0 or last_epoch)
    if evaluated:
        preds, vloss = run_predictions(ep.scored, ep.val_data, max(ep.cfg.batch_size, 16), run.device,  # type: ignore[arg-type]
                                       run.loss_fn)
        row.update(val_summary(score_predictions(preds, n_boot=0, seed=ep.cfg.seed), vloss))
    row["seconds"] = time.perf_counter() - t0
    return row, evaluated, last_epoch


def _run_epochs(run: _Run, ep: _Epochs) -> list[dict[str, Any]]:
    """Epochs until the last one, the step budget or early stopping; the history rows (also written to out_dir)."""
    history: list[dict[str, Any]] = []
    for epoch in range(1, ep.max_epochs + 1):
        row, evaluated, last_epoch = _epoch_row(run, ep, epoch)
        row["best"] = ep.selector.observe(row, evaluated)
        history.append(row)
        ep.say(epoch_line(row))
        if ep.out_dir is not None:
            write_history_csv(history, Path(ep.out_dir) / "metrics_per_epoch.csv")
            if row["best"]:
                save_state(ep.selector.best_state, Path(ep.out_dir) / "best_weights.pt", epoch)
        if last_epoch:
            break
        if ep.cfg.patience is not None and evaluated and ep.selector.stale >= ep.cfg.patience:
            ep.say(f"early stopping after epoch {epoch}: no validation improvement for {ep.selector.stale} "
                   f"evaluations (best epoch {ep.selector.best_epoch})")
            break
    return history


def _selected_model(run: _Run, plain: nn.Module, selector: Selector) -> nn.Module:
    """The plain module holding the selected weights (best validated, else the moving average, else the last), in eval mode."""
    final = run.privacy.finish(run.model) if run.privacy is not None else plain
    if selector.best_state is not None:
        final.load_state_dict(selector.best_state)
    elif run.ema is not None:
        final.load_state_dict(run.ema.module.state_dict())
    final.eval()
    return final


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset | None, cfg: TrainConfig, *,
        proximal_mu: float = 0.0, global_params: list[torch.Tensor] | None = None,
        privacy: PrivacyHook | None = None, out_dir: Path | None = None,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` on `train_data` for `cfg.epochs` epochs (or `cfg.max_steps` steps) and keep the best weights.

    AdamW with a per-step cosine schedule after linear warm-up; seeded shuffling and augmentation;
    validation every `eval_every` epochs selects the best weights (lowest validation loss) and drives early
    stopping. Without `val_data`, or with fewer than MIN_SELECTION_CASES validation cases (validation then
    only reports), the final weights are kept. With `cfg.ema_decay` an exponential
    moving average of the weights is what is validated, selected and returned. FedProx: with
    ``proximal_mu > 0`` the gradient of (mu/2)·||w − w_global||² is added, ``global_params`` defaulting
    to the weights at entry (trainable parameters in ``model.parameters()`` order). A model with a
    ``prepare_for_training(train_data, *, private, seed)`` method gets it called first.
    """
    say, device = _start(cfg, train_data, proximal_mu, log)
    plain = model.to(device)
    _prepare_model(plain, train_data, privacy, cfg.seed)
    run, train_view = _build_run(plain, train_data, cfg, proximal_mu, global_params, privacy, device)
    steps_per_epoch = max(1, len(run.loader))
    max_epochs = math.ceil(run.total_steps / steps_per_epoch) if cfg.max_steps is not None else cfg.epochs
    n_val = 0 if val_data is None else len(val_data)  # type: ignore[arg-type]
    warning = too_few_to_select(n_val)
    if warning:
        say(warning)
    scored = run.ema.module if run.ema is not None else plain
    selector = Selector(scored, n_val >= MIN_SELECTION_CASES)
    ep = _Epochs(cfg, train_view, val_data, n_val > 0, max_epochs, scored, selector, out_dir, say)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    history = _run_epochs(run, ep)
    final = _selected_model(run, plain, ep.selector)
    if out_dir is not None and ep.has_val and not selector.selects:  # too few to select: the kept weights are the last
        save_state(snapshot(final), Path(out_dir) / "best_weights.pt", selector.best_epoch)
    return TrainResult(model=final, history=history, best_epoch=ep.selector.best_epoch, best_val=ep.selector.best_row,
                       n_train=len(train_data), steps=run.steps, samples_seen=run.samples)  # type: ignore[arg-type]

