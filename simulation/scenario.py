"""Scenario files: one YAML describes a whole virtual-site study (data, partition, methods, budget, seeds).

Validated once, here, before anything runs: an unknown key, method or partitioner, alpha <= 0, a
budget that cannot be split into rounds — each a one-line ConfigError naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsubtype.configio import from_dict, load_yaml, to_dict
from fedsubtype.errors import ConfigError
from fedsubtype.federation.robust import ROBUST_STRATEGIES

from .partition import PartitionSpec

ROBUST: tuple[str, ...] = ROBUST_STRATEGIES
"""Flower's Byzantine-robust strategies (fedsubtype.federation.robust)."""
METHODS: tuple[str, ...] = ("pooled", "local", "fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", *ROBUST)
"""pooled = centralized on the union; local = each site alone; the rest run through the Flower apps.
fedbn = FedAvg with normalisation layers kept local to each site (FedBN-style personalisation)."""
FEDERATED: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", *ROBUST)
FAULTS: tuple[str, ...] = ("nan", "sign_flip", "scale", "inflate_examples")
"""What the simulation-only fault hook (simulation/flower_sim.py) does to one virtual site's training replies."""


@dataclass
class PhantomSpec:
    """Generate the phantom cohort into `out_dir` when the manifest is absent."""

    generate_if_missing: bool = False
    cases: int = 960
    sites: int = 5
    seed: int = 0


@dataclass
class DataSpec:
    """Where the cohort is and where preprocessed tensors are cached (paths relative to the cwd)."""

    manifest: Path = Path("data/phantom/manifest.csv")
    cache_dir: Path = Path("cache/preprocess")
    cache_workers: int = 2
    max_cases: int | None = None  # use only the manifest's first N rows (a smaller trial; say so when quoting it)
    phantom: PhantomSpec = field(default_factory=PhantomSpec)


@dataclass
class MethodSpec:
    """One method of the protocol; fedprox takes a grid of mu, fedadam/fedyogi a server learning rate."""

    name: str
    mu: list[float] = field(default_factory=lambda: [0.01])
    server_lr: float = 0.01
    num_malicious: int = 1  # krum / multikrum / bulyan: f
    beta: float = 0.2  # fedtrimmedavg: share trimmed at each end
    clip_ratio: float | None = None  # server-side clipping of each update to this multiple of the median norm
    label: str | None = None

    def validate(self, where: str = "method") -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method '{self.name}'", f"use one of {', '.join(METHODS)}", where=f"{where}.name")
        if self.name == "fedprox" and (not self.mu or any(m < 0 for m in self.mu)):
            raise ConfigError(f"fedprox needs a non-empty list of mu >= 0, got {self.mu}", "e.g. mu: [0.001, 0.01, 0.1]", where=f"{where}.mu")
        if self.server_lr <= 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}", where=f"{where}.server_lr")

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, settings) for each run this method expands to (one per mu for fedprox)."""
        if self.name == "fedprox":
            return [(self.label or f"fedprox(mu={m:g})", {"mu": m}) for m in self.mu]
        if self.name in ("fedadam", "fedyogi"):
            return [(self.label or self.name, {"server_lr": self.server_lr})]
        return [(self.label or self.name, self._robust_params())]

    def _robust_params(self) -> dict[str, Any]:
        """Settings of the robust strategies and of server-side clipping (empty for the others: keys unchanged)."""
        params: dict[str, Any] = {}
        if self.name in ("krum", "multikrum", "bulyan"):
            params["f"] = self.num_malicious
        if self.name == "fedtrimmedavg":
            params["beta"] = self.beta
        if self.clip_ratio is not None:
            params["clip"] = self.clip_ratio
        return params


@dataclass
class FederationSpec:
    """Equal compute budget: every method sees budget_epochs × (its training cases) samples.

    Federated methods run budget_epochs / local_epochs rounds of local_epochs each; pooled and
    local-only train budget_epochs epochs.
    """

    budget_epochs: int = 10
    local_epochs: int = 1
    fraction_train: float = 1.0
    min_sites: int | None = None  # replies a round needs to count (None: every site); below it the model stays
    secure_aggregation: bool = False  # Flower's SecAgg+ (docs/federation.md): the coordinator sees only the sum


    def validate(self, where: str = "federation") -> None:
        if self.budget_epochs < 1 or self.local_epochs < 1:
            raise ConfigError("budget_epochs and local_epochs must be >= 1", where=where)
        if self.budget_epochs % self.local_epochs:
            raise ConfigError(f"budget_epochs ({self.budget_epochs}) is not a multiple of local_epochs ({self.local_epochs})",
                              "make it one so every method sees the same number of samples", where=where)
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}", where=f"{where}.fraction_train")
        if self.min_sites is not None and self.min_sites < 1:
            raise ConfigError(f"min_sites must be >= 1, got {self.min_sites}", "use e.g. 4, or remove it for every site",
                              where=f"{where}.min_sites")

    @property
    def rounds(self) -> int:
        return self.budget_epochs // self.local_epochs


@dataclass
class FaultSpec:
    """SIMULATION ONLY: one virtual site's training replies are corrupted (never reachable from a deployment)."""

    kind: str | None = None
    site: int = 0  # index of the virtual site among the run's training sites
    factor: float = 100.0  # `scale` / `sign_flip`: update multiplier (-factor); `inflate_examples`: count multiplier

    def validate(self, where: str = "fault") -> None:
        if self.kind is not None and self.kind not in FAULTS:
            raise ConfigError(f"unknown fault '{self.kind}'", f"use one of {', '.join(FAULTS)} or null",
                              where=f"{where}.kind")
        if self.site < 0:
            raise ConfigError(f"site must be >= 0, got {self.site}", where=f"{where}.site")


@dataclass
class SweepSpec:
    """Repeat the study for each value of one setting: partition.alpha or privacy.target_epsilon (null = no DP)."""

    param: str
    values: list[Any] = field(default_factory=list)

    def validate(self, where: str = "sweep") -> None:
        if self.param not in SWEEPABLE:
            raise ConfigError(f"cannot sweep '{self.param}'", f"use one of {', '.join(SWEEPABLE)}", where=f"{where}.param")
        if not self.values:
            raise ConfigError("sweep has no values", "list at least one", where=f"{where}.values")


SWEEPABLE: tuple[str, ...] = ("partition.alpha", "privacy.target_epsilon", "fault.kind")


@dataclass
class RaySpec:
    """Simulation engine resources. `address` joins an existing Ray cluster (e.g. "auto" or "ray://host:10001")."""

    address: str | None = None
    num_cpus: int | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    threads_per_client: int = 1


@dataclass
class Scenario:
    """A whole virtual-site study."""

    name: str
    description: str = ""
    output_dir: Path = Path("results/sim")
    data: DataSpec = field(default_factory=DataSpec)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    preprocess: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    federation: FederationSpec = field(default_factory=FederationSpec)
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("pooled"), MethodSpec("local"), MethodSpec("fedavg")])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    leave_one_site_out: bool = False
    loso_methods: list[str] | None = None  # methods that also run leave-one-site-out (None: all but local)
    include_all_sites: bool = True
    sweep: SweepSpec | None = None
    fault: FaultSpec | None = None
    ray: RaySpec = field(default_factory=RaySpec)
    evaluate_every_round: bool = True

    def validate(self, where: str = "scenario") -> None:
        if not self.seeds:
            raise ConfigError("no seeds", "list at least one seed (3 or more for mean ± sd)", where=f"{where}.seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"repeated seeds {self.seeds}", "list distinct seeds", where=f"{where}.seeds")
        if not self.methods:
            raise ConfigError("no methods", "list at least one method", where=f"{where}.methods")
        labels = [label for m in self.methods for label, _ in m.variants()]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"two methods share a label ({labels})", "give one a distinct 'label'", where=f"{where}.methods")
        names = {m.name for m in self.methods}
        unknown = [m for m in (self.loso_methods or []) if m not in names]
        if unknown:
            raise ConfigError(f"loso_methods lists '{unknown[0]}', which is not among the methods",
                              f"use some of {', '.join(sorted(names))}", where=f"{where}.loso_methods")
        if not self.include_all_sites and not self.leave_one_site_out:
            raise ConfigError("nothing to run: include_all_sites and leave_one_site_out are both false",
                              "set one of them true", where=where)

    def settings(self) -> list[tuple[str, "Scenario"]]:
        """(setting label, scenario with the sweep value applied) — one entry when there is no sweep."""
        if self.sweep is None:
            return [("default", self)]
        out = []
        for value in self.sweep.values:
            if self.sweep.param == "partition.alpha":
                if value is None or float(value) <= 0:
                    raise ConfigError(f"alpha must be > 0, got {value}", "use e.g. 100, 1 or 0.3", where="scenario.sweep.values")
                scen = replace(self, partition=replace(self.partition, alpha=float(value)), sweep=None)
                out.append((f"alpha={float(value):g}", scen))
            elif self.sweep.param == "fault.kind":
                fault = replace(self.fault or FaultSpec(), kind=value)
                fault.validate("scenario.sweep.values")
                out.append((f"fault={value or 'none'}", replace(self, fault=fault if value else None, sweep=None)))
            else:
                privacy = dict(self.privacy)
                if value is None or value in ("inf", "none", float("inf")):
                    privacy["enabled"] = False
                    privacy.pop("target_epsilon", None)
                    label = "eps=inf"
                else:
                    privacy.update(enabled=True, target_epsilon=float(value))
                    label = f"eps={float(value):g}"
                out.append((label, replace(self, privacy=privacy, sweep=None)))
        return out

    def config_hash(self) -> str:
        """Short hash of everything that changes a run's numbers: data, partition, preprocessing, model,
        training, privacy, budget. Not which methods/seeds/sites are run, the sweep, or where/how (output, Ray),
        so a run finished under one invocation is reused by another that asks for the same run."""
        data = to_dict(self)
        data.update(resolved_sections(self, "scenario"))  # library defaults count: a changed default changes runs
        from fedsubtype.data.preprocess import PREPROCESS_VERSION
        from fedsubtype.migrate import run_identity

        for section in ("model", "preprocess", "privacy"):  # as hashed since the first runs, so finished runs stay valid
            data[section] = run_identity(section, data[section])
        data["preprocess_version"] = PREPROCESS_VERSION
        for key in ("name", "output_dir", "ray", "description", "methods", "seeds", "leave_one_site_out",
                    "loso_methods", "include_all_sites", "sweep", "evaluate_every_round"):
            data.pop(key, None)
        data["data"].pop("cache_dir", None)
        data["data"].pop("cache_workers", None)
        for section, key, default in (("federation", "min_sites", None), (None, "fault", None),
                                      ("federation", "secure_aggregation", False)):  # added later: old hashes stay
            holder = data[section] if section else data
            if holder.get(key, default) is default:
                holder.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


SUB_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("preprocess", "fedsubtype.data.preprocess", "PreprocessConfig"),
    ("model", "fedsubtype.model", "ModelConfig"),
    ("training", "fedsubtype.train.config", "TrainConfig"),
    ("privacy", "fedsubtype.privacy", "PrivacyConfig"),
)
"""Pass-through sections and the library config class each must satisfy."""


def resolved_sections(scen: Scenario, where: str) -> dict[str, Any]:
    """The pass-through sections as the library reads them (every default filled in), JSON-safe."""
    import importlib

    out = {}
    for section, module, cls_name in SUB_CONFIGS:
        cls = getattr(importlib.import_module(module), cls_name)
        out[section] = to_dict(from_dict(cls, copy.deepcopy(getattr(scen, section)), f"{where}.{section}"))
    return out


def _check_sub_configs(scen: Scenario, where: str) -> None:
    """Validate the pass-through sections against the library's own config classes."""
    resolved_sections(scen, where)
    if scen.training.get("ema_decay") is not None:
        raise ConfigError("simulated methods keep no weight average (a federated site keeps none: the server's "
                          "average is the federation's)", "remove ema_decay", where=f"{where}.training.ema_decay")

def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside nested mappings (creating levels), e.g. from `--set federation.budget_epochs=4`."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_scenario(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read and validate a scenario file, with optional overrides (dotted keys allowed, e.g. from the CLI)."""
    path = Path(path)
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    where = str(path)
    if "name" not in data:
        data["name"] = path.stem
    scen = from_dict(Scenario, data, where)  # validates every section (their validate() methods)
    from fedsubtype.privacy import PrivacyConfig

    for label, sub in scen.settings():
        from_dict(PrivacyConfig, dict(sub.privacy), f"{where}:privacy ({label})")
    _check_sub_configs(scen, where)
    return scen
