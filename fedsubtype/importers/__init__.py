"""Importers that turn public cohorts' folder layouts into a case manifest (DESIGN.md §2)."""

from .mama_mia import ImportSummary, import_mama_mia

__all__ = ["ImportSummary", "import_mama_mia"]
