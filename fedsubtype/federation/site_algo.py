"""A site's part in a federation, free of Flower types (MONAI FL `ClientAlgo`-style lifecycle).

`SiteAlgo(site).initialize()` reads and validates the site's manifest, splits its cases into local
train/validation sets and warms the preprocessing cache; `train(weights, round_config)` runs the same
`fedsubtype.train.loop.fit` as `fedsubtype train` for the round's local epochs/steps (with the FedProx
term when μ > 0) and `evaluate(weights, config)` scores the global model on the local validation split.

What leaves a site is exactly: the weights, the number of training (or validation) cases, and the
aggregate metrics named in TRAIN_METRIC_KEYS / EVAL_METRIC_KEYS. Never case ids, paths, per-case
predictions or labels. A round asking for more than the site's `limits:` allow is declined before any
data is read (fedsubtype.privacy.limits.RoundDeclined); an evaluation metric over too few cases is left
out (fedsubtype.privacy.metrics_gate); under DP the training loss is not sent (NaN).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedsubtype import CLASSIFICATION_TASKS
from fedsubtype.configio import atomic_write_text, from_dict, to_dict
from fedsubtype.errors import UserError
from fedsubtype.federation.site_config import SiteConfig
from fedsubtype.privacy.limits import Phase
from fedsubtype.privacy.metrics_gate import OMITTED_KEY, releasable_eval_metrics

TRAIN_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "train-loss", "steps", "samples-seen", "seconds", "proximal-term", "epsilon", "delta")
"""Every key a site's training reply carries (NaN where not applicable, so replies stay consistent)."""
EVAL_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "mean-auc", *(f"{t}-auc" for t in CLASSIFICATION_TASKS), "ki67-mae", OMITTED_KEY)
"""Every key a site's evaluation reply may carry; a metric over too few cases is absent (counted in OMITTED_KEY)."""
EVAL_REQUIRED_KEYS: tuple[str, ...] = ("num-examples", OMITTED_KEY)
"""The keys every evaluation reply carries."""

NORM_TYPES = ("GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm3d", "LayerNorm")


def get_weights(model: Any) -> list[np.ndarray]:
    """The model's `state_dict()` values as numpy arrays, in order (the weights on the wire)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: Any, weights: Sequence[np.ndarray], *, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Load `weights` (state_dict order) into `model`; entries named in `keep` are left as they are."""
    import torch

    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} arrays for a model with {len(state)} state entries "
                         "(the coordinator's model config differs from this site's)")
    new = {}
    for (name, current), w in zip(state.items(), weights):
        if name in keep:
            new[name] = current
            continue
        if tuple(w.shape) != tuple(current.shape):
            raise ValueError(f"{name}: shape {tuple(w.shape)} does not fit {tuple(current.shape)}")
        new[name] = torch.as_tensor(np.asarray(w)).to(dtype=current.dtype)
    model.load_state_dict(new, strict=True)


def norm_parameter_names(model: Any) -> set[str]:
    """state_dict names of normalisation layers' parameters and buffers (kept local under FedBN)."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if type(module).__name__ in NORM_TYPES:
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + k for k in module.state_dict().keys())
    return names


@dataclass
class RoundSettings:
    """What the coordinator asks of one round (parsed from the round's config record)."""

    server_round: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    proximal_mu: float = 0.0
    local_norm: bool = False
    model_config: dict[str, Any] | None = None
    preprocess_config: dict[str, Any] | None = None
    run_id: str = "run"  # privacy: the federation run's id (stable across --resume), keys the site's ledger
    num_rounds: int | None = None  # privacy: rounds the coordinator plans (the site's DP plan spreads ε over them)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RoundSettings":
        """Parse a round config (Flower-style dashed keys); unknown keys are ignored, privacy keys refused."""
        for key in config:
            if "privacy" in str(key) or str(key) in ("epsilon", "noise-multiplier", "max-grad-norm"):
                raise UserError(f"the coordinator sent a privacy setting ({key})",
                                "privacy is set by each site in its site.yaml only", where="round config")
        steps = int(config.get("local-steps", 0) or 0)
        return cls(
            server_round=int(config.get("server-round", 1)),
            local_epochs=int(config.get("local-epochs", 1)),
            local_steps=steps if steps > 0 else None,
            lr=float(config.get("lr", config.get("learning-rate", 1e-3))),
            batch_size=int(config.get("batch-size", 8)),
            weight_decay=float(config.get("weight-decay", 1e-4)),
            augment=bool(config.get("augment", True)),
            seed=int(config.get("seed", 0)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            local_norm=bool(config.get("local-norm", False)),
            model_config=json.loads(config["model-config"]) if config.get("model-config") else None,
            preprocess_config=json.loads(config["preprocess-config"]) if config.get("preprocess-config") else None,
            run_id=str(config.get("run-id", "run")),
            num_rounds=int(config["num-rounds"]) if config.get("num-rounds") else None,
        )


def _nan_if_none(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class SiteAlgo:
    """One site's local lifecycle: initialize, train, evaluate, on plain numpy weights."""

    def __init__(self, site: SiteConfig, *, log: Callable[[str], None] | None = None, progress: bool = False,
                 warm: bool = True) -> None:
        self.site = site
        self.warm = warm  # what the first train/evaluate passes to initialize() when nobody called it before
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.cases: list = []
        self.problems: list = []
        self.splits: dict[str, list] = {}
        self._cache = None
        self._preprocess = None
        self._datasets: dict[str, Any] = {}
        self._model = None
        self._model_key: str | None = None
        self._privacy: Any = None  # fedsubtype.privacy.site.SitePrivacy of the current run (DP enabled only)

    # ---------------------------------------------------------------- lifecycle
    def initialize(self, preprocess: Any | None = None, *, revalidate: bool = False, warm: bool = True) -> "SiteAlgo":
        """Read + validate the manifest (as `fedsubtype validate`), split train/val stratified, warm the cache.

        A validation record in the site's state folder (keyed by the manifest's content) spares re-reading
        every image at each round; `revalidate=True` forces the full check. `warm=False` skips checking
        every cache entry up front (a ClientApp process, after `fedsubtype-client` warmed the cache at
        start-up; a missing entry is still computed when first read).
        """
        from fedsubtype.data.manifest import load_manifest
        from fedsubtype.data.validation import validate_cases

        site = self.site
        cases, table_problems = load_manifest(site.manifest)
        if site.manifest_site is not None:
            cases = [c for c in cases if c.site == site.manifest_site]
        record = site.state_dir() / "validated.json"
        key = f"{_sha256(site.manifest)}:{site.manifest_site}"
        saved: dict[str, Any] = {}
        before = record.read_text(encoding="utf-8") if record.is_file() else ""
        try:
            saved = json.loads(before) if before else {}
        except ValueError:
            saved = {}
        if revalidate or saved.get("key") != key or not isinstance(saved.get("usable"), list):
            report = validate_cases(cases, progress=self.progress)
            self.problems = list(table_problems) + list(report.problems)
            self.cases = list(report.cases)
            saved = {"key": key, "usable": sorted(c.case_id for c in self.cases)}
        else:
            usable_ids = set(saved["usable"])
            self.problems = list(table_problems)
            self.cases = [c for c in cases if c.case_id in usable_ids]
        if not self.cases:
            raise UserError("no usable cases at this site", "run `fedsubtype validate` on the manifest",
                            where=str(site.manifest))
        self.splits = self._splits(saved)
        if json.dumps(saved) != before:
            atomic_write_text(record, json.dumps(saved))
        if not self.splits["train"]:
            raise UserError("the site's training split is empty", "add cases or lower val_fraction",
                            where=str(site.manifest))
        self.use_preprocess(preprocess if preprocess is not None else site.preprocess, warm=warm)
        return self

    def _splits(self, saved: dict[str, Any]) -> dict[str, list[Any]]:
        """The stratified train/val split, remembered in `saved` so that a new ClientApp process (one per
        message) neither recomputes it nor imports scikit-learn to do so."""
        from fedsubtype.data.splits import stratified_split

        split_key = f"{self.site.val_fraction}:{self.site.split_seed}"
        by_id = {c.case_id: c for c in self.cases}
        remembered = saved.get("splits")
        if saved.get("split_key") == split_key and isinstance(remembered, dict) \
                and sorted(i for ids in remembered.values() for i in ids) == sorted(by_id):
            return {name: [by_id[i] for i in ids] for name, ids in remembered.items()}
        splits = stratified_split(self.cases, (1.0 - self.site.val_fraction, self.site.val_fraction, 0.0),
                                  seed=self.site.split_seed)
        saved["split_key"] = split_key
        saved["splits"] = {name: [c.case_id for c in group] for name, group in splits.items()}
        return splits

    def use_preprocess(self, preprocess: Any, *, warm: bool = True) -> None:
        """Point the datasets at the cache for `preprocess` (warming it when new, unless `warm=False`)."""
        from fedsubtype.data.cache import PreprocessCache
        from fedsubtype.data.dataset import CaseDataset

        if self._preprocess is not None and to_dict(self._preprocess) == to_dict(preprocess):
            return
        self._preprocess = preprocess
        self._cache = PreprocessCache(self.site.cache_dir(), preprocess)
        if warm:
            self._cache.warm(self.cases, workers=self.site.cache_workers, progress=self.progress)
        self._datasets = {name: CaseDataset(cases, self._cache) for name, cases in self.splits.items() if cases}

    def local_summary(self) -> dict[str, Any]:
        """Counts for the site's own eyes (cases, splits, label counts); this never leaves the site."""
        from fedsubtype.data.splits import cohort_summary

        return {"site": self.site.name, "usable_cases": len(self.cases), "problems": len(self.problems),
                "train": cohort_summary(self.splits.get("train", [])), "val": cohort_summary(self.splits.get("val", []))}

    # ---------------------------------------------------------------- model
    def _model_for(self, settings: RoundSettings) -> Any:
        from fedsubtype.model import ModelConfig, build_model

        key = json.dumps(settings.model_config, sort_keys=True)
        if self._model is None or key != self._model_key:
            cfg = from_dict(ModelConfig, settings.model_config or {}, where="coordinator model config")
            self._model = build_model(cfg)
            self._model_key = key
        return self._model

    def _prepare(self, weights: Sequence[np.ndarray], settings: RoundSettings) -> tuple[Any, set[str]]:
        from fedsubtype.data.preprocess import PreprocessConfig

        if settings.preprocess_config is not None:
            prep = from_dict(PreprocessConfig, settings.preprocess_config, where="coordinator preprocess config")
            if to_dict(prep) != to_dict(self._preprocess):
                self.log("the coordinator's preprocessing differs from site.yaml's: warming the cache for it")
            self.use_preprocess(prep)
        model = self._model_for(settings)
        set_weights(model, weights)
        local = norm_parameter_names(model) if settings.local_norm else set()
        if local:
            self._load_local_norm(model, local)
        return model, local

    def _local_norm_path(self) -> Path:
        return self.site.state_dir() / "local_norm.pt"

    def _load_local_norm(self, model: Any, names: set[str]) -> None:
        import torch

        path = self._local_norm_path()
        if not path.is_file():
            return  # first round: start from the global normalisation
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = model.state_dict()
        state.update({k: v for k, v in saved.items() if k in names and k in state and v.shape == state[k].shape})
        model.load_state_dict(state)

    def _save_local_norm(self, model: Any, names: set[str]) -> None:
        import io

        import torch

        from fedsubtype.configio import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}, buf)
        atomic_write_bytes(self._local_norm_path(), buf.getvalue())

    # ---------------------------------------------------------------- privacy (fedsubtype.privacy.site)
    def _privacy_hook(self, settings: RoundSettings, n_train: int) -> Any | None:
        """The DP-SGD hook for this round (None when the site's privacy is disabled).

        Plans the run once (σ from the site's own budget over the planned rounds; kept in the ledger), then
        raises PrivacyBudgetExhausted before any training when this round would exceed the budget.
        """
        if not self.site.privacy.enabled:
            return None
        from fedsubtype.privacy.site import SitePrivacy

        if self._privacy is None or self._privacy.run_id != settings.run_id:
            rounds = self.site.privacy.rounds or settings.num_rounds
            if rounds is None:
                raise UserError("the coordinator did not announce the number of rounds to plan DP-SGD noise for",
                                "set privacy.rounds in site.yaml", where="site.privacy.rounds")
            self._privacy = SitePrivacy.start(
                self.site.privacy, site=self.site.name, n_train=n_train,
                batch_size=self.site.batch_size or settings.batch_size, rounds=rounds, run_id=settings.run_id,
                state_dir=self.site.state_dir(), local_epochs=settings.local_epochs, max_steps=settings.local_steps,
                seed=settings.seed, where="site.privacy")
            self.log(self._privacy.summary())
        self._privacy.require_budget(settings.server_round)
        return self._privacy.hook(settings.server_round)

    def _privacy_metrics(self, hook: Any | None) -> dict[str, float]:
        """Append the round's DP steps to the ledger; ε spent so far in this run and δ (NaN when DP is off)."""
        if hook is None or self._privacy is None:
            return {"epsilon": float("nan"), "delta": float("nan")}
        metrics = self._privacy.record(hook.server_round, hook)
        self.log(f"privacy: ε spent in run {self._privacy.run_id} = {metrics['epsilon_spent']:.3f} "
                 f"of {metrics['epsilon_budget']:g} (δ = {metrics['dp_delta']:.2g})")
        return {"epsilon": metrics["epsilon_spent"], "delta": metrics["dp_delta"]}

    # ---------------------------------------------------------------- limits (fedsubtype.privacy.limits)
    def _admit(self, settings: RoundSettings, phase: Phase) -> None:
        """Decline (RoundDeclined) a request over the site's limits, then count it for its run; reads no data."""
        from fedsubtype.data.preprocess import PreprocessConfig
        from fedsubtype.privacy.limits import check_round
        from fedsubtype.privacy.requests import RunRequests

        limits = self.site.limits
        prep = settings.preprocess_config
        size = prep.get("size", PreprocessConfig.size) if prep is not None else self.site.preprocess.size
        ask = {"server_round": settings.server_round, "num_rounds": settings.num_rounds,
               "local_epochs": settings.local_epochs, "local_steps": settings.local_steps,
               "batch_size": self.site.batch_size or settings.batch_size, "input_size": size,
               "model_config": settings.model_config}
        check_round(limits, ask, phase)
        limit = limits.max_rounds_per_run if phase == "train" else limits.max_evaluations_per_run
        requests = RunRequests(self.site.requests_path())
        requests.admit(settings.run_id, phase, limit, server_round=settings.server_round)

    # ---------------------------------------------------------------- rounds
    def train(self, weights: Sequence[np.ndarray], round_config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """One local round from the global `weights`: (new weights, number of training cases, aggregate metrics)."""
        from fedsubtype.train.config import TrainConfig
        from fedsubtype.train.loop import fit

        settings = RoundSettings.from_config(round_config)
        self._admit(settings, "train")
        if not self.splits:
            self.initialize(warm=self.warm)
        model, local = self._prepare(weights, settings)
        train_data = self._datasets["train"]
        cfg = TrainConfig(epochs=settings.local_epochs, max_steps=settings.local_steps,
                          batch_size=self.site.batch_size or settings.batch_size, lr=settings.lr,
                          weight_decay=settings.weight_decay, patience=None, augment=settings.augment,
                          warmup_fraction=0.0, schedule="constant",  # a per-round cosine would shrink late steps
                          ema_decay=None,  # the server's average is the federation's weight averaging
                          seed=settings.seed + 1009 * settings.server_round, threads=self.site.threads,
                          device=self.site.device, progress=self.progress)
        hook = self._privacy_hook(settings, len(train_data))
        t0 = time.perf_counter()
        result = fit(model, train_data, None, cfg, proximal_mu=settings.proximal_mu, privacy=hook,
                     log=self.log)
        seconds = time.perf_counter() - t0
        trained = result.model
        if local:
            self._save_local_norm(trained, local)
        last = result.history[-1] if result.history else {}
        metrics = {
            "num-examples": float(result.n_train),
            "train-loss": float("nan") if hook is not None else _nan_if_none(last.get("train_loss")),  # DP: unsent
            "steps": float(result.steps),
            "samples-seen": float(result.samples_seen),
            "seconds": float(seconds),
            "proximal-term": _nan_if_none(last.get("proximal_term")),
            **self._privacy_metrics(hook),
        }
        self._model = trained
        return get_weights(trained), int(result.n_train), check_metrics(metrics, TRAIN_METRIC_KEYS)

    def evaluate(self, weights: Sequence[np.ndarray], config: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
        """Score `weights` on the local validation split: (number of validation cases, aggregate metrics)."""
        from fedsubtype.evaluate.scoring import evaluate_dataset

        settings = RoundSettings.from_config(config)
        self._admit(settings, "evaluate")
        if not self.splits:
            self.initialize(warm=self.warm)
        model, _ = self._prepare(weights, settings)
        data = self._datasets.get("val")
        scores = {} if data is None else evaluate_dataset(model, data, n_boot=0, seed=settings.seed,
                                                          device=self.site.device)
        n_val = 0 if data is None else len(data)
        metrics = releasable_eval_metrics(scores, n_val, self.site.limits.min_cases_per_metric)
        return n_val, check_metrics(metrics, EVAL_METRIC_KEYS, EVAL_REQUIRED_KEYS)


def check_metrics(metrics: Mapping[str, Any], allowed: Sequence[str],
                  required: Sequence[str] | None = None) -> dict[str, float]:
    """The guard on what leaves a site: only allowed keys, all `required` ones (default: all), floats, in order."""
    required = allowed if required is None else required
    extra = set(metrics) - set(allowed)
    missing = set(required) - set(metrics)
    if extra or missing:
        raise ValueError(f"site metrics must be among {sorted(allowed)} and include {sorted(required)}; "
                         f"extra {sorted(extra)}, missing {sorted(missing)}")
    return {k: float(metrics[k]) for k in allowed if k in metrics}


__all__ = ["EVAL_METRIC_KEYS", "EVAL_REQUIRED_KEYS", "TRAIN_METRIC_KEYS", "RoundSettings", "SiteAlgo", "check_metrics", "get_weights",
           "norm_parameter_names", "set_weights"]
