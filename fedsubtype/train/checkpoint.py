"""The model file (`model.pt`): weights + model config + preprocessing config + training metadata, one file.

Written by `fedsubtype train` and by a federation alike; `evaluate` / `predict` rebuild everything from it.
Loaded with ``torch.load(weights_only=True)``: only tensors and plain data, never pickled code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsubtype import CLASSIFICATION_TASKS, __version__
from fedsubtype.configio import atomic_write_bytes, from_dict, to_dict
from fedsubtype.errors import ConfigError, ModelFileError
from fedsubtype.migrate import SETTINGS_VERSION, migrate_model_config, migrate_preprocess_config

FORMAT_TAG = "fedsubtype-model"
FORMAT_VERSION = SETTINGS_VERSION
"""The settings version of the stored configurations (`fedsubtype.migrate`; 1 before the pruned model). Bump
with it, or when the layout changes incompatibly; older readers refuse newer files with a one-line error."""


@dataclass
class ModelBundle:
    """Everything in a model file besides the weights."""

    model_config: Any
    preprocess_config: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    fedsubtype_version: str = ""
    created: str = ""
    path: Path | None = None

    @property
    def thresholds(self) -> dict[str, float]:
        """Decision threshold per classification task (0.5 where the file records none)."""
        stored = self.metadata.get("thresholds") or {}
        out = {}
        for t in CLASSIFICATION_TASKS:
            v = stored.get(t, 0.5)
            out[t] = float(v["value"] if isinstance(v, dict) else v)
        return out


def json_safe(value: Any) -> Any:
    """Metadata as JSON-safe plain data (numpy scalars, paths, tuples, dataclasses, non-finite floats)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(to_dict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    return str(value)


def save_model(path: str | os.PathLike, model: nn.Module, *, model_config: Any, preprocess_config: Any,
               metadata: dict[str, Any]) -> None:
    """Write `model.pt` atomically (format tag + version, weights, configs, metadata, version, time)."""
    module = getattr(model, "_module", model)  # an Opacus wrapper's plain module
    payload = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "fedsubtype_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_config": json_safe(model_config),
        "preprocess_config": json_safe(preprocess_config),
        "metadata": json.loads(json.dumps(json_safe(metadata))),
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError("model file not found", "check the path (a run folder holds model.pt)", where=str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise ModelFileError(f"cannot read the model file ({exc.__class__.__name__}: corrupt or truncated)",
                             "re-copy it or retrain", where=str(path)) from None
    except Exception as exc:  # an unpickling error means foreign content, not a fedsubtype file
        raise ModelFileError(f"not a fedsubtype model file ({exc.__class__.__name__})",
                             "pass a model.pt written by `fedsubtype train` or a federation", where=str(path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise ModelFileError("not a fedsubtype model file (no format tag)",
                             "pass a model.pt written by `fedsubtype train` or a federation", where=str(path))
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(f"model file format version {version!r} is not supported by fedsubtype {__version__} "
                             f"(reads up to {FORMAT_VERSION})", "upgrade fedsubtype or re-export the model", where=str(path))
    for key in ("state_dict", "model_config", "preprocess_config"):
        if not isinstance(payload.get(key), dict):
            raise ModelFileError(f"model file lacks '{key}'", "re-export the model", where=str(path))
    return payload


def read_bundle(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelBundle]:
    """The weights and the rebuilt configurations of a model file, without building the network."""
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.model import ModelConfig

    path = Path(path)
    payload = _read_payload(path)
    version = payload["format_version"]
    try:
        model_raw = migrate_model_config(payload["model_config"], version, "model_config")
        prep_raw = migrate_preprocess_config(payload["preprocess_config"], version, "preprocess_config")
    except ConfigError as exc:  # an option or combination this version no longer builds
        raise ModelFileError(f"{exc.where}: {exc.what}", exc.fix, where=str(path)) from None
    try:
        model_cfg = from_dict(ModelConfig, model_raw, where="model_config")
        prep_cfg = from_dict(PreprocessConfig, prep_raw, where="preprocess_config")
    except ConfigError as exc:
        raise ModelFileError(f"stored configuration is not valid here ({exc.line()})",
                             "use the fedsubtype version that wrote it", where=str(path)) from None
    bundle = ModelBundle(model_config=model_cfg, preprocess_config=prep_cfg, metadata=dict(payload.get("metadata") or {}),
                         format_version=payload["format_version"], fedsubtype_version=str(payload.get("fedsubtype_version", "")),
                         created=str(payload.get("created", "")), path=path)
    return payload["state_dict"], bundle


def load_model(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild the network from the stored config, load the weights, and return it in eval mode with its bundle."""
    from fedsubtype.model import build_model

    state, bundle = read_bundle(path)
    model = build_model(bundle.model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "mismatch"
        raise ModelFileError(f"weights do not fit the stored model configuration ({first[:160]})",
                             "the file is damaged or was edited; re-export it", where=str(path)) from None
    model.to(torch.device(device) if device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, bundle
