"""Save and load a model directory: ``model.safetensors`` + ``config.json``. Never pickles.

config.json holds ``model`` (the architecture config, every field), ``model_id`` (a short
hash of the weights file), ``format_version``, and, at the top level, whatever ``extra``
the training code passes (gene lists and normalisation statistics, class names or
survival bin edges, encoder name, magnifications, ...). numpy arrays and tensors in
``extra`` are stored as lists. The file is strict JSON: a non-finite float (the open
last survival bin edge, +inf) is written as ``null``; readers of bin edges take a null
last edge as +inf.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from napari_dismm.errors import DismmWarning, ModelConfigError
from napari_dismm.model.config import config_to_dict
from napari_dismm.model.registry import build_model, config_from_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 6
#: keys a newer format added to a model section, with the value every older file meant
#: (format 2: the student's ITA got soft assignment, the teacher a spatial context;
#: format-1 students merged hard, so their temperature is never used, and format-1
#: teachers saw each patch alone; format 3: the teacher's subspace features carry the
#: gene embedding and it has a slide-only head: older teachers had neither; format 4: the
#: student's ITA chooses its centres on its anchor sample and got a choice of membership
#: unit: older students took centres among the densest tokens and scaled by the spread;
#: the teacher's CGC got a granularity, and older teachers were trained with whole blocks;
#: the teacher got gene gates, and older teachers let the genes in ungated; format 5: the
#: teacher and the student got frozen linear probes, which older models did not have; format 6:
#: the student's probe may also read features pooled by scores fitted to the teacher's maps,
#: older students' probes read the mean alone)
_ADDED_IN = {2: {"student": {"assignment": "hard", "temperature": 2.0}, "teacher": {"spatial_context": 0.0}},
             3: {"teacher": {"gene_residual": False, "slide_head": False, "gene_dropout": 0.0, "base_query": False}},
             4: {"student": {"candidates": "densest", "membership_scale": "spread"},
                 "teacher": {"cgc_granularity": "block", "gene_gate": False}},
             5: {"student": {"probes": False}, "teacher": {"probes": False}},
             6: {"student": {"probe_pooling": "mean", "probe_context": 0.5, "patch_size_10x_level0": 448.0}}}
RESERVED = frozenset({"model", "model_id", "format_version"})
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def weights_id(path: str | os.PathLike) -> str:
    """Short (12 hex) sha256 of a weights file: identifies a model in predictions."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: numpy and torch values (normalisation stats, bin edges) as lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise ModelConfigError(f"extra holds a {type(value).__name__}, which config.json cannot store")


def _strict(value: Any) -> Any:
    """Make a document strict JSON: containers recursed, non-finite floats -> None."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic, Path)):
        return _strict(_jsonable(value))
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _atomic_path(directory: Path, name: str) -> Path:
    """A fresh temp name beside ``name``; the file is created by a plain open(), so the
    umask applies (mkstemp's and safetensors' 0600 would hide a model from colleagues)."""
    return directory / f".{name}.{uuid.uuid4().hex}.tmp"


def save_model(model: nn.Module, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> str:
    """Write the model directory (each file to a temp name, then renamed). Returns model_id."""
    extra = dict(extra or {})
    clash = sorted(RESERVED & set(extra))
    if clash:
        raise ModelConfigError(f"extra may not use reserved key(s): {', '.join(clash)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp_weights = _atomic_path(directory, WEIGHTS)
    tmp_config = _atomic_path(directory, CONFIG)
    try:
        tmp_weights.write_bytes(save(state, metadata={"format": "pt"}))  # open(): the umask applies
        model_id = weights_id(tmp_weights)
        document = {**extra, "model": config_to_dict(model.config), "model_id": model_id, "format_version": FORMAT_VERSION}
        tmp_config.write_text(json.dumps(_strict(document), indent=2, allow_nan=False, default=_jsonable))
        os.replace(tmp_weights, directory / WEIGHTS)
        os.replace(tmp_config, directory / CONFIG)
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)
    return model_id


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    hint = f" (found {', '.join(pickles)}: pickled checkpoints are never loaded; convert to safetensors)" if pickles else ""
    raise ModelConfigError(f"{directory} has no {WEIGHTS}{hint}")


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if problems:
        raise ModelConfigError("weights do not match config.json: " + " | ".join(problems))


def _upgrade(document: dict[str, Any]) -> dict[str, Any]:
    """The model section of an older config.json as the current format reads it: keys
    added since are filled with the value the older file's model was trained with."""
    section = dict(document["model"])
    version = document.get("format_version", 1)
    for added_in, by_kind in _ADDED_IN.items():
        if isinstance(version, int) and version < added_in:
            for key, value in by_kind.get(section.get("kind"), {}).items():
                section.setdefault(key, value)
    return section


def load_model(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, the config.json dict). Reads only safetensors; every config key
    and every tensor shape is checked against the architecture it names."""
    directory = Path(directory)
    if directory.is_file():
        if directory.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelConfigError(f"{directory.name} is a pickle; pickled checkpoints are never loaded (use safetensors)")
        raise ModelConfigError(f"{directory} is a file; expected a model directory ({WEIGHTS} + {CONFIG})")
    if not directory.is_dir():
        raise ModelConfigError(f"model directory {directory} does not exist")
    weights_path, config_path = directory / WEIGHTS, directory / CONFIG
    if not weights_path.is_file():
        _refuse_pickles(directory)
    if not config_path.is_file():
        raise ModelConfigError(f"{directory} has no {CONFIG}")
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ModelConfigError(f"{config_path} has no 'model' architecture section")
    config = config_from_dict(_upgrade(document), strict=True)
    model = build_model(config)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ModelConfigError(f"{weights_path} is not a readable safetensors file: {error}") from error
    _check_state(model.state_dict(), state)
    model.load_state_dict(state)
    model.to(map_location).eval()
    actual = weights_id(weights_path)
    if document.get("model_id") not in (None, actual):
        warnings.warn(
            f"{weights_path.name} hash {actual} differs from model_id {document['model_id']} in {CONFIG}",
            DismmWarning,
            stacklevel=2,
        )
    document["model_id"] = actual
    return model, document
