"""User-facing errors: one line that names what is wrong, where, and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. CLIs print it as one line and exit 1, no traceback."""

    def __init__(self, what: str, fix: str | None = None, where: str | None = None) -> None:
        self.what, self.fix, self.where = what, fix, where
        super().__init__(self.line())

    def line(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head} — {self.fix}" if self.fix else head


class ConfigError(UserError):
    """An invalid configuration file or value."""


class ManifestError(UserError):
    """A manifest that cannot be read at all (per-case problems are reported by validation)."""


class ImageReadError(UserError):
    """An image or mask that cannot be read."""


class ModelFileError(UserError):
    """A model.pt that is corrupt or from an incompatible version."""
