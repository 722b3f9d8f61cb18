"""Patch features: encoders (registry), extraction (`dismm extract`) and feature files
in the CLAM / TRIDENT h5 layout.

Names are imported lazily so that `import napari_dismm.features.h5` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "FeatureFile": "napari_dismm.features.h5",
    "read_features": "napari_dismm.features.h5",
    "write_features": "napari_dismm.features.h5",
    "cache_key": "napari_dismm.features.cache",
    "feature_path": "napari_dismm.features.cache",
    "extract_slide": "napari_dismm.features.extract",
    "extract_cohort": "napari_dismm.features.cohort",
    "CohortSummary": "napari_dismm.features.cohort",
    "SlideResult": "napari_dismm.features.extract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_dismm.features' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
