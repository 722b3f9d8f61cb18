"""Shared checks for the model configs (flat dataclasses, JSON-serialisable via asdict).

Each model module defines its own config dataclass; these helpers give them the same
validation and the same dict round trip, so a checkpoint's config.json rebuilds the
architecture exactly or fails with a message naming the bad key."""

from __future__ import annotations

import dataclasses
from typing import Any

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.heads import COMBINE_RULES, check_task


def validate_common(config: Any) -> None:
    """Check the fields every model config shares; raise ModelConfigError on the first bad one."""
    check_task(config.task)
    minimum = 2 if config.task == "classification" else 1
    if int(config.n_outputs) < minimum:
        raise ModelConfigError(f"n_outputs must be >= {minimum} for {config.task}, got {config.n_outputs}")
    for name in ("d_in", "d"):
        if int(getattr(config, name)) < 1:
            raise ModelConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    mags = tuple(config.magnifications)
    if not mags or len(set(mags)) != len(mags) or not all(isinstance(m, str) and m for m in mags):
        raise ModelConfigError(f"magnifications must be distinct non-empty names, got {mags!r}")
    if hasattr(config, "combine") and config.combine not in COMBINE_RULES:
        raise ModelConfigError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {config.combine!r}")
    if hasattr(config, "dropout") and not 0.0 <= float(config.dropout) < 1.0:
        raise ModelConfigError(f"dropout must be in [0, 1), got {config.dropout}")
    for name in ("n_tumor_genes", "n_tme_genes"):
        if hasattr(config, name) and int(getattr(config, name)) < 1:
            raise ModelConfigError(f"{name} must be >= 1, got {getattr(config, name)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def dataclass_from_dict(cls: type, data: dict[str, Any], *, strict: bool = False) -> Any:
    """Build ``cls`` from ``data``; unknown keys always fail, missing keys fail when ``strict``
    (a checkpoint must name every field; a user recipe may rely on defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    if strict:
        missing = sorted(set(fields) - set(data))
        if missing:
            raise ModelConfigError(f"missing {cls.__name__} key(s): {', '.join(missing)}")
    values = {}
    for name, value in data.items():
        default = fields[name].default
        values[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ModelConfigError(f"invalid {cls.__name__}: {error}") from error
