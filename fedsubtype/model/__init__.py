"""The spatial multi-task network (ER, PR, HER2 logits + Ki-67), its ablation variants and sizes."""

from fedsubtype.model.config import ModelConfig
from fedsubtype.model.network import PerTaskEnsemble, SpatialMultiTaskNet, build_model, count_parameters, state_bytes
from fedsubtype.model.variants import ALL_REGIONS, VARIANTS, VariantSpec, variant_spec

__all__ = [
    "ALL_REGIONS", "VARIANTS", "ModelConfig", "PerTaskEnsemble", "SpatialMultiTaskNet", "VariantSpec",
    "build_model", "count_parameters", "state_bytes", "variant_spec",
]
