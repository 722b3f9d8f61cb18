"""Build any model from its config; rebuild a config from a JSON dict.

Model modules are imported inside the factory so importing the registry stays cheap and
the student (written separately) is only needed when a student is asked for."""

from __future__ import annotations

from typing import Any

from torch import nn

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.config import dataclass_from_dict

KINDS: tuple[str, ...] = ("teacher", "student", "abmil", "late_fusion", "genes_only", "mirror")


def _classes(kind: str) -> tuple[type, type]:
    """(config class, model class) for ``kind``."""
    match kind:
        case "teacher":
            from napari_dismm.model.teacher import Teacher, TeacherConfig

            return TeacherConfig, Teacher
        case "student":
            from napari_dismm.model.student import Student, StudentConfig

            return StudentConfig, Student
        case "abmil":
            from napari_dismm.model.baselines import ABMIL, ABMILConfig

            return ABMILConfig, ABMIL
        case "late_fusion":
            from napari_dismm.model.baselines import LateFusion, LateFusionConfig

            return LateFusionConfig, LateFusion
        case "genes_only":
            from napari_dismm.model.baselines import GenesOnly, GenesOnlyConfig

            return GenesOnlyConfig, GenesOnly
        case "mirror":
            from napari_dismm.model.mirror import Mirror, MirrorConfig

            return MirrorConfig, Mirror
    raise ModelConfigError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def config_from_dict(data: dict[str, Any], *, strict: bool = False) -> Any:
    """The config dataclass named by ``data["kind"]``; unknown keys are rejected (and
    missing ones too when ``strict``, as for a checkpoint)."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ModelConfigError("model config needs a 'kind' key")
    config_cls, _ = _classes(data["kind"])
    return dataclass_from_dict(config_cls, data, strict=strict)


def build_model(config: Any) -> nn.Module:
    """A freshly initialised model for ``config`` (a config dataclass or its dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    kind = getattr(config, "kind", None)
    config_cls, model_cls = _classes(kind)
    if not isinstance(config, config_cls):
        raise ModelConfigError(f"config for kind {kind!r} must be a {config_cls.__name__}")
    return model_cls(config)
