"""Importers that turn public cohorts' folder layouts into a case manifest (columns in docs/architecture.md)."""

from fedsubtype.data.importers.mama_mia import ImportSummary, import_mama_mia

__all__ = ["ImportSummary", "import_mama_mia"]
