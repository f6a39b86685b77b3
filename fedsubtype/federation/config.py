"""The `federation.yaml` schema: what the coordinator runs (sites, strategy, rounds, model, TLS) — one file, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedsubtype.configio import from_dict, load_yaml
from fedsubtype.errors import ConfigError
from fedsubtype.model import ModelConfig
from fedsubtype.data.preprocess import PreprocessConfig
from fedsubtype.federation.reply_checks import ReplyChecksConfig
from fedsubtype.federation.robust import ROBUST_STRATEGIES, RobustConfig, strategy_constraint
from fedsubtype.federation.secure_aggregation import SecureAggregationConfig, combination_problem
from fedsubtype.privacy.site_level import SiteLevelDPConfig

NORM_CHECK_DEFAULT = ReplyChecksConfig().max_norm_ratio
"""The default update-norm check, which does not apply under secure aggregation (an explicit one is refused)."""
NORM_CHECK_HIDDEN = ("the update-norm check needs each site's update, which secure aggregation hides",
                     "set it to null, or turn secure_aggregation off")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", *ROBUST_STRATEGIES)


@dataclass
class SiteEntry:
    """A site allowed to join: its name, its SuperNode authentication public key (OpenSSH) and, optionally,
    the number of training cases it declared when it enrolled (a reply claiming more is left out)."""

    name: str
    public_key: Path
    declared_examples: int | None = None


@dataclass
class TLSConfig:
    """The SuperLink's TLS files (`fedsubtype-server credentials` writes development ones)."""

    ca_certificate: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass
class FederationConfig:
    """A federated training run as the coordinator defines it."""

    sites: list[SiteEntry] = field(default_factory=list)
    """Sites whose public keys are registered; no other SuperNode can connect."""
    run_dir: Path = Path("runs/federation")
    """Run folder: per-round metrics, checkpoints, final model.pt."""
    rounds: int = 3
    """Federated rounds."""
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
                      "bulyan"] = "fedprox"
    """Aggregation: FedAvg, FedProx (sites add the proximal term), FedAdam or FedYogi (server-side optimiser), or
    one of Flower's robust strategies (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan; see `robust`)."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    """Parameters of the robust strategies and optional server-side norm clipping (docs/federation.md)."""
    reply_checks: ReplyChecksConfig = field(default_factory=ReplyChecksConfig)
    """Bounds every site reply must meet to be aggregated (docs/federation.md, "Checked replies")."""
    proximal_mu: float = 0.01
    """FedProx μ (ignored by the other strategies)."""
    server_lr: float = 0.01
    """FedAdam/FedYogi server learning rate η."""
    server_tau: float = 0.001
    """FedAdam/FedYogi adaptivity τ."""
    local_epochs: int = 1
    """Local epochs per round at each site."""
    local_steps: int | None = None
    """Cap on local optimizer steps per round (overrides epochs when reached first)."""
    lr: float = 0.001
    """Local learning rate (AdamW)."""
    batch_size: int = 8
    """Local batch size (a site may lower it in its site.yaml)."""
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    """Seed of initial weights and of each site's local shuffling (offset by round)."""
    min_sites: int = 2
    """Sites that must be connected to start and must answer for a round to count."""
    fraction_train: float = 1.0
    """Share of connected sites asked to train each round."""
    evaluate_every: int = 1
    """Ask the sites to score the global model every this many rounds (0: only after the last round, which is
    always scored). Each evaluation is one more message exchange per site, so sparse evaluation saves time."""
    round_timeout_s: float = 600.0
    """How long a round waits for answers; late or failed sites are left out of that round."""
    local_norm: bool = False
    """FedBN-style: GroupNorm affine parameters stay local at each site (see docs/federation.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    site_level_dp: SiteLevelDPConfig = field(default_factory=SiteLevelDPConfig)
    """Site-level DP at the coordinator (Flower's clipping wrappers; see docs/privacy.md). Off by default."""
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    """Flower's SecAgg+: the coordinator sees only the sum of the sites' updates (docs/federation.md). Off by
    default."""
    host: str = "127.0.0.1"
    """Interface of the public address sites connect to, the fleet front (0.0.0.0 for other machines)."""
    port: int = 9092
    """Public port (sites connect to host:port); it forwards only Flower's Fleet API to the SuperLink."""
    superlink_port: int | None = None
    """Port of the SuperLink itself, on 127.0.0.1 only (Control, Fleet and Runtime APIs); None: a free port."""
    tls: TLSConfig = field(default_factory=TLSConfig)
    insecure: bool = False
    """Plain text, no node authentication: only for a trial on one machine (refused unless host is loopback)."""
    wait_for_sites_s: float = 600.0
    """How long to wait for min_sites to connect before giving up."""
    app_dir: Path | None = None
    """Folder of the Flower app (pyproject.toml with [tool.flwr.app]); default: the fedsubtype source tree."""

    def validate(self, where: str = "federation") -> None:
        def bad(key: str, what: str, fix: str) -> ConfigError:
            return ConfigError(what, fix, where=f"{where}.{key}")

        if self.rounds < 1:
            raise bad("rounds", f"must be at least 1, got {self.rounds}", "use e.g. 3")
        if self.local_epochs < 1:
            raise bad("local_epochs", f"must be at least 1, got {self.local_epochs}", "use e.g. 1")
        if self.local_steps is not None and self.local_steps < 1:
            raise bad("local_steps", f"must be at least 1, got {self.local_steps}", "use a positive number or remove it")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, got {self.lr}", "use e.g. 0.001")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be at least 1, got {self.batch_size}", "use e.g. 8")
        if self.proximal_mu < 0:
            raise bad("proximal_mu", f"must be >= 0, got {self.proximal_mu}", "use e.g. 0.01")
        if self.min_sites < 1:
            raise bad("min_sites", f"must be at least 1, got {self.min_sites}", "use e.g. 2")
        if self.sites and self.min_sites > len(self.sites):
            raise bad("min_sites", f"{self.min_sites} is more than the {len(self.sites)} listed sites",
                      "lower min_sites or list more sites")
        if not 0.0 < self.fraction_train <= 1.0:
            raise bad("fraction_train", f"must be in (0, 1], got {self.fraction_train}", "use 1.0")
        if self.evaluate_every < 0:
            raise bad("evaluate_every", f"must be >= 0, got {self.evaluate_every}", "use 1 (every round) or 0 (last only)")
        if self.round_timeout_s <= 0 or self.wait_for_sites_s <= 0:
            raise bad("round_timeout_s", "timeouts must be positive", "e.g. 600")
        if not 0 < self.port < 65536:
            raise bad("port", f"must be a TCP port, got {self.port}", "e.g. 9092")
        if self.superlink_port is not None and not (0 < self.superlink_port < 65536
                                                    and self.superlink_port != self.port):
            raise bad("superlink_port", f"must be a TCP port other than port, got {self.superlink_port}",
                      "e.g. 9093, or remove it to use a free port")
        self._check_insecure(bad)
        constraint = strategy_constraint(self.strategy, self.robust, self.min_sites)
        if constraint:
            raise bad("strategy", constraint, "raise min_sites, lower robust.num_malicious, or pick another strategy")
        problem = self.secure_aggregation_problem()
        if problem:
            raise bad(*problem)
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise bad("sites", "a site is listed twice", "list each site once")
        for s in self.sites:
            if s.declared_examples is not None and s.declared_examples < 1:
                raise bad(f"sites.{s.name}.declared_examples", f"must be a positive number, got {s.declared_examples}",
                          "give the training-case count the site declared at enrolment, or leave it out")
        if self.preprocess.size % 8:
            raise bad("preprocess.size", f"must be a multiple of 8, got {self.preprocess.size}", "e.g. 32")

    def secure_aggregation_problem(self) -> tuple[str, str, str] | None:
        """(key, what, fix) when secure aggregation is on with something that needs each site's update."""
        if not self.secure_aggregation.enabled:
            return None
        dp = self.site_level_dp
        problem = combination_problem(self.secure_aggregation, self.strategy, ROBUST_STRATEGIES,
                                      self.robust.clip_norm_ratio, dp.enabled and dp.side == "server",
                                      self.min_sites, len(self.sites))
        if problem is None and self.reply_checks.max_norm_ratio not in (None, NORM_CHECK_DEFAULT):
            problem = ("reply_checks.max_norm_ratio", *NORM_CHECK_HIDDEN)
        return problem

    def _check_insecure(self, bad) -> None:
        from fedsubtype.federation.loopback_link import is_loopback

        if self.insecure and not is_loopback(self.host):
            raise bad("insecure", f"plain text is refused on host {self.host}: other machines could read the "
                      "weights and join without a key", "use tls: (fedsubtype-server credentials), or host: "
                      "127.0.0.1 for a trial on one machine")

    def check_files(self, where: str) -> None:
        """Public keys and TLS files exist (and parse) unless insecure."""
        from fedsubtype.federation.credentials import (check_certificate_file, check_private_file_mode,
                                                       check_public_key_file)

        if not self.sites:
            raise ConfigError("no sites listed", "add sites: [{name, public_key}]", where=f"{where}: sites")
        if self.insecure:
            return
        for i, s in enumerate(self.sites):
            check_public_key_file(s.public_key, where=f"{where}: sites[{i}].public_key")
        for key in ("ca_certificate", "certificate", "private_key"):
            if getattr(self.tls, key) is None:
                raise ConfigError(f"tls.{key} is not set", "create credentials with `fedsubtype-server credentials` "
                                  "or set insecure: true for a local trial", where=f"{where}: tls.{key}")
            if not Path(getattr(self.tls, key)).is_file():
                raise ConfigError(f"file not found: {getattr(self.tls, key)}", "check the path",
                                  where=f"{where}: tls.{key}")
        check_certificate_file(self.tls.certificate, where=f"{where}: tls.certificate")  # type: ignore[arg-type]
        check_certificate_file(self.tls.ca_certificate, where=f"{where}: tls.ca_certificate")  # type: ignore[arg-type]
        check_private_file_mode(self.tls.private_key, where=f"{where}: tls.private_key")  # type: ignore[arg-type]


def load_federation_config(path: str | os.PathLike) -> FederationConfig:
    """Read and validate federation.yaml; relative paths resolve against its folder."""
    path = Path(path).resolve()
    raw = load_yaml(path)
    cfg = from_dict(FederationConfig, raw, where=str(path))
    checks = raw.get("reply_checks")
    explicit = checks.get("max_norm_ratio") if isinstance(checks, dict) else None
    if cfg.secure_aggregation.enabled and explicit is not None:
        raise ConfigError(*NORM_CHECK_HIDDEN, where=f"{path}: reply_checks.max_norm_ratio")
    base = path.parent

    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if Path(p).is_absolute() else (base / p).resolve())

    cfg.run_dir = fix(cfg.run_dir)  # type: ignore[assignment]
    cfg.app_dir = fix(cfg.app_dir)
    for s in cfg.sites:
        s.public_key = fix(s.public_key)  # type: ignore[assignment]
    for key in ("ca_certificate", "certificate", "private_key"):
        setattr(cfg.tls, key, fix(getattr(cfg.tls, key)))
    return cfg
