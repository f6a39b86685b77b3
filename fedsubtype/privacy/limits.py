"""What a site lets the coordinator ask of it: the `limits:` section of site.yaml, checked before any data is read.

A coordinator could otherwise pick batch size 1 (the training loss then reveals a patient's labels, and
gradient inversion gets easy), thousands of epochs, a huge model or input, or evaluate after every tiny
change to probe the validation labels. :func:`check_round` declines such a round with :class:`RoundDeclined`,
whose one line the ClientApp passes to the coordinator verbatim as the failure reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedsubtype.errors import ConfigError, UserError

DEFAULT_INPUT_SIZES: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128)
Phase = Literal["train", "evaluate"]
LIMITS_FIX = "the coordinator must ask within the site's limits (site.yaml `limits:`)"


class RoundDeclined(UserError):
    """A round the site refuses (over its limits, or over its privacy budget).

    Its `line()` names the limit and the numbers only (never a case), and reaches the coordinator as the
    round's failure reason.
    """

    def __init__(self, reason: str, fix: str = LIMITS_FIX, where: str = "site limits") -> None:
        super().__init__(reason, fix, where=where)


@dataclass
class SiteLimits:
    """site.yaml `limits:`: the most a coordinator may ask of this site per round and per run."""

    min_batch_size: int = 4
    """Smallest local batch (the site's own batch_size, else the coordinator's); tiny batches leak per-case signal."""
    max_local_epochs: int = 5
    """Most local epochs per round."""
    max_local_steps: int = 2000
    """Most optimizer steps per round the coordinator may ask for (`local_steps`)."""
    max_rounds_per_run: int = 100
    """Most training rounds per run id (the announced number of rounds and every round served count)."""
    max_evaluations_per_run: int = 101
    """Most evaluations per run id."""
    allowed_variants: list[str] | None = None
    """Model variants the site trains or evaluates; None: every variant of fedsubtype.model.VARIANTS."""
    max_parameters: int = 5_000_000
    """Largest model, in parameters (the default network has about 0.27 M)."""
    allowed_input_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_INPUT_SIZES))
    """Model input edges (preprocess `size`, voxels) the site preprocesses its cases to."""
    min_cases_per_metric: int = 10
    """An evaluation metric leaves the site only when computed over at least this many cases (per class for an AUC)."""

    def validate(self, where: str = "limits") -> None:
        """One-line ConfigErrors for limits that can never be met."""
        for key in ("min_batch_size", "max_local_epochs", "max_local_steps", "max_rounds_per_run",
                    "max_evaluations_per_run", "max_parameters", "min_cases_per_metric"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}", "use a positive number",
                                  where=f"{where}.{key}")
        if self.allowed_variants is not None:
            from fedsubtype.model.variants import VARIANTS  # imports torch: only when the site lists variants

            unknown = sorted(set(self.allowed_variants) - set(VARIANTS))
            if unknown or not self.allowed_variants:
                raise ConfigError(f"allowed_variants must name known variants, got {unknown or 'none'}",
                                  f"choose from {', '.join(VARIANTS)}, or remove the key (all)",
                                  where=f"{where}.allowed_variants")
        if not self.allowed_input_sizes or any(s < 8 or s % 8 for s in self.allowed_input_sizes):
            raise ConfigError(f"allowed_input_sizes must be multiples of 8, got {self.allowed_input_sizes}",
                              "e.g. [32, 64]", where=f"{where}.allowed_input_sizes")


def check_round(limits: SiteLimits, ask: Mapping[str, Any], phase: Phase) -> None:
    """Raise RoundDeclined when the round asks for more than the limits allow (before any data is read).

    `ask` holds what the round asks: server_round, num_rounds, local_epochs, local_steps, batch_size (the
    one the site will use), input_size, model_config (a ModelConfig dict or None).
    """
    reason = _over_training_limits(limits, ask) if phase == "train" else None
    reason = reason or _over_model_limits(limits, ask)
    if reason is not None:
        raise RoundDeclined(f"round {ask.get('server_round')} declined: {reason}")


def _over_training_limits(limits: SiteLimits, ask: Mapping[str, Any]) -> str | None:
    """Why the round's training settings exceed the limits (None when they fit)."""
    checks = (
        ("batch size", ask.get("batch_size"), limits.min_batch_size, "min_batch_size", False),
        ("local epochs", ask.get("local_epochs"), limits.max_local_epochs, "max_local_epochs", True),
        ("local steps", ask.get("local_steps"), limits.max_local_steps, "max_local_steps", True),
        ("rounds in the run", ask.get("num_rounds"), limits.max_rounds_per_run, "max_rounds_per_run", True),
        ("round number", ask.get("server_round"), limits.max_rounds_per_run, "max_rounds_per_run", True),
    )
    for what, value, bound, key, is_max in checks:
        if value is None:
            continue
        if (value > bound) if is_max else (value < bound):
            return f"{what} {value} {'above' if is_max else 'below'} the site's {key} {bound}"
    return None


def _over_model_limits(limits: SiteLimits, ask: Mapping[str, Any]) -> str | None:
    """Why the model or its input exceed the limits (None when they fit); the model is built on no memory."""
    size = ask.get("input_size")
    if size is not None and size not in limits.allowed_input_sizes:
        return f"input size {size} not in the site's allowed_input_sizes {limits.allowed_input_sizes}"
    model = dict(ask.get("model_config") or {})
    variant = model.get("variant", "full")
    if limits.allowed_variants is not None and variant not in limits.allowed_variants:
        return f"model variant {variant!r} not in the site's allowed_variants"
    n = parameter_count(model)
    if n > limits.max_parameters:
        return f"model of {n} parameters above the site's max_parameters {limits.max_parameters}"
    return None


def parameter_count(model_config: Mapping[str, Any]) -> int:
    """Parameters of the network `model_config` describes, built on PyTorch's meta device (no weights allocated)."""
    import torch

    from fedsubtype.configio import from_dict
    from fedsubtype.model import ModelConfig, build_model

    cfg = from_dict(ModelConfig, dict(model_config), where="coordinator model config")
    with torch.device("meta"):
        model = build_model(cfg)
    return int(sum(p.numel() for p in model.parameters()))

