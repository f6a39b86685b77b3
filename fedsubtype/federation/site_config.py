"""The `site.yaml` schema: everything a hospital sets to join a federation (documented in site_configs/site.template.yaml).

Validated once at the boundary (unknown key or wrong type -> one line naming the key); relative paths are
resolved against the site file's folder, so a site folder can be moved as a whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedsubtype.configio import from_dict, load_yaml
from fedsubtype.federation.credentials import check_site_name
from fedsubtype.errors import ConfigError
from fedsubtype.privacy import PrivacyConfig
from fedsubtype.privacy.limits import SiteLimits
from fedsubtype.data.preprocess import PreprocessConfig

DEFAULT_SUPERLINK = "127.0.0.1:9092"


@dataclass
class SiteConfig:
    """One site's settings. Labels, case ids and paths named here never leave the site."""

    name: str
    """The site's name as registered by the coordinator (letters, digits, '-', '_', '.')."""
    manifest: Path
    """The site's case manifest (CSV; columns in docs/architecture.md)."""
    superlink: str = DEFAULT_SUPERLINK
    """The coordinator's SuperLink address, host:port."""
    ca_certificate: Path | None = None
    """CA certificate (PEM) that signed the SuperLink's TLS certificate; required unless allow_insecure."""
    auth_private_key: Path | None = None
    """This site's SuperNode authentication private key (OpenSSH EC P-384); its .pub is registered centrally."""
    manifest_site: str | None = None
    """Use only manifest rows whose `site` column equals this (a shared manifest); None = every row."""
    cache: Path | None = None
    """Preprocessing cache folder; default <manifest folder>/.fedsubtype-cache."""
    work_dir: Path | None = None
    """Local state (Flower home, logs, FedBN layers, validation record); default <site file folder>/.fedsubtype-site-<name>."""
    local_port: int = 9094
    """Port of the SuperNode's local runtime API on 127.0.0.1; sites sharing one machine need different ports."""
    threads: int | None = None
    """CPU threads for training at this site (None: torch default)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    batch_size: int | None = None
    """Local batch size; None: what the coordinator sends (lower it for small GPUs)."""
    val_fraction: float = 0.2
    """Share of the site's cases kept for local validation (ignored when the manifest has a split column)."""
    split_seed: int = 0
    """Seed of the site's stratified train/validation split."""
    cache_workers: int = 1
    """Parallel workers to warm the preprocessing cache."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Preprocessing used to warm the cache before connecting; rounds use the coordinator's (re-warmed if it differs)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy at this site (DP-SGD); the coordinator cannot change it."""
    limits: SiteLimits = field(default_factory=SiteLimits)
    """The most the coordinator may ask of this site (batch size, epochs, steps, rounds, model, input size, metrics)."""
    connect_retries: int = 8
    """Attempts to reach the SuperLink before giving up (exponential back-off: 1, 2, 4, ... 30 s)."""
    connect_timeout_s: float = 120.0
    """Longest total wait for the SuperLink at start."""
    reconnect_timeout_s: float | None = None
    """Once joined, how long to keep trying after losing the SuperLink (None: forever)."""
    allow_insecure: bool = False
    """Permit `--insecure` (no TLS, no authentication): only for a trial on one machine."""
    approved_apps: list[str] = field(default_factory=list)
    """sha256 hashes of the Flower apps (FABs) this site takes part in (`fedsubtype-client approve-hash` prints one)."""
    approve_installed_app: bool = True
    """Also take part in the app this site's installed fedsubtype would build (the same code it runs)."""
    source: Path | None = None
    """The file this config was read from (set by load_site_config, not by users)."""

    def validate(self, where: str = "site") -> None:
        """One-line ConfigErrors naming the key."""
        try:
            check_site_name(self.name, where=f"{where}.name")
        except Exception as exc:  # UserError -> ConfigError for a uniform message
            raise ConfigError(str(exc.what), exc.fix, where=f"{where}.name") from None  # type: ignore[attr-defined]
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"superlink must be host:port, got {self.superlink!r}", "e.g. 127.0.0.1:9092",
                              where=f"{where}.superlink")
        if not 0 < self.local_port < 65536:
            raise ConfigError(f"local_port must be a TCP port, got {self.local_port}", "e.g. 9094",
                              where=f"{where}.local_port")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}", "e.g. 0.2",
                              where=f"{where}.val_fraction")
        for key in ("threads", "batch_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be at least 1, got {v}", "use a positive number or remove it",
                                  where=f"{where}.{key}")
        if self.cache_workers < 1:
            raise ConfigError(f"cache_workers must be at least 1, got {self.cache_workers}", "use 1",
                              where=f"{where}.cache_workers")
        if self.connect_retries < 0 or self.connect_timeout_s <= 0:
            raise ConfigError("connect_retries must be >= 0 and connect_timeout_s > 0", "e.g. 5 and 120",
                              where=f"{where}.connect_retries")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N", where=f"{where}.device")
        from fedsubtype.federation.approval import check_hashes

        self.approved_apps = check_hashes(self.approved_apps, where=f"{where}.approved_apps")

    def check_files(self, *, secure: bool) -> None:
        """Files named here exist and are what they claim to be (certificates, keys, manifest)."""
        from fedsubtype.federation.credentials import check_certificate_file, check_private_key_file

        where = str(self.source) if self.source else "site"
        if not Path(self.manifest).is_file():
            raise ConfigError(f"manifest not found: {self.manifest}", "check the path (relative to the site file)",
                              where=f"{where}: manifest")
        if secure:
            if self.ca_certificate is None:
                raise ConfigError("no ca_certificate given", "add the CA certificate (ca.crt) you received",
                                  where=f"{where}: ca_certificate")
            if self.auth_private_key is None:
                raise ConfigError("no auth_private_key given", "add this site's private key (<site>.key)",
                                  where=f"{where}: auth_private_key")
            check_certificate_file(self.ca_certificate, where=f"{where}: ca_certificate")
            check_private_key_file(self.auth_private_key, where=f"{where}: auth_private_key")

    def cache_dir(self) -> Path:
        """The preprocessing cache folder (explicit, or next to the manifest)."""
        return Path(self.cache) if self.cache is not None else Path(self.manifest).parent / ".fedsubtype-cache"

    def requests_path(self) -> Path:
        """Where the site counts the rounds and evaluations it served per run: next to its privacy ledger."""
        from fedsubtype.privacy.requests import REQUESTS_FILENAME

        folder = Path(self.privacy.ledger).parent if self.privacy.ledger is not None else self.state_dir()
        return folder / REQUESTS_FILENAME

    def state_dir(self) -> Path:
        """The site's local state folder."""
        if self.work_dir is not None:
            return Path(self.work_dir)
        base = Path(self.source).parent if self.source else Path.cwd()
        return base / f".fedsubtype-site-{self.name}"


_PATH_KEYS = ("manifest", "ca_certificate", "auth_private_key", "cache", "work_dir")


def load_site_config(path: str | os.PathLike) -> SiteConfig:
    """Read and validate a site.yaml; relative paths are resolved against its folder."""
    path = Path(path).resolve()
    raw = load_yaml(path)
    if "source" in raw:
        raise ConfigError("unknown key 'source'", "remove it (it is set automatically)", where=str(path))
    cfg = from_dict(SiteConfig, raw, where=str(path))
    for key in _PATH_KEYS:
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_absolute():
            setattr(cfg, key, (path.parent / Path(value).expanduser()).resolve())
    if cfg.privacy.ledger is not None and not Path(cfg.privacy.ledger).is_absolute():
        cfg.privacy.ledger = (path.parent / cfg.privacy.ledger).resolve()
    cfg.source = path
    return cfg
