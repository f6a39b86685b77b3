"""Stored settings of older versions brought to today's form, in one place.

Model files (`model.pt`, its `format_version`) and result folders (a benchmark's config.yaml, its
`settings_version`) say which settings version wrote them; every reader passes what it read through here
before building configs from it. What cannot be migrated is refused with one line naming the version.
Without torch, so the CLI and the simulation's run identity can use it.
"""

from __future__ import annotations

from typing import Any

from fedsubtype import __version__
from fedsubtype.errors import ConfigError
from fedsubtype.model.config import READ_OUT_PARTS, READ_OUTS

SETTINGS_VERSION = 2
"""1: everything written before versions were stored (keys added over time may be missing; a missing key
means the value the code had before the key existed). 2: the pruned model — `read_out` replaces
`region_statistics`, `statistics_heads` and `peritumoral_profile`; `stem`, `pooling`, `region_mixing`,
`task_branches` and `physical_size` are gone."""

VERSION_KEY = "settings_version"
"""The key of a result folder's config.yaml that holds its settings version (absent: version 1)."""

MODEL_V1_ADDED: dict[str, Any] = {"stem": "strided", "pooling": "mean", "region_mixing": "softmax_sum",
                                  "task_branches": False, "region_statistics": False, "statistics_heads": False,
                                  "peritumoral_profile": False}
"""Model keys added during version 1, with the value that reproduces the network from before each."""
PREPROCESS_V1_ADDED: dict[str, Any] = {"keep_tumour_range": False}
"""Preprocessing keys added during version 1, with the value the code used before each."""
PRIVACY_V2_ADDED: dict[str, Any] = {"lifetime_epsilon": None, "reproducible_noise": False}
"""Privacy keys added in version 2 that leave a simulation's numbers as they were at these values."""
RESULT_V1_ADDED: dict[str, Any] = {"refit": False}
TRAINING_V1_ADDED: dict[str, Any] = {"ema_decay": None}
"""Benchmark settings (top level, training section) added during version 1, with the value used before each."""

REMOVED_IN_V2: dict[str, Any] = {"physical_size": False, "stem": "strided", "pooling": "mean",
                                 "region_mixing": "softmax_sum", "task_branches": False}
"""Model options removed in version 2, with the only value of each that version 2 still reads."""
READ_OUT_SWITCHES: tuple[str, ...] = ("region_statistics", "statistics_heads", "peritumoral_profile")
"""The version-1 switches that version 2's `read_out` replaces."""


def check_version(version: Any, where: str) -> int:
    """`version` as a settings version this code reads; anything else is a one-line ConfigError."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"settings version {version!r} is not a version", "re-export the file", where=where)
    if version > SETTINGS_VERSION:
        raise ConfigError(f"written with settings version {version}; fedsubtype {__version__} reads up to "
                          f"{SETTINGS_VERSION}", "upgrade fedsubtype", where=where)
    return version


def read_out_of(region_statistics: bool, statistics_heads: bool, peritumoral_profile: bool, where: str) -> str:
    """The `read_out` that the three version-1 switches describe (the profile alone did nothing: `none`);
    a combination version 2 does not offer is a one-line ConfigError."""
    if not (region_statistics or statistics_heads):
        return "none"
    for name, parts in READ_OUT_PARTS.items():
        if (parts.statistics, parts.linear_heads, parts.profile) == (region_statistics, statistics_heads,
                                                                        peritumoral_profile):
            return name
    raise ConfigError(f"region_statistics={region_statistics}, statistics_heads={statistics_heads}, "
                      f"peritumoral_profile={peritumoral_profile} is a combination settings version "
                      f"{SETTINGS_VERSION} does not offer", f"retrain with read_out one of {', '.join(READ_OUTS)}",
                      where=where)


def migrate_model_config(data: dict[str, Any], version: Any, where: str = "model_config") -> dict[str, Any]:
    """A stored model section of settings `version` in today's form (a new dict)."""
    out = dict(data)
    if check_version(version, where) < 2:
        out = {**MODEL_V1_ADDED, **out}
        for key, only in REMOVED_IN_V2.items():
            value = out.pop(key, only)
            if value != only:
                raise ConfigError(f"made with {key} = {value!r}, an option removed in settings version 2 "
                                  f"(only {only!r} is still read)", "rerun or retrain it with today's options, "
                                  "or read it with an earlier fedsubtype", where=f"{where}.{key}")
        switches = [bool(out.pop(key)) for key in READ_OUT_SWITCHES]
        out["read_out"] = read_out_of(*switches, where=where)
    return out


def migrate_preprocess_config(data: dict[str, Any], version: Any, where: str = "preprocess_config"
                              ) -> dict[str, Any]:
    """A stored preprocessing section of settings `version` in today's form (a new dict)."""
    return {**PREPROCESS_V1_ADDED, **data} if check_version(version, where) < 2 else dict(data)


def migrate_result_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A result folder's stored settings (its config.yaml, `settings_version` inside) in today's form."""
    version = check_version(data.get(VERSION_KEY, 1), f"{where}.{VERSION_KEY}")
    out = dict(data)
    if version < 2:
        out = {**RESULT_V1_ADDED, **out}
        if isinstance(out.get("training"), dict):
            out["training"] = {**TRAINING_V1_ADDED, **out["training"]}
    if isinstance(out.get("model"), dict):
        out["model"] = migrate_model_config(out["model"], version, f"{where}.model")
    if isinstance(out.get("preprocess"), dict):
        out["preprocess"] = migrate_preprocess_config(out["preprocess"], version, f"{where}.preprocess")
    out[VERSION_KEY] = SETTINGS_VERSION
    return out


def run_identity(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Today's `model`, `preprocess` or `privacy` section as run identities have always hashed it (the
    simulation's config hash): in version-1 keys, those added since left out at their value from before them,
    so a run finished before a key existed keeps its identity."""
    added = {"model": MODEL_V1_ADDED, "preprocess": PREPROCESS_V1_ADDED, "privacy": PRIVACY_V2_ADDED}[section]
    if section == "model":
        values = dict(values)
        parts = READ_OUT_PARTS[values.pop("read_out", "none")]
        values.update(REMOVED_IN_V2, region_statistics=parts.statistics, statistics_heads=parts.linear_heads,
                      peritumoral_profile=parts.profile)
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}
