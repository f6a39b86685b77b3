"""fedsubtype: federated spatial multi-task learning of breast cancer biomarkers from DCE-MRI."""

__version__ = "0.1.0"

TASKS: tuple[str, ...] = ("er", "pr", "her2", "ki67")
"""Every task, in the order used by label tensors, model outputs and metrics files."""

CLASSIFICATION_TASKS: tuple[str, ...] = ("er", "pr", "her2")
"""Binary biomarkers (0 = negative, 1 = positive)."""

REGION_LABELS: dict[str, int] = {"background": 0, "core": 1, "rim": 2, "peritumoral": 3}
"""Values of a region map: tumour core, inner rim shell, outer peritumoral shell."""
