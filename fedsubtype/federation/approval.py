"""Which Flower apps a site agrees to take part in: the sha256 of the app bundle (FAB), checked before any task runs.

Flower names a run's app by `fab_hash` = sha256 of the FAB bytes. `flwr run` builds the FAB deterministically
(`flwr.cli.build`: a zip with fixed dates of pyproject.toml, the files `fab-include` lists, and a CONTENT
manifest), so a site can compute the hash of the app its own installed fedsubtype would build and compare.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

from fedsubtype.errors import ConfigError, UserError

DECLINE_REASON = "app not approved by the site"
"""The reason the coordinator records for a site that declined a run's app."""
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
APP_CONFIG = "pyproject.toml"


def sha256_hex(data: bytes) -> str:
    """Flower's `fab_hash` of FAB bytes."""
    return hashlib.sha256(data).hexdigest()


def fab_file_hash(path: str | Path) -> str:
    """The hash a site approves for a FAB file (as written by `flwr build`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FAB file not found: {path}", "give the .fab file the coordinator shared", where="--fab")
    return sha256_hex(path.read_bytes())


def installed_app_dir() -> Path | None:
    """The Flower app folder of the installed fedsubtype (its source tree), or None when it was not installed
    from a source tree (a wheel ships no pyproject.toml)."""
    import fedsubtype

    root = Path(fedsubtype.__file__).resolve().parent.parent
    config = root / APP_CONFIG
    if config.is_file() and "[tool.flwr.app]" in config.read_text(encoding="utf-8"):
        return root
    return None


def _app_files(app_dir: Path) -> dict[str, Path]:
    """pyproject.toml, .gitignore and the files `fab-include` names: a superset of what `flwr run` bundles,
    found without walking the whole tree (virtual environments, data)."""
    import tomli

    from flwr.cli.build import get_user_fab_patterns

    config = tomli.loads((app_dir / APP_CONFIG).read_text(encoding="utf-8"))
    include, _ = get_user_fab_patterns(config)
    if include is None:
        from flwr.cli.utils import collect_files

        return collect_files(app_dir)
    files = {APP_CONFIG: app_dir / APP_CONFIG}
    if (app_dir / ".gitignore").is_file():
        files[".gitignore"] = app_dir / ".gitignore"
    for pattern in include:
        for path in app_dir.glob(pattern.lstrip("/")):
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(app_dir).as_posix()] = path
    return files


def app_bytes(app_dir: str | Path) -> bytes:
    """The FAB `flwr run` builds from `app_dir`, byte for byte (Flower's own builder on the same files)."""
    from flwr.cli.build import build_fab_from_files

    app_dir = Path(app_dir).resolve()
    if not (app_dir / APP_CONFIG).is_file():
        raise UserError(f"no {APP_CONFIG} in {app_dir}", "give the Flower app folder (the fedsubtype source tree)",
                        where="--app-dir")
    try:
        return build_fab_from_files(_app_files(app_dir))[0]
    except ValueError as exc:
        raise UserError(f"cannot bundle the app in {app_dir} ({exc})", "check [tool.flwr.app] in pyproject.toml",
                        where=str(app_dir / APP_CONFIG)) from None


def app_hash(app_dir: str | Path) -> str:
    """The `fab_hash` of the app `flwr run` would submit from `app_dir`."""
    return sha256_hex(app_bytes(app_dir))


def installed_app_hash() -> str | None:
    """The `fab_hash` of the app this site's installed fedsubtype would build (None: not a source install)."""
    app_dir = installed_app_dir()
    return app_hash(app_dir) if app_dir is not None else None


def check_hashes(values: Iterable[str], where: str) -> list[str]:
    """Approved-app entries as lowercase sha256 hex; ConfigError naming the bad entry."""
    out = []
    for v in values:
        h = str(v).strip().lower()
        if not HASH_PATTERN.match(h):
            raise ConfigError(f"not a sha256 app hash: {v!r}", "paste the 64 hex digits printed by "
                              "`fedsubtype-client approve-hash`", where=where)
        out.append(h)
    return out


class AppApproval:
    """A site's approved app hashes: those it lists, plus (unless it opted out) its installed app's, which is
    recomputed when an unknown hash arrives, so an updated installation is recognised without a restart."""

    def __init__(self, listed: Iterable[str], include_installed: bool = True) -> None:
        self.listed = frozenset(listed)
        self.include_installed = include_installed
        self.installed = installed_app_hash() if include_installed else None

    @classmethod
    def for_site(cls, site) -> "AppApproval":
        """From a SiteConfig's `approved_apps` and `approve_installed_app`."""
        where = f"{site.source or 'site'}: approved_apps"
        return cls(check_hashes(getattr(site, "approved_apps", None) or [], where),
                   bool(getattr(site, "approve_installed_app", True)))

    def hashes(self) -> frozenset[str]:
        """Every hash approved right now."""
        return self.listed | ({self.installed} if self.installed else set())

    def approves(self, fab_hash: str) -> bool:
        """Whether the site takes part in the app with this `fab_hash`."""
        if fab_hash in self.hashes():
            return True
        if self.include_installed:
            self.installed = installed_app_hash()
        return fab_hash in self.hashes()


def decline_line(site_name: str, run_id: int, fab_hash: str, source: Path | None) -> str:
    """The one line a site logs when it declines a run's app (run, hash, where to approve it)."""
    where = source or "site.yaml"
    return (f"site {site_name}: declined run {run_id}: {DECLINE_REASON} (sha256 {fab_hash}); to run it, check the "
            f"app with the consortium and add this hash under approved_apps in {where}")
