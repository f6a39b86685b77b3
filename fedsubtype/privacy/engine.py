"""The DP-SGD hook `fedsubtype.train.loop.fit` calls: Opacus per-sample clipping, Gaussian noise, Poisson sampling.

One :class:`OpacusPrivacy` serves one local round. It swaps the training loader for Poisson sampling at
the planned rate q (int(1/q) draws per epoch, as the accountant assumes), wraps model and optimizer with
Opacus' `PrivacyEngine.make_private`, counts every noisy step (an empty Poisson draw still takes a
noise-only step, so what is released matches the analysis), stops at the round's step cap, and hands back
the plain module so the weights sent to the coordinator carry no Opacus wrapper names.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from fedsubtype.errors import UserError
from fedsubtype.privacy.accounting import Entry, PrivacyPlan

DEFAULT_GRAD_SAMPLE_MODE = "hooks"
"""Fastest correct per-sample-gradient mode for the full model (bench/bench_dp.py measures the others)."""

SUPPORTED_MODES = ("hooks", "functorch")


def check_model(model: nn.Module, where: str = "model") -> None:
    """Refuse a model Opacus cannot make private, with one line naming the first offending layer.

    BatchNorm mixes samples within a batch (no per-sample gradient); the project's network uses GroupNorm.
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # judge the layers, not the mode the model happens to be in
    problems = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if problems:
        first = str(problems[0]).strip().splitlines()[0]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"the model cannot be trained with DP-SGD: {first}{more}",
                        "use GroupNorm instead of BatchNorm (or a model variant without the unsupported layer)",
                        where=where)


def entropy_seed() -> int:
    """A 63-bit seed from the operating system's entropy: DP noise nobody outside the site can regenerate.

    (Not Opacus' secure_mode, which needs torchcsprng: see docs/privacy.md on floating-point attacks.)
    """
    return secrets.randbits(63)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (run id, round, steps so far): reproducible noise, for simulations only."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _tensors_only(collate):
    """Collate that drops non-tensor fields (case ids, site names): Opacus builds empty batches from tensors only."""
    def collate_fn(items: list[dict]) -> dict:
        batch = collate(items) if collate is not None else default_collate(items)
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return collate_fn


def _is_empty(batch: Any) -> bool:
    """An empty Poisson draw: a dict with a 0-row image, or (when the very first draw is empty) Opacus' list."""
    if isinstance(batch, dict):
        image = batch.get("image")
        return isinstance(image, torch.Tensor) and image.shape[0] == 0
    if isinstance(batch, (list, tuple)):
        return all(isinstance(t, torch.Tensor) and t.shape[0] == 0 for t in batch)
    return False


class _CappedPoissonLoader:
    """Iterates a DPDataLoader; empty draws become noise-only steps; never yields past the round's step cap."""

    def __init__(self, loader: DataLoader, engine: "OpacusPrivacy") -> None:
        self.loader, self.engine = loader, engine
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if self.engine.steps >= self.engine.max_steps:
                return
            if _is_empty(batch):
                self.engine.noise_only_step()
                continue
            yield batch


class OpacusPrivacy:
    """DP-SGD for one local round, implementing `fedsubtype.train.loop.PrivacyHook` with Opacus.

    `max_steps` caps the noisy steps this round may take (the ledger's budget check decides it);
    `seed` seeds Poisson sampling and noise; it must differ per release and, outside simulations, come from
    :func:`entropy_seed` (a seed the coordinator can compute lets it regenerate and subtract the noise);
    `server_round` labels the release in the ledger.
    """

    def __init__(self, plan: PrivacyPlan, *, seed: int, max_steps: int | None = None,
                 grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE, server_round: int = 0) -> None:
        if grad_sample_mode not in SUPPORTED_MODES:
            raise ValueError(f"grad_sample_mode must be one of {SUPPORTED_MODES}")
        self.plan = plan
        self.seed = int(seed)
        self.max_steps = int(max_steps if max_steps is not None else plan.steps_per_round)
        self.grad_sample_mode = grad_sample_mode
        self.server_round = int(server_round)
        self.steps = 0
        self.optimizer: Any = None
        self._engine: Any = None

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: DataLoader) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Validate the model, then wrap model/optimizer with Opacus and replace the loader by Poisson sampling."""
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        from fedsubtype.privacy.conv_grad import register

        register()  # per-case Conv3d gradients without the unfolded input (see conv_grad.py)
        model.train()  # Opacus wraps modules in training mode (the model may come back from eval)
        check_model(model)
        logging.getLogger("opacus").setLevel(logging.ERROR)
        sampling = torch.Generator().manual_seed(self.seed)
        noise = torch.Generator(device=next(model.parameters()).device).manual_seed(self.seed + 1)
        dp_loader = DPDataLoader(loader.dataset, sample_rate=self.plan.sample_rate,
                                 collate_fn=_tensors_only(loader.collate_fn), generator=sampling,
                                 num_workers=loader.num_workers, worker_init_fn=loader.worker_init_fn,
                                 pin_memory=loader.pin_memory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice and full-backward-hook notices
            self._engine = PrivacyEngine(accountant=self.plan.accountant)
            module, dp_optimizer, _ = self._engine.make_private(
                module=model, optimizer=optimizer, data_loader=dp_loader,
                noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                poisson_sampling=False, noise_generator=noise, grad_sample_mode=self.grad_sample_mode)
        module.forbid_grad_accumulation()
        # make_private assumed q = 1/len(loader); use the planned q for scaling and for the step hook.
        dp_optimizer.expected_batch_size = max(1, round(len(loader.dataset) * self.plan.sample_rate))
        accountant_hook = self._engine.accountant.get_optimizer_hook_fn(sample_rate=self.plan.sample_rate)

        def count_step(opt: Any) -> None:
            accountant_hook(opt)
            self.steps += 1

        dp_optimizer.attach_step_hook(count_step)
        self.optimizer = dp_optimizer
        return module, dp_optimizer, _CappedPoissonLoader(dp_loader, self)

    def noise_only_step(self) -> None:
        """The step an empty Poisson draw releases: no data gradient, Gaussian noise only."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for p in opt.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        if opt.pre_step():
            opt.original_optimizer.step()

    def after_step(self) -> None:
        """Nothing to do per step: the optimizer's step hook already counted it."""

    def finish(self, model: nn.Module) -> nn.Module:
        """Remove Opacus' hooks and per-sample buffers; return the plain module (state_dict keys unchanged)."""
        plain = getattr(model, "_module", model)
        close = getattr(model, "_close", None)
        if callable(close):
            close()
        for p in plain.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return plain

    def entries(self) -> list[Entry]:
        """What this round released, for the ledger: [(σ, q, steps)]."""
        return [(self.plan.noise_multiplier, self.plan.sample_rate, self.steps)] if self.steps else []
