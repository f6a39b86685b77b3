"""The paper's ablation rows as configurations of one network (what each row switches off)."""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS: dict[str, str] = {
    "full": "Full model",
    "no_multiscale_attention": "w/o multi-scale attention",
    "no_peritumoral": "w/o peritumoral features",
    "no_multitask": "w/o multi-task learning",
    "no_shared_extractor": "w/o shared feature extractor",
    "single_scale_attention": "single-scale attention",
    "core_only": "tumour core only",
}
"""Variant name (as used in configs) -> the row name in the paper's ablation table."""

ALL_REGIONS: tuple[str, ...] = ("core", "rim", "peritumoral")
"""Region order of `region_weights` and of the pooled region vectors."""

ATTENTION_SCALES: tuple[int, ...] = (1, 2, 3)
"""Feature scales of the extractor (scale k is at 1/2**k of the input resolution)."""


@dataclass(frozen=True)
class VariantSpec:
    """What one ablation row keeps: attention scales, regions, and how tasks share parameters."""

    attention_scales: tuple[int, ...]
    """Scales whose attention maps are fused; empty = no attention (plain masked pooling)."""
    regions: tuple[str, ...]
    """Regions that are seen (input masking) and pooled."""
    shared_extractor: bool
    """One feature extractor for all tasks (False: one extractor per task)."""
    multitask: bool
    """One network with four heads (False: four independent single-task networks)."""


_SPECS: dict[str, VariantSpec] = {
    "full": VariantSpec(ATTENTION_SCALES, ALL_REGIONS, True, True),
    "no_multiscale_attention": VariantSpec((), ALL_REGIONS, True, True),
    "no_peritumoral": VariantSpec(ATTENTION_SCALES, ("core", "rim"), True, True),
    "no_multitask": VariantSpec(ATTENTION_SCALES, ALL_REGIONS, False, False),
    "no_shared_extractor": VariantSpec(ATTENTION_SCALES, ALL_REGIONS, False, True),
    "single_scale_attention": VariantSpec((ATTENTION_SCALES[-1],), ALL_REGIONS, True, True),
    "core_only": VariantSpec(ATTENTION_SCALES, ("core",), True, True),
}


def variant_spec(name: str) -> VariantSpec:
    """The switches of variant `name` (a key of VARIANTS)."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model variant {name!r}; known: {', '.join(VARIANTS)}") from None
