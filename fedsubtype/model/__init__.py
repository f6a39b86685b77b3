"""The spatial multi-task network (ER, PR, HER2 logits + Ki-67), its ablation variants and sizes.

Names are imported on first use, so `fedsubtype.model.config` (allowed values, read by the CLI's parsers)
loads without torch."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES: dict[str, str] = {
    "ALL_REGIONS": "variants", "VARIANTS": "variants", "VariantSpec": "variants", "variant_spec": "variants",
    "ModelConfig": "config",
    "PerTaskEnsemble": "network", "SpatialMultiTaskNet": "network", "build_model": "network",
    "count_parameters": "network", "state_bytes": "network",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
