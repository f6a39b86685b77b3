"""The YAML schema of a training run (`fedsubtype train --config FILE`), validated once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedsubtype.configio import from_dict, load_yaml
from fedsubtype.errors import ConfigError
from fedsubtype.model import ModelConfig
from fedsubtype.data.preprocess import PreprocessConfig
from fedsubtype.data.splits import STRATIFY_CHOICES, _check_fractions
from fedsubtype.train.config import TrainConfig

DEFAULT_CACHE_DIRNAME = ".fedsubtype-cache"


@dataclass
class DataConfig:
    """Where the cases are and how they are split."""

    manifest: Path | None = None
    cache: Path | None = None  # default: <manifest folder>/.fedsubtype-cache
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    stratify_on: str = "subtype"
    split_seed: int | None = None  # default: training.seed
    strict: bool = False
    cache_workers: int = 1

    def validate(self, where: str = "data") -> None:
        _check_fractions(self.split_fractions)
        if self.stratify_on not in STRATIFY_CHOICES:
            raise ConfigError(f"unknown stratify_on {self.stratify_on!r}", f"use one of {', '.join(STRATIFY_CHOICES)}",
                              where=f"{where}.stratify_on")
        if self.cache_workers < 1:
            raise ConfigError(f"must be at least 1, got {self.cache_workers}", "use 1 or the number of cores",
                              where=f"{where}.cache_workers")

    def cache_dir(self) -> Path:
        """The preprocessing cache folder (explicit, or next to the manifest)."""
        if self.cache is not None:
            return Path(self.cache)
        assert self.manifest is not None
        return Path(self.manifest).parent / DEFAULT_CACHE_DIRNAME


@dataclass
class EvaluationConfig:
    """How the selected model is scored."""

    n_boot: int = 1000
    thresholds: Literal["youden", "fixed"] = "youden"
    batch_size: int = 16

    def validate(self, where: str = "evaluation") -> None:
        if self.n_boot < 0:
            raise ConfigError(f"must be >= 0, got {self.n_boot}", "use e.g. 1000 (0 = no confidence intervals)",
                              where=f"{where}.n_boot")
        if self.batch_size < 1:
            raise ConfigError(f"must be at least 1, got {self.batch_size}", "use e.g. 16", where=f"{where}.batch_size")


@dataclass
class RunConfig:
    """A whole training run: data, preprocessing, model, training and evaluation sections."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    out: Path | None = None

    def validate(self, where: str = "config") -> None:
        size = getattr(self.preprocess, "size", 8)
        if size % 8:
            raise ConfigError(f"input size {size} is not a multiple of 8 (the network downsamples three times)",
                              "use e.g. 16, 32 or 64", where=f"{where}.preprocess.size")


def load_run_config(path: str | Path | None) -> RunConfig:
    """Read and validate a run config (defaults everywhere when `path` is None); relative paths are
    resolved against the config file's folder."""
    if path is None:
        return RunConfig()
    path = Path(path)
    raw: dict[str, Any] = load_yaml(path)
    cfg = from_dict(RunConfig, raw, where=str(path))
    base = path.parent
    if cfg.data.manifest is not None and not cfg.data.manifest.is_absolute():
        cfg.data.manifest = base / cfg.data.manifest
    if cfg.data.cache is not None and not cfg.data.cache.is_absolute():
        cfg.data.cache = base / cfg.data.cache
    if cfg.out is not None and not cfg.out.is_absolute():
        cfg.out = base / cfg.out
    return cfg
